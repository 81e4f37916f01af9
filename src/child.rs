//! The worker process's loop: read a task frame, run it through Python, write the result frame.
//! Nothing here touches the parent's Rust state: after a fork this is all the child runs.

use crate::frame::{self, kind, FrameReader, Header};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Instant;

pub fn send(fd: RawFd, kind: u8, id: u64, aux: u64, payload: &[u8]) -> std::io::Result<()> {
    let header = Header {
        kind,
        len: payload.len() as u32,
        id,
        aux,
    }
    .encode();
    frame::write_all(fd, &[&header, payload])
}

/// Report an initializer failure: print it as the stdlib's workers do, and tell the parent.
pub fn report_init_failure(py: Python<'_>, result_fd: RawFd, err: PyErr) {
    let text = py
        .import("traceback")
        .and_then(|tb| {
            tb.call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )
        })
        .and_then(|lines| lines.extract::<Vec<String>>())
        .map(|lines| lines.concat())
        .unwrap_or_else(|_| err.to_string());
    err.print(py);
    let _ = send(result_fd, kind::INIT_FAILED, 0, 0, text.as_bytes());
}

/// When a worker retires by itself.
#[derive(Default, Clone, Copy)]
pub struct Limits {
    /// After this many tasks (`maxtasksperchild`); the parent knows and sends no more.
    pub max_tasks: Option<u64>,
    /// Once its resident set grew past this many bytes, measured after each task; it says so
    /// with a RETIRING frame, since the parent cannot know.
    pub max_memory: Option<u64>,
}

/// This process's resident set size in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

/// Serve tasks until STOP, EOF (the parent is gone) or a limit. Returns the exit code.
/// `execute(payload: bytes) -> (ok: bool, data: bytes)` never raises for a task's own errors.
pub fn serve(
    py: Python<'_>,
    reader: &mut FrameReader,
    task_fd: RawFd,
    result_fd: RawFd,
    execute: &Bound<'_, PyAny>,
    limits: Limits,
) -> i32 {
    if send(result_fd, kind::READY, 0, 0, &[]).is_err() {
        return 0;
    }
    let task_pipe = unsafe { BorrowedFd::borrow_raw(task_fd) };
    let mut completed = 0u64;
    loop {
        // Block without the GIL so that threads the task code started keep running.
        match py.detach(|| reader.wait_frame(task_pipe)) {
            Ok(true) => {}
            Ok(false) | Err(_) => return 0,
        }
        let (header, body) = reader.next_frame().expect("wait_frame buffered a frame");
        match header.kind {
            kind::STOP => return 0,
            kind::TASK => {}
            other => {
                eprintln!("rpool worker: unexpected frame kind {other}");
                return 1;
            }
        }
        let payload = PyBytes::new(py, body);
        let started = Instant::now();
        let (ok, data) = match execute
            .call1((payload,))
            .and_then(|r| r.extract::<(bool, Bound<'_, PyBytes>)>())
        {
            Ok(r) => r,
            Err(e) => {
                // execute() guards every task error, so this is a bug in rpool itself.
                e.print(py);
                return 1;
            }
        };
        let ran_ns = started.elapsed().as_nanos() as u64;
        let bytes = data.as_bytes();
        // rpool._shm returns a `bytes` subclass for a result whose large buffers are in a memfd;
        // it has just sent that memfd on the worker's memfd socket.
        let shared = !data.is_exact_instance_of::<PyBytes>();
        let kind = match (ok, shared) {
            (true, false) => kind::VALUE,
            (false, false) => kind::RAISED,
            (true, true) => kind::VALUE_FD,
            (false, true) => kind::RAISED_FD,
        };
        let sent = py.detach(|| send(result_fd, kind, header.id, ran_ns, bytes));
        if sent.is_err() {
            return 0;
        }
        completed += 1;
        if limits.max_tasks.is_some_and(|m| completed >= m) {
            return 0;
        }
        if let Some(limit) = limits.max_memory {
            match resident_bytes() {
                Some(rss) if rss > limit => {
                    let _ = send(result_fd, kind::RETIRING, 0, rss, &[]);
                    return 0;
                }
                _ => {}
            }
        }
    }
}
