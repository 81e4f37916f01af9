//! The native side of rpool._shm (large buffers through memfds): copying buffers into and out
//! of mappings of memfds, the cheap look for large buffers, and the socket
//! that carries a worker's result memfds to the parent.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `length` bytes at `offset` of `source` (a mapping of a memfd), as a new `bytes`, or
/// `bytearray` if `mutable`.
///
/// One copy, a plain memcpy straight into the new object's memory, with the GIL released.
/// Python itself can only make a `bytearray` zero-filled first (a second pass over fresh memory);
/// `pread` from the memfd costs about half as much again as a memcpy from a mapping whose pages
/// are already in the page table.
#[pyfunction]
pub fn read_buffer(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    offset: usize,
    length: usize,
    mutable: bool,
) -> PyResult<Py<PyAny>> {
    let held = HeldBuffer::new(source, false)?;
    let from = held.range(offset, length)?;
    let size = isize::try_from(length).map_err(|_| PyValueError::new_err("buffer too large"))?;
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
    let to = unsafe {
        if mutable {
            ffi::PyByteArray_AsString(raw)
        } else {
            ffi::PyBytes_AsString(raw)
        }
    } as usize;
    py.detach(|| unsafe {
        std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, length)
    });
    drop(held);
    Ok(object.unbind())
}

/// Copy all of `source` (any contiguous buffer) into `target` (a writable mapping of a memfd) at
/// `offset`, with the GIL released.
#[pyfunction]
pub fn write_buffer(
    py: Python<'_>,
    target: &Bound<'_, PyAny>,
    offset: usize,
    source: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let from = HeldBuffer::new(source, false)?;
    let into = HeldBuffer::new(target, true)?;
    let length = from.len();
    let to = into.range(offset, length)?;
    let start = from.range(0, length)?;
    py.detach(|| unsafe { std::ptr::copy(start as *const u8, to as *mut u8, length) });
    Ok(())
}

/// A contiguous buffer exported by a Python object, released when dropped (with the GIL held).
/// While it is held, the exporter cannot resize, close or unmap it.
struct HeldBuffer {
    view: ffi::Py_buffer,
}

impl HeldBuffer {
    fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let flags = if writable {
            ffi::PyBUF_WRITABLE
        } else {
            ffi::PyBUF_SIMPLE
        };
        let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(HeldBuffer {
            view: unsafe { view.assume_init() },
        })
    }

    fn len(&self) -> usize {
        usize::try_from(self.view.len).unwrap_or(0)
    }

    /// The address of `length` bytes at `offset`, if the buffer holds them.
    fn range(&self, offset: usize, length: usize) -> PyResult<usize> {
        match offset.checked_add(length) {
            Some(end) if end <= self.len() => Ok(self.view.buf as usize + offset),
            _ => Err(PyValueError::new_err(format!(
                "rpool: {length} bytes at {offset} are past the end of a {}-byte buffer",
                self.len()
            ))),
        }
    }
}

impl Drop for HeldBuffer {
    fn drop(&mut self) {
        unsafe { ffi::PyBuffer_Release(&mut self.view) };
    }
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

/// Whether `obj`, or an item a few levels down in its tuples, lists and dicts, is a `bytes`,
/// `bytearray` or other buffer (a numpy array, say) of at least `min_size` bytes. Looks at no
/// more than `budget` objects: it runs for every task and result, so it must cost next to
/// nothing when the answer is no.
pub fn holds_large_buffer(obj: &Bound<'_, PyAny>, min_size: usize, budget: usize) -> bool {
    use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyTuple};
    let mut stack = vec![obj.clone()];
    let mut left = budget;
    while let Some(item) = stack.pop() {
        if left == 0 {
            break;
        }
        left -= 1;
        if let Ok(bytes) = item.downcast_exact::<PyBytes>() {
            if bytes.as_bytes().len() >= min_size {
                return true;
            }
        } else if let Ok(array) = item.downcast_exact::<PyByteArray>() {
            if array.len() >= min_size {
                return true;
            }
        } else if let Ok(tuple) = item.downcast_exact::<PyTuple>() {
            stack.extend(tuple.iter().take(left));
        } else if let Ok(list) = item.downcast_exact::<PyList>() {
            stack.extend(list.iter().take(left));
        } else if let Ok(dict) = item.downcast_exact::<PyDict>() {
            // Not `values()`: that copies every value of a big dict into a new list.
            stack.extend(dict.iter().take(left).map(|(_, value)| value));
        } else if buffer_len(&item).is_some_and(|n| n >= min_size) {
            return true;
        }
    }
    false
}

/// The size in bytes of an object that exports a buffer, without copying anything.
fn buffer_len(obj: &Bound<'_, PyAny>) -> Option<usize> {
    let ptr = obj.as_ptr();
    unsafe {
        if ffi::PyObject_CheckBuffer(ptr) == 0 {
            return None;
        }
        let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
        if ffi::PyObject_GetBuffer(ptr, view.as_mut_ptr(), ffi::PyBUF_RECORDS_RO) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        let len = (*view.as_ptr()).len;
        ffi::PyBuffer_Release(view.as_mut_ptr());
        usize::try_from(len).ok()
    }
}

/// A worker's memfd socket: a datagram socketpair on which the worker sends the memfd of each
/// large result, just before the result frame (SCM_RIGHTS: the kernel holds it in flight, so
/// it outlives neither end). A pipe cannot carry descriptors, and the result channel stays a
/// pipe because a Unix socket costs small results a few microseconds more per round trip.
pub fn memfd_socket() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// In the parent: the next memfd a worker sent, if there is one (never blocks).
pub fn recv_memfd(sock: RawFd) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut space), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
            Ok(msg) => break msg,
        }
    };
    let mut found = None;
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                found.get_or_insert(owned);
            }
        }
    }
    found
}

/// In a worker: send `memfd` to the parent on the memfd socket `sock` (rpool._shm calls this
/// for a large result, before the core writes the result frame).
#[pyfunction]
pub fn send_memfd(py: Python<'_>, sock: RawFd, memfd: RawFd) -> PyResult<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let byte = [0u8; 1];
    let iov = [io::IoSlice::new(&byte)];
    let fds = [memfd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    py.detach(|| loop {
        match sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(PyOSError::new_err(format!("rpool: sending a memfd: {e}"))),
            Ok(_) => return Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn memfd_with(data: &[u8]) -> OwnedFd {
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let written = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), 0) };
        assert_eq!(written, data.len() as isize);
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_memfd_sent_on_the_socket_arrives_as_the_same_file() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let (parent, worker) = memfd_socket().unwrap();
        assert!(recv_memfd(parent.as_raw_fd()).is_none(), "nothing sent yet");
        let memfd = memfd_with(b"result buffers");
        let fds = [memfd.as_raw_fd()];
        let iov = [io::IoSlice::new(b"m")];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(worker.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        drop(memfd); // in flight, the kernel holds it
        let got = recv_memfd(parent.as_raw_fd()).expect("the memfd");
        let mut out = vec![0u8; 14];
        let read = unsafe { libc::pread(got.as_raw_fd(), out.as_mut_ptr().cast(), out.len(), 0) };
        assert_eq!(read, 14);
        assert_eq!(&out, b"result buffers");
    }
}
