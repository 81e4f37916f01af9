//! A quick pickler for plain data: what most tasks send and return (`((5,), {})`, `25`, a list
//! of floats). It writes the pickle opcodes straight into a buffer, where `pickle.dumps` pays
//! for a Pickler object, its memo table and its output buffer on every call: about 330 ns for
//! `((5,), {})` against well under 100 here, for every task and every result.
//!
//! Only exact `None`, `bool`, `int` (64-bit), `float`, `str`, `bytes`, `tuple`, `list` and `dict`
//! are written; anything else (subclasses included) leaves the object to `pickle`. The output
//! unpickles to an equal object. Identity is kept where it can be observed: a list or dict met
//! twice (shared, or holding itself) leaves the object to `pickle`, whose memo keeps it shared.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};

/// Objects written at most: past that, pickle's C loop is as fast and this would only add a walk.
const MAX_OBJECTS: usize = 4096;
/// Nesting written at most.
const MAX_DEPTH: usize = 32;

// The opcodes used (pickle protocol 5 reads them all; see `pickletools`).
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';
const EMPTY_TUPLE: u8 = b')';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';

/// Why an object was not written.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// It holds a `bytes` or `bytearray` of at least the size that goes through shared memory.
    LargeBuffer,
    /// Something this pickler does not write: `pickle` must.
    NotPlain,
}

struct Writer {
    out: Vec<u8>,
    objects: usize,
    large: usize,
    /// Lists and dicts written so far, to notice one met twice.
    containers: Vec<*mut ffi::PyObject>,
}

impl Writer {
    fn write(&mut self, obj: &Bound<'_, PyAny>, depth: usize) -> Result<(), Refused> {
        self.objects += 1;
        if self.objects > MAX_OBJECTS || depth > MAX_DEPTH {
            return Err(Refused::NotPlain);
        }
        let ty = obj.get_type_ptr();
        // The common types first, by their type object: cheaper than a chain of downcasts.
        if ty == &raw mut ffi::PyLong_Type {
            let mut overflow = 0;
            let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
            if overflow != 0 {
                return Err(Refused::NotPlain);
            }
            self.int(v);
        } else if ty == &raw mut ffi::PyFloat_Type {
            let v = unsafe { ffi::PyFloat_AsDouble(obj.as_ptr()) };
            self.out.push(BINFLOAT);
            self.out.extend_from_slice(&v.to_be_bytes());
        } else if obj.is_none() {
            self.out.push(NONE);
        } else if ty == &raw mut ffi::PyBool_Type {
            let is_true = obj.as_ptr() == unsafe { ffi::Py_True() };
            self.out.push(if is_true { NEWTRUE } else { NEWFALSE });
        } else if let Ok(s) = obj.downcast_exact::<PyString>() {
            // Fails for lone surrogates, which pickle writes its own way.
            let text = s.to_str().map_err(|_| Refused::NotPlain)?;
            self.sized(text.as_bytes(), SHORT_BINUNICODE, BINUNICODE)?;
        } else if let Ok(b) = obj.downcast_exact::<PyBytes>() {
            let data = b.as_bytes();
            if data.len() >= self.large {
                return Err(Refused::LargeBuffer);
            }
            self.sized(data, SHORT_BINBYTES, BINBYTES)?;
        } else if let Ok(t) = obj.downcast_exact::<PyTuple>() {
            let n = t.len();
            if n > 3 {
                self.out.push(MARK);
            }
            for item in t.iter() {
                self.write(&item, depth + 1)?;
            }
            self.out.push(match n {
                0 => EMPTY_TUPLE,
                1 => TUPLE1,
                2 => TUPLE2,
                3 => TUPLE3,
                _ => TUPLE,
            });
        } else if let Ok(l) = obj.downcast_exact::<PyList>() {
            self.container(obj)?;
            self.out.push(EMPTY_LIST);
            if !l.is_empty() {
                self.out.push(MARK);
                for item in l.iter() {
                    self.write(&item, depth + 1)?;
                }
                self.out.push(APPENDS);
            }
        } else if let Ok(d) = obj.downcast_exact::<PyDict>() {
            self.container(obj)?;
            self.out.push(EMPTY_DICT);
            if !d.is_empty() {
                self.out.push(MARK);
                for (key, value) in d.iter() {
                    self.write(&key, depth + 1)?;
                    self.write(&value, depth + 1)?;
                }
                self.out.push(SETITEMS);
            }
        } else if let Ok(array) = obj.downcast::<PyByteArray>() {
            return Err(if array.len() >= self.large {
                Refused::LargeBuffer
            } else {
                Refused::NotPlain
            });
        } else {
            return Err(Refused::NotPlain);
        }
        Ok(())
    }

    fn container(&mut self, obj: &Bound<'_, PyAny>) -> Result<(), Refused> {
        let ptr = obj.as_ptr();
        if self.containers.contains(&ptr) {
            return Err(Refused::NotPlain);
        }
        // A linear look stays cheap for the few containers of a task; many are left to pickle.
        if self.containers.len() >= 64 {
            return Err(Refused::NotPlain);
        }
        self.containers.push(ptr);
        Ok(())
    }

    fn int(&mut self, v: i64) {
        if (0..0x100).contains(&v) {
            self.out.extend_from_slice(&[BININT1, v as u8]);
        } else if (0..0x10000).contains(&v) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if let Ok(small) = i32::try_from(v) {
            self.out.push(BININT);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else {
            // Two's complement, little-endian, as few bytes as keep the sign.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let below_sign = bytes[n - 2] & 0x80;
                if (top == 0 && below_sign == 0) || (top == 0xff && below_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[LONG1, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    fn sized(&mut self, data: &[u8], short: u8, long: u8) -> Result<(), Refused> {
        if data.len() < 0x100 {
            self.out.extend_from_slice(&[short, data.len() as u8]);
        } else {
            let len = u32::try_from(data.len()).map_err(|_| Refused::NotPlain)?;
            self.out.push(long);
            self.out.extend_from_slice(&len.to_le_bytes());
        }
        self.out.extend_from_slice(data);
        Ok(())
    }
}

/// The pickle of `obj` if it is plain data; `large` is the size from which a `bytes` or
/// `bytearray` must go through shared memory instead.
pub fn dumps_plain(obj: &Bound<'_, PyAny>, large: usize) -> Result<Vec<u8>, Refused> {
    let mut w = Writer {
        out: Vec::with_capacity(64),
        objects: 0,
        large,
        containers: Vec::new(),
    };
    w.out.extend_from_slice(&[PROTO, 5]);
    w.write(obj, 0)?;
    w.out.push(STOP);
    Ok(w.out)
}

/// `quick_dumps(obj, min_size, budget)`: the pickle of `obj` as `bytes` if it is plain data
/// (see the module); else whether it holds a buffer of at least `min_size` bytes (as
/// `holds_large_buffer`, looking at up to `budget` objects), so that the caller knows at once
/// whether to send it through shared memory or through `pickle`.
#[pyfunction]
pub fn quick_dumps(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    min_size: usize,
    budget: usize,
) -> Py<PyAny> {
    match dumps_plain(obj, min_size) {
        Ok(data) => PyBytes::new(py, &data).into_any().unbind(),
        Err(Refused::LargeBuffer) => PyBool::new(py, true).to_owned().into_any().unbind(),
        Err(Refused::NotPlain) => {
            let holds = crate::shm::holds_large_buffer(obj, min_size, budget);
            PyBool::new(py, holds).to_owned().into_any().unbind()
        }
    }
}
