//! Reading a large buffer out of a memfd into a new `bytes` or `bytearray` (see rpool._shm).
//!
//! One copy, done by the kernel (`pread`) straight into the new object's memory, with the GIL
//! released. Python itself can only make a `bytearray` zero-filled first (a second pass over
//! fresh memory) or copy it from a mapping with a userspace memcpy, both slower.

use pyo3::exceptions::PyOSError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `length` bytes at `offset` of `fd`, as `bytes`, or as `bytearray` if `mutable`.
#[pyfunction]
pub fn read_buffer(
    py: Python<'_>,
    fd: i32,
    offset: u64,
    length: usize,
    mutable: bool,
) -> PyResult<Py<PyAny>> {
    let size = isize::try_from(length).map_err(|_| PyOSError::new_err("buffer too large"))?;
    keep_freed_heap(length);
    // Uninitialised: every byte is overwritten below before anyone sees the object.
    let raw = unsafe {
        if mutable {
            ffi::PyByteArray_FromStringAndSize(std::ptr::null(), size)
        } else {
            ffi::PyBytes_FromStringAndSize(std::ptr::null(), size)
        }
    };
    let object = unsafe { Bound::from_owned_ptr_or_err(py, raw)? };
    let start = unsafe {
        if mutable {
            ffi::PyByteArray_AsString(raw)
        } else {
            ffi::PyBytes_AsString(raw)
        }
    } as usize;
    py.detach(|| read_exact_at(fd, start, length, offset))
        .map_err(|e| PyOSError::new_err(format!("rpool: reading shared memory: {e}")))?;
    Ok(object.unbind())
}

/// `pread` until `length` bytes are in the memory at `start`.
fn read_exact_at(fd: i32, start: usize, length: usize, offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < length {
        let n = unsafe {
            libc::pread(
                fd,
                (start + done) as *mut libc::c_void,
                length - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the memfd is shorter than its payload says",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Largest buffer `keep_freed_heap` has made room for.
static KEPT: AtomicUsize = AtomicUsize::new(0);
/// Past this, buffers come from fresh mappings again (and nothing more is kept).
const KEEP_AT_MOST: usize = 512 << 20;

/// Once a process receives buffers of `length` bytes, let glibc's malloc serve blocks that big
/// from its heap and keep up to twice that much freed memory: the next such buffer then lands
/// in pages already mapped. By default each one is a fresh mmap, and faulting in and zeroing
/// its pages one by one costs more than the copy itself (about 60 of the 80 ms of a 64 MiB
/// `bytes` on the 2-core machine this was measured on). What is kept is bounded by twice the
/// largest buffer received, at most `KEEP_AT_MOST`.
fn keep_freed_heap(length: usize) {
    let wanted = length.saturating_add(1 << 20);
    if wanted > KEEP_AT_MOST || KEPT.fetch_max(wanted, Ordering::Relaxed) >= wanted {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, wanted as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, (2 * wanted) as libc::c_int);
    }
}
