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
    /// Lists and dicts written so far, to notice one met twice: a fixed array, as a `Vec` was
    /// one more malloc for every task whose `kwds` is a dict.
    containers: [*mut ffi::PyObject; MAX_CONTAINERS],
    n_containers: usize,
}

/// Lists and dicts written at most: a linear look stays cheap for the few of a task, and many
/// are left to pickle.
const MAX_CONTAINERS: usize = 64;

impl Writer {
    fn new(out: Vec<u8>, large: usize) -> Writer {
        Writer {
            out,
            objects: 0,
            large,
            containers: [std::ptr::null_mut(); MAX_CONTAINERS],
            n_containers: 0,
        }
    }

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
        let seen = &self.containers[..self.n_containers];
        if seen.contains(&ptr) || self.n_containers == MAX_CONTAINERS {
            return Err(Refused::NotPlain);
        }
        self.containers[self.n_containers] = ptr;
        self.n_containers += 1;
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

/// Writes the pickle of `obj` into `out` (cleared first) if it is plain data; `large` is the
/// size from which a `bytes` or `bytearray` must go through shared memory instead.
fn dumps_plain(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>, large: usize) -> Result<(), Refused> {
    dumps_plain_tuple_into(out, &[obj], None, large)
}

/// Writes `objs` one after the other into `out` (cleared first), then `tail` (an opcode that
/// makes a tuple of them), as one pickle.
fn dumps_plain_tuple_into(
    out: &mut Vec<u8>,
    objs: &[&Bound<'_, PyAny>],
    tail: Option<u8>,
    large: usize,
) -> Result<(), Refused> {
    out.clear();
    let mut w = Writer::new(std::mem::take(out), large);
    w.out.extend_from_slice(&[PROTO, 5]);
    let written = objs.iter().try_for_each(|obj| w.write(obj, 0));
    w.out.extend(tail);
    w.out.push(STOP);
    *out = w.out;
    written
}

thread_local! {
    /// `quick_dumps`'s buffer, kept between calls: the pickle is copied into its `bytes` anyway,
    /// and a buffer per call was one more malloc per task on the submitting thread.
    static OUT: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
}

/// A buffer this big is not kept for the next call.
const KEPT_OUT: usize = 64 << 10;

/// Calls `with` on this thread's kept buffer (`OUT`), or on a new one if the kept one is in use
/// (a call made from inside `with`), and shrinks the kept one if it grew too big.
fn with_kept_buffer<R>(with: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    OUT.with(|cell| {
        let mut kept = cell.try_borrow_mut();
        let mut own = Vec::new();
        let out = match kept.as_deref_mut() {
            Ok(out) => out,
            Err(_) => &mut own,
        };
        let answer = with(out);
        if out.capacity() > KEPT_OUT {
            *out = Vec::with_capacity(256);
        }
        answer
    })
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
    let written =
        with_kept_buffer(|out| dumps_plain(out, obj, min_size).map(|()| PyBytes::new(py, out)));
    match written {
        Ok(data) => data.into_any().unbind(),
        Err(Refused::LargeBuffer) => PyBool::new(py, true).to_owned().into_any().unbind(),
        Err(Refused::NotPlain) => {
            let holds = crate::shm::holds_large_buffer(obj, min_size, budget);
            PyBool::new(py, holds).to_owned().into_any().unbind()
        }
    }
}

/// Calls `with` on the pickle of `(args, kwds)` if both are plain data, written into this
/// thread's kept buffer (`large` as in `dumps_plain`).
pub fn with_plain_call<R>(
    args: &Bound<'_, PyAny>,
    kwds: &Bound<'_, PyAny>,
    large: usize,
    with: impl FnOnce(&[u8]) -> R,
) -> Result<R, Refused> {
    with_kept_buffer(|out| {
        dumps_plain_tuple_into(out, &[args, kwds], Some(TUPLE2), large)?;
        Ok(with(out))
    })
}

/// Reads back what `dumps_plain` writes, without an Unpickler (whose setup costs more than
/// reading a small result). `None` for anything else, or anything malformed: `pickle.loads`
/// then reads it, or raises its own error.
pub fn loads_plain<'py>(py: Python<'py>, data: &[u8]) -> Option<Bound<'py, PyAny>> {
    let mut r = Reader { data, at: 0 };
    if r.take(2)? != [PROTO, 5] {
        return None;
    }
    // Every object takes at least two bytes: room for all at once, not a regrowth per doubling.
    let mut stack: Vec<Bound<'py, PyAny>> = Vec::with_capacity((data.len() / 2).min(4096));
    let mut marks: Vec<usize> = Vec::new();
    loop {
        let op = r.byte()?;
        let object = match op {
            STOP => {
                return (stack.len() == 1 && r.at == data.len()).then(|| stack.pop())?;
            }
            NONE => py.None().into_bound(py),
            NEWTRUE => PyBool::new(py, true).to_owned().into_any(),
            NEWFALSE => PyBool::new(py, false).to_owned().into_any(),
            BININT1 => r.byte()?.into_pyobject(py).ok()?.into_any(),
            BININT2 => u16::from_le_bytes(r.array()?)
                .into_pyobject(py)
                .ok()?
                .into_any(),
            BININT => i32::from_le_bytes(r.array()?)
                .into_pyobject(py)
                .ok()?
                .into_any(),
            LONG1 => {
                let n = r.byte()? as usize;
                let bytes = r.take(n)?;
                if n == 0 || n > 8 {
                    return None;
                }
                // Sign-extend the little-endian two's complement to 64 bits.
                let fill = if bytes[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                let mut full = [fill; 8];
                full[..n].copy_from_slice(bytes);
                i64::from_le_bytes(full).into_pyobject(py).ok()?.into_any()
            }
            BINFLOAT => f64::from_be_bytes(r.array()?)
                .into_pyobject(py)
                .ok()?
                .into_any(),
            SHORT_BINUNICODE | BINUNICODE => {
                let text = std::str::from_utf8(r.sized(op == SHORT_BINUNICODE)?).ok()?;
                PyString::new(py, text).into_any()
            }
            SHORT_BINBYTES | BINBYTES => {
                PyBytes::new(py, r.sized(op == SHORT_BINBYTES)?).into_any()
            }
            EMPTY_TUPLE => PyTuple::empty(py).into_any(),
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = (op - TUPLE1 + 1) as usize;
                let items = stack.split_off(stack.len().checked_sub(n)?);
                PyTuple::new(py, items).ok()?.into_any()
            }
            MARK => {
                marks.push(stack.len());
                continue;
            }
            TUPLE => {
                let items = pop_to_mark(&mut stack, &mut marks)?;
                PyTuple::new(py, items).ok()?.into_any()
            }
            EMPTY_LIST => PyList::empty(py).into_any(),
            EMPTY_DICT => PyDict::new(py).into_any(),
            APPENDS => {
                let items = pop_to_mark(&mut stack, &mut marks)?;
                let top = stack.last_mut()?;
                let list = top.downcast_exact::<PyList>().ok()?;
                if list.is_empty() {
                    // What `dumps_plain` writes: the list made at its full size at once.
                    *top = PyList::new(py, items).ok()?.into_any();
                } else {
                    for item in items {
                        list.append(item).ok()?;
                    }
                }
                continue;
            }
            SETITEMS => {
                let items = pop_to_mark(&mut stack, &mut marks)?;
                if items.len() % 2 != 0 {
                    return None;
                }
                let dict = stack.last()?.downcast_exact::<PyDict>().ok()?;
                let mut pairs = items.into_iter();
                while let (Some(key), Some(value)) = (pairs.next(), pairs.next()) {
                    dict.set_item(key, value).ok()?;
                }
                continue;
            }
            _ => return None,
        };
        stack.push(object);
    }
}

