//! The worker process's loop: read a task frame, run it through Python, write the result frame.
//! Nothing here touches the parent's Rust state: after a fork this is all the child runs.

use crate::frame::{self, kind, FrameReader, Header};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// This worker's result pipe. Task threads write LOG frames to it (`send_log`) while the serve
/// loop writes results, so whole frames are written under `lock`. A fresh one is made in each
/// worker process as it starts (`attach_result_pipe`): a lock that some thread of the process
/// that forked it held at the fork is never inherited locked.
struct ResultPipe {
    fd: RawFd,
    lock: Mutex<()>,
}

static RESULT_PIPE: AtomicPtr<ResultPipe> = AtomicPtr::new(std::ptr::null_mut());

/// Called once in each new worker process before any Python code runs there.
pub fn attach_result_pipe(fd: RawFd) {
    // Leaked on purpose: one small allocation per worker process, valid until it exits.
    let pipe = Box::into_raw(Box::new(ResultPipe {
        fd,
        lock: Mutex::new(()),
    }));
    RESULT_PIPE.store(pipe, Ordering::Release);
}

fn result_pipe() -> Option<&'static ResultPipe> {
    unsafe { RESULT_PIPE.load(Ordering::Acquire).as_ref() }
}

pub fn send(fd: RawFd, kind: u8, id: u64, aux: u64, payload: &[u8]) -> std::io::Result<()> {
    let header = Header {
        kind,
        len: u32::try_from(payload.len())
            .map_err(|_| std::io::Error::other("frame payload over 4 GiB"))?,
        id,
        aux,
    }
    .encode();
    let _whole_frame = result_pipe()
        .filter(|pipe| pipe.fd == fd)
        .map(|pipe| pipe.lock.lock().unwrap_or_else(|e| e.into_inner()));
    frame::write_all(fd, &[&header, payload])
}

/// Send a pickled log record to the parent. Returns false outside a worker process.
pub fn send_log(record: &[u8]) -> std::io::Result<bool> {
    match result_pipe() {
        Some(pipe) => send(pipe.fd, kind::LOG, 0, 0, record).map(|()| true),
        None => Ok(false),
    }
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

/// How long a worker that ran out of tasks polls for the next one before it sleeps: enough for
/// a caller's next `apply` (or rpool-io's next batch) to find it awake.
const NEXT_TASK_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Callables of earlier tasks sent with `TASK_REUSABLE`, by their pickled bytes: a function
/// sent by name is looked up (module import, attribute walk) once per worker, not once per task.
struct Callables<'py> {
    loads: Option<Bound<'py, PyAny>>,
    known: HashMap<Vec<u8>, Bound<'py, PyAny>>,
}

impl<'py> Callables<'py> {
    /// Plenty for the functions one program maps; past it the table starts over.
    const MAX: usize = 256;

    fn new(py: Python<'py>) -> Self {
        let loads = py.import("_pickle").and_then(|m| m.getattr("loads")).ok();
        Callables {
            loads,
            known: HashMap::new(),
        }
    }

    /// The callable `pickled` names, or None if it cannot be unpickled here.
    fn get(
        &mut self,
        py: Python<'py>,
        pickled: &[u8],
        reusable: bool,
    ) -> Option<Bound<'py, PyAny>> {
        if let Some(func) = self.known.get(pickled) {
            return Some(func.clone());
        }
        let func = self
            .loads
            .as_ref()?
            .call1((PyBytes::new(py, pickled),))
            .ok()?;
        if reusable {
            if self.known.len() >= Self::MAX {
                self.known.clear();
            }
            self.known.insert(pickled.to_vec(), func.clone());
        }
        Some(func)
    }
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
    let mut callables = Callables::new(py);
    loop {
        // Block without the GIL so that threads the task code started keep running.
        match py.detach(|| reader.wait_frame_spinning(task_pipe, NEXT_TASK_SPIN)) {
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
        let started = Instant::now();
        let callable_len = (header.aux & frame::TASK_CALLABLE_LEN) as usize;
        let called = if callable_len == 0 {
            execute.call1((PyBytes::new(py, body),))
        } else {
            let (pickled, args) = body.split_at(callable_len.min(body.len()));
            let reusable = header.aux & frame::TASK_REUSABLE != 0;
            match callables.get(py, pickled, reusable) {
                Some(func) => execute.call1((PyBytes::new(py, args), func)),
                // execute() unpickles it again, under its guard, to report why it cannot be.
                None => {
                    execute.call1((PyBytes::new(py, args), py.None(), PyBytes::new(py, pickled)))
                }
            }
        };
        let (ok, data) = match called.and_then(|r| r.extract::<(bool, Bound<'_, PyBytes>)>()) {
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