/// The objects pushed since the last MARK (None if there is no mark, or it is out of reach).
fn pop_to_mark<'py>(
    stack: &mut Vec<Bound<'py, PyAny>>,
    marks: &mut Vec<usize>,
) -> Option<Vec<Bound<'py, PyAny>>> {
    let mark = marks.pop()?;
    (mark <= stack.len()).then(|| stack.split_off(mark))
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// A length (one byte if `short`, else four) and that many bytes.
    fn sized(&mut self, short: bool) -> Option<&'a [u8]> {
        let n = if short {
            self.byte()? as usize
        } else {
            u32::from_le_bytes(self.array()?) as usize
        };
        self.take(n)
    }
}

/// `quick_loads(data)`: `pickle.loads(data)`, read natively when `data` is what `quick_dumps`
/// writes for plain data.
#[pyfunction]
pub fn quick_loads<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    loads(py, data)
}

/// `pickle.loads(data)`, read natively when `data` is what `dumps_plain` writes.
pub fn loads<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match loads_plain(py, data) {
        Some(object) => Ok(object),
        None => pickle_loads(py)?.call1((PyBytes::new(py, data),)),
    }
}

/// `pickle.loads` (the C one, `_pickle`'s: `pickle` itself need not be imported), looked up once.
fn pickle_loads(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static LOADS: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    LOADS.import(py, "_pickle", "loads")
}

/// The pickle of `((start, stop, step), {})`: the arguments of `rangestar` for one chunk of a
/// range, as `dumps_plain` writes them.
pub fn range_chunk_call(start: i64, stop: i64, step: i64) -> Vec<u8> {
    let mut w = Writer::new(Vec::with_capacity(40), usize::MAX);
    w.out.extend_from_slice(&[PROTO, 5]);
    for v in [start, stop, step] {
        w.int(v);
    }
    w.out.extend_from_slice(&[TUPLE3, EMPTY_DICT, TUPLE2, STOP]);
    w.out
}
