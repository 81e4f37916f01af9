//! The Python face of the core: thin `#[pymethods]` over `pool::Core` and `job::Job`,
//! the fork launcher (it needs the GIL), the callbacks thread and the exec'd worker's entry point.

use crate::child;
use crate::forkserver::{self, ForkServerLauncher};
use crate::frame::{kind, FrameReader};
use crate::job::{self, Outcome};
use crate::launch::{
    self, die_with_parent, worker_pipes, ExecLauncher, EXEC_MEMFD_FD, EXEC_RESULT_FD, EXEC_TASK_FD,
};
use crate::pool::{Callable, Core, Launch, Launched, Lifecycle, PoolConfig, SubmitError, TaskPart};
use crate::threads::{self, Next};
use crossbeam::channel::Receiver;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Waits release the GIL in slices this long, then run Python's signal handlers (Ctrl-C).
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Block until `ready(slice)` says so or `timeout` (seconds) passes, with the GIL released and
/// KeyboardInterrupt delivered between slices. Every blocking wait in rpool goes through here.
fn wait_interruptibly(
    py: Python<'_>,
    timeout: Option<f64>,
    ready: impl Fn(Duration) -> bool + Sync,
) -> PyResult<bool> {
    let deadline = match timeout {
        Some(t) if t.is_nan() => {
            return Err(PyValueError::new_err("timeout must be a number, not NaN"))
        }
        Some(t) => Some(Instant::now() + Duration::from_secs_f64(t.clamp(0.0, 1e9))),
        None => None,
    };
    loop {
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
            None => WAIT_SLICE,
        };
        if py.detach(|| ready(slice)) {
            return Ok(true);
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

/// How long `get()` polls for a result before it sleeps (with the GIL released): a result due
/// within it arrives without the wake-up of a sleeping thread, which costs tens of
/// microseconds where an idle virtual CPU halts. imap's waits do not poll: there the CPU is
/// better left to the workers.
const RESULT_SPIN: Duration = Duration::from_micros(50);

/// Poll `done` for up to RESULT_SPIN (less if `timeout` is shorter), yielding between looks.
fn spin_until(py: Python<'_>, timeout: Option<f64>, done: impl Fn() -> bool + Sync) -> bool {
    if done() {
        return true;
    }
    let spin = match timeout {
        Some(t) if t.is_nan() || t <= 0.0 => return false,
        Some(t) => RESULT_SPIN.min(Duration::from_secs_f64(t.min(1.0))),
        None => RESULT_SPIN,
    };
    py.detach(|| crate::frame::spin_until(spin, &done))
}

/// The memfd an rpool._shm payload (a `bytes` subclass with an `fd`) refers to, taken over:
/// the attribute is reset so that the payload no longer closes it.
fn take_shared_fd(payload: &Bound<'_, PyAny>) -> PyResult<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let Ok(fd) = payload.getattr("fd") else {
        return Ok(None);
    };
    let fd: RawFd = fd.extract()?;
    if fd < 0 {
        return Ok(None);
    }
    payload.setattr("fd", -1)?;
    Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

fn not_running() -> PyErr {
    PyValueError::new_err("Pool not running")
}

impl From<SubmitError> for PyErr {
    fn from(e: SubmitError) -> PyErr {
        match e {
            SubmitError::NotRunning => not_running(),
        }
    }
}

/// A task time limit given in seconds from Python.
pub(crate) fn time_limit(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        Some(t) if !(t > 0.0 && t < 1e9) => Err(PyValueError::new_err(format!(
            "a task time limit must be a positive number of seconds, not {t}"
        ))),
        Some(t) => Ok(Some(Duration::from_secs_f64(t))),
        None => Ok(None),
    }
}

/// Hand workers' log records to `sink(list[bytes])` on the calling thread (rpool-io).
fn python_log_sink(sink: Py<PyAny>) -> crate::pool::LogSink {
    Box::new(move |records| {
        Python::attach(|py| {
            let records: Vec<Bound<'_, PyBytes>> =
                records.iter().map(|r| PyBytes::new(py, r)).collect();
            if let Err(e) = sink.call1(py, (records,)) {
                // The sink guards handler errors itself; this is a bug in rpool.
                e.print(py);
            }
        })
    })
}

/// A result slot, shared with the core. Python's `AsyncResult` wraps one.
#[pyclass(frozen, module = "rpool._rpool", name = "Job")]
pub struct PyJob {
    pub(crate) inner: Arc<job::Job>,
}

#[pymethods]
impl PyJob {
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }

    fn ready(&self) -> bool {
        self.inner.is_ready()
    }

    /// Wait until the job is ready (all parts in, callbacks run). Returns whether it is.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let job = &self.inner;
        if spin_until(py, timeout, || job.is_ready()) {
            return Ok(true);
        }
        wait_interruptibly(py, timeout, |slice| {
            job.wait_for_whole(slice, |v| v.ready())
        })
    }

    /// Wait until part `part` has an outcome.
    #[pyo3(signature = (part, timeout=None))]
    fn wait_part(&self, py: Python<'_>, part: usize, timeout: Option<f64>) -> PyResult<bool> {
        let job = &self.inner;
        wait_interruptibly(py, timeout, |slice| {
            job.wait_for(slice, |v| v.part_done(part) || v.beyond(part))
        })
    }

    /// Wait until every part has an outcome (callbacks may not have run yet).
    #[pyo3(signature = (timeout=None))]
    fn wait_complete(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let job = &self.inner;
        wait_interruptibly(py, timeout, |slice| {
            job.wait_for_whole(slice, |v| v.complete())
        })
    }

    /// Wait until some finished part was not yet popped, or every part was popped.
    #[pyo3(signature = (timeout=None))]
    fn wait_any(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let job = &self.inner;
        wait_interruptibly(py, timeout, |slice| {
            job.wait_for(slice, |v| v.any_unpopped() || v.exhausted())
        })
    }

    /// Wait until more than `count` parts have finished, or every part has.
    #[pyo3(signature = (count, timeout=None))]
    fn wait_finished(&self, py: Python<'_>, count: usize, timeout: Option<f64>) -> PyResult<bool> {
        let job = &self.inner;
        wait_interruptibly(py, timeout, |slice| job.wait_count(slice, count + 1))
    }

    /// The parts that finished after the first `start` ones, in finishing order (for progress bars).
    #[pyo3(signature = (start=0))]
    fn finished_parts(&self, start: usize) -> Vec<usize> {
        self.inner.finished_since(start)
    }

    fn pop_finished(&self) -> Option<usize> {
        self.inner.pop_finished()
    }

    /// The outcome of part `part` as `(kind, data)`: 0 value (pickle), 1 raised (pickle),
    /// 2 worker lost, 3 terminated, 4 timed out (messages), 5 cancelled (None), 6 value (the
    /// object), 7 raised (the exception object), 8 value and 9 raised as `(pickle, memfd)`
    /// (rpool._shm; the caller closes the memfd, -1 if it could not be duplicated). `None` if not there (or already taken).
    fn take(&self, py: Python<'_>, part: usize) -> Option<(u8, Py<PyAny>)> {
        self.inner
            .take(part)
            .map(|outcome| outcome_for_python(py, outcome))
    }

    /// Part `part`'s outcome decoded: `(True, value)` for a value, unpickled here (what nearly
    /// every task returns), `(False, exception)` if unpickling it raised; any other outcome is
    /// handed to `other(kind, data)` (as `take` gives them) and its answer returned. `None` if
    /// not there (or already taken).
    fn decode(
        &self,
        py: Python<'_>,
        part: usize,
        other: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some(outcome) = self.inner.take(part) else {
            return Ok(None);
        };
        let decoded = match outcome {
            Outcome::Value(pickled) => match crate::quick::loads(py, &pickled) {
                Ok(value) => (true, value.unbind()),
                Err(e) => (false, e.into_value(py).into_any()),
            }
            .into_pyobject(py)?
            .into_any()
            .unbind(),
            outcome => other.call1(outcome_for_python(py, outcome))?.unbind(),
        };
        Ok(Some(decoded))
    }

    /// Write to `fd` (a non-blocking eventfd, duplicated here) whenever a part finishes or the
    /// job becomes ready; `token` names the waiter so it registers once.
    fn add_waker(&self, token: u64, fd: RawFd) -> PyResult<()> {
        let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        self.inner.add_waker(token, owned);
        Ok(())
    }

    fn total(&self) -> Option<usize> {
        self.inner.total()
    }

    fn mark_ready(&self) {
        self.inner.mark_ready();
    }

    /// What the job runs (`module.function`), or "".
    #[getter]
    fn label(&self) -> &str {
        &self.inner.label
    }

    /// Seconds each part may run, if limited.
    #[getter]
    fn time_limit(&self) -> Option<f64> {
        self.inner.time_limit.map(|d| d.as_secs_f64())
    }

    /// How messages name part `part` (`module.function (chunk 2 of 5)`).
    fn describe_part(&self, part: usize) -> String {
        self.inner.describe_part(part)
    }
}

/// An outcome as `Job.take` hands it to Python: `(kind, data)`.
fn outcome_for_python(py: Python<'_>, outcome: Outcome) -> (u8, Py<PyAny>) {
    match outcome {
        Outcome::Value(b) => (0, PyBytes::new(py, &b).into_any().unbind()),
        Outcome::Raised(b) => (1, PyBytes::new(py, &b).into_any().unbind()),
        Outcome::WorkerLost(m) => (2, m.into_pyobject(py).unwrap().into_any().unbind()),
        Outcome::Terminated(m) => (3, m.into_pyobject(py).unwrap().into_any().unbind()),
        Outcome::TimedOut(m) => (4, m.into_pyobject(py).unwrap().into_any().unbind()),
        Outcome::Cancelled => (5, py.None()),
        Outcome::Object { ok, value } => {
            let object = value
                .0
                .downcast_ref::<Py<PyAny>>()
                .map_or_else(|| py.None(), |o| o.clone_ref(py));
            (if ok { 6 } else { 7 }, object)
        }
        Outcome::Shared {
            ok,
            pickle,
            buffers,
        } => {
            // The caller gets its own descriptor to read the buffers from and close.
            let fd = unsafe { libc::fcntl(buffers.0.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            let data = (PyBytes::new(py, &pickle), fd);
            (
                if ok { 8 } else { 9 },
                data.into_pyobject(py).unwrap().into_any().unbind(),
            )
        }
    }
}

/// The items of decoded chunks an `imap` iterator hands out. `__next__` pops one here, without
/// running any Python code, and calls the Python subclass's `_refill()` only when none is left:
/// a Python `__next__` per item cost more than the rest of `imap_unordered` of tiny tasks.
/// Chunks are kept as the lists they were decoded to, with the index of the next item: queueing
/// one costs the same whatever its length.
#[pyclass(frozen, subclass, module = "rpool._rpool")]
pub struct ItemQueue {
    items: Mutex<QueuedChunks>,
    /// For `imap_unordered` in chunks: its job, and what to call per part yielded. With it,
    /// `__next__` decodes a chunk that finished with a value itself, without `_refill`.
    source: std::sync::OnceLock<(Arc<job::Job>, Py<PyAny>)>,
}

#[derive(Default)]
struct QueuedChunks {
    chunks: std::collections::VecDeque<Py<PyList>>,
    /// Index of the next item of the front chunk.
    next: usize,
}

#[pymethods]
impl ItemQueue {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(
        _args: &Bound<'_, pyo3::types::PyTuple>,
        _kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> Self {
        ItemQueue {
            items: Mutex::new(QueuedChunks::default()),
            source: std::sync::OnceLock::new(),
        }
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let queue = slf.get();
        if let Some(item) = queue.pop(py) {
            return Ok(item);
        }
        if queue.refill_from_source(py)? {
            if let Some(item) = queue.pop(py) {
                return Ok(item);
            }
        }
        slf.call_method0("_refill").map(Bound::unbind)
    }

    /// Let `__next__` decode the chunks of `job` that finished with a value, in finishing
    /// order, calling `part_yielded()` after each; errors, waits and the end stay `_refill`'s.
    fn _decode_finished_chunks(&self, job: &PyJob, part_yielded: Py<PyAny>) {
        let _ = self.source.set((job.inner.clone(), part_yielded));
    }

    /// Queue the items of `chunk` behind those left.
    fn _extend(&self, chunk: &Bound<'_, PyAny>) -> PyResult<()> {
        // A decoded chunk is a list no one else holds: kept as it is. Any other iterable is copied.
        let list = match chunk.downcast_exact::<PyList>() {
            Ok(list) => list.clone(),
            Err(_) => PyList::new(chunk.py(), chunk.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
        };
        if !list.is_empty() {
            self.lock().chunks.push_back(list.unbind());
        }
        Ok(())
    }

    /// The next queued item, or `default` if none is left.
    fn _pop(&self, py: Python<'_>, default: Py<PyAny>) -> Py<PyAny> {
        self.pop(py).unwrap_or(default)
    }

    fn _has_items(&self) -> bool {
        !self.lock().chunks.is_empty()
    }
}

impl ItemQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueuedChunks> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue the next chunk that finished with a value, if there is one (see `source`).
    /// Returns whether it queued one; an error is the chunk's own (it could not be unpickled).
    fn refill_from_source(&self, py: Python<'_>) -> PyResult<bool> {
        let Some((job, part_yielded)) = self.source.get() else {
            return Ok(false);
        };
        let Some(pickled) = job.take_next_value() else {
            return Ok(false);
        };
        let decoded = crate::quick::loads(py, &pickled);
        // Counted as yielded, as `_refill` counts a part, before its items or its error go out.
        part_yielded.call0(py)?;
        self._extend(&decoded?)?;
        Ok(true)
    }

    fn pop(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let mut queued = self.lock();
        let next = queued.next;
        let front = queued.chunks.front()?.bind(py);
        let (item, len) = (front.get_item(next).ok()?.unbind(), front.len());
        queued.next += 1;
        if queued.next >= len {
            queued.chunks.pop_front();
            queued.next = 0;
        }
        Some(item)
    }
}

/// The fork start method: fork this interpreter (see `launch.rs` for why that is safe) and run `bootstrap(number) -> (execute, max_tasks, max_memory)` in the child.
struct ForkLauncher {
    bootstrap: Mutex<Option<Py<PyAny>>>,
}

impl Launch for ForkLauncher {
    fn launch(&self, number: u64) -> io::Result<Launched> {
        let pipes = worker_pipes()?;
        let pid = Python::attach(|py| {
            let bootstrap = self
                .bootstrap
                .lock()
                .unwrap()
                .as_ref()
                .map(|b| b.clone_ref(py));
            let Some(bootstrap) = bootstrap else {
                return Err(io::Error::other("pool is shutting down"));
            };
            let parent_ends = [
                pipes.task_w.as_raw_fd(),
                pipes.result_r.as_raw_fd(),
                pipes.memfd_r.as_raw_fd(),
            ];
            fork_worker(
                py,
                (
                    pipes.task_r.as_raw_fd(),
                    pipes.result_w.as_raw_fd(),
                    pipes.memfd_w.as_raw_fd(),
                ),
                || {
                    parent_ends.iter().for_each(|&fd| unsafe {
                        libc::close(fd);
                    })
                },
                |py| bootstrap.call1(py, (number,)).map(|r| r.into_bound(py)),
            )
        })?;
        Ok(Launched {
            pid,
            task_fd: pipes.task_w,
            result_fd: pipes.result_r,
            memfd_fd: pipes.memfd_r,
            preamble: Vec::new(),
            pidfd: None,
        })
    }

    fn release(&self) {
        Python::attach(|_py| drop(self.bootstrap.lock().unwrap().take()));
    }
}

/// Fork a worker from this interpreter (`launch.rs` says why that is safe) and return its pid.
/// The child runs `in_child` (closing what it must not keep), dies with the forking thread,
/// serves tasks on `(task_fd, result_fd)` and exits; it never returns here.
fn fork_worker<'py>(
    py: Python<'py>,
    (task_fd, result_fd, memfd_fd): (RawFd, RawFd, RawFd),
    in_child: impl FnOnce(),
    bootstrap: impl FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>>,
) -> io::Result<i32> {
    let parent = std::process::id() as libc::pid_t;
    unsafe { ffi::PyOS_BeforeFork() };
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { ffi::PyOS_AfterFork_Child() };
        die_with_parent(parent);
        in_child();
        let fds = (task_fd, result_fd, memfd_fd);
        let code = run_child(py, fds, &mut FrameReader::new(), bootstrap);
        unsafe { libc::_exit(code) }
    }
    unsafe { ffi::PyOS_AfterFork_Parent() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Read the two start-up frames (spawn preparation data, worker setup) an exec'd process gets
/// before anything else. Returns the worker number they carry, or `None` at EOF.
fn read_config<'py>(
    py: Python<'py>,
    reader: &mut FrameReader,
    fd: RawFd,
) -> PyResult<Option<(u64, [Bound<'py, PyBytes>; 2])>> {
    let pipe = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut number = 0;
    let mut parts = Vec::with_capacity(2);
    while parts.len() < 2 {
        if !py.detach(|| reader.wait_frame(pipe))? {
            return Ok(None);
        }
        let (h, body) = reader.next_frame().expect("frame buffered");
        if h.kind != kind::CONFIG {
            return Err(PyOSError::new_err(
                "rpool: expected start-up data before anything else",
            ));
        }
        number = h.id;
        parts.push(PyBytes::new(py, body));
    }
    let [prep, setup]: [Bound<'py, PyBytes>; 2] = parts.try_into().expect("two parts");
    Ok(Some((number, [prep, setup])))
}

/// Run a worker: bootstrap (initializer included), serve tasks, then the stdlib's exit steps.
fn run_child<'py>(
    py: Python<'py>,
    (task_fd, result_fd, memfd_fd): (RawFd, RawFd, RawFd),
    reader: &mut FrameReader,
    bootstrap: impl FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>>,
) -> i32 {
    child::attach_result_pipe(result_fd);
    // Where rpool._shm sends the memfds of large results.
    if let Err(e) = py
        .import("rpool._shm")
        .and_then(|shm| shm.setattr("result_socket", memfd_fd))
    {
        e.print(py);
    }
    let booted =
        bootstrap(py).and_then(|r| r.extract::<(Bound<'py, PyAny>, Option<u64>, Option<u64>)>());
    let code = match booted {
        Ok((execute, max_tasks, max_memory)) => {
            let limits = child::Limits {
                max_tasks,
                max_memory,
            };
            child::serve(py, reader, task_fd, result_fd, &execute, limits)
        }
        Err(err) => {
            child::report_init_failure(py, result_fd, err);
            1
        }
    };
    if let Err(e) = py
        .import("rpool._worker")
        .and_then(|w| w.call_method0("exit_worker"))
    {
        e.print(py);
    }
    code
}

/// Entry point of an exec'd worker (`spawn`): read the start-up frames from the task pipe, let
/// the stdlib's spawn preparation rebuild `sys.path` and `__main__`, then serve. Returns the exit code.
#[pyfunction]
pub fn worker_main(py: Python<'_>) -> PyResult<i32> {
    die_with_exec_parent(py)?;
    let mut reader = FrameReader::new();
    let Some((number, [prep, setup])) = read_config(py, &mut reader, EXEC_TASK_FD)? else {
        return Ok(0);
    };
    let worker = py.import("rpool._worker")?;
    if let Err(err) = worker.call_method1("prepare", (&prep,)) {
        // Re-running the main module failed (e.g. it makes a pool without a main guard).
        child::report_init_failure(py, EXEC_RESULT_FD, err);
        return Ok(1);
    }
    Ok(run_child(
        py,
        (EXEC_TASK_FD, EXEC_RESULT_FD, EXEC_MEMFD_FD),
        &mut reader,
        |_py| worker.call_method1("bootstrap_spawned", (&setup, number)),
    ))
}

/// See `launch::exec_with_fds`: the starting process's pid is the last of `sys.argv` (until
/// `prepare` sets the parent's).
fn die_with_exec_parent(py: Python<'_>) -> PyResult<()> {
    let argv: Vec<String> = py.import("sys")?.getattr("argv")?.extract()?;
    launch::die_with_exec_parent(&argv);
    Ok(())
}

/// Entry point of the `forkserver` server process: prepare `__main__` and the worker setup once,
/// then fork one worker per request from the pool (see `forkserver.rs`). Returns the exit code.
#[pyfunction]
pub fn forkserver_main(py: Python<'_>) -> PyResult<i32> {
    die_with_exec_parent(py)?;
    let mut reader = FrameReader::new();
    let Some((_, [prep, setup])) = read_config(py, &mut reader, forkserver::SERVER_CONFIG_FD)?
    else {
        return Ok(1);
    };
    unsafe { libc::close(forkserver::SERVER_CONFIG_FD) };
    let worker = py.import("rpool._worker")?;
    worker.call_method1("prepare", (&prep,))?;
    let setup = worker.call_method1("load_setup", (&setup,))?;
    let sigfd = forkserver::sigchld_fd()?;
    let sock = forkserver::SERVER_SOCK_FD;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        py.detach(|| unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) });
        if fds[1].revents != 0 {
            forkserver::report_exits(sock, sigfd.as_raw_fd());
        }
        if fds[0].revents == 0 {
            continue;
        }
        let Some((request, pipe_ends)) = forkserver::recv_msg(sock)? else {
            return Ok(0); // the pool is gone
        };
        if request.kind != forkserver::SPAWN || pipe_ends.len() != 3 {
            continue;
        }
        let number = request.id;
        let ends = (
            pipe_ends[0].as_raw_fd(),
            pipe_ends[1].as_raw_fd(),
            pipe_ends[2].as_raw_fd(),
        );
        let in_child = || {
            forkserver::unblock_sigchld();
            unsafe {
                libc::close(sock);
                libc::close(sigfd.as_raw_fd());
            }
        };
        let bootstrap = |_py| worker.call_method1("bootstrap_forked", (&setup, number));
        // pid 0 tells the pool the fork failed. The pidfd is opened before this loop can reap the
        // worker, so the pool can watch it even if it has already exited.
        let pid = fork_worker(py, ends, in_child, bootstrap).unwrap_or(0);
        drop(pipe_ends);
        let pidfd = (pid > 0)
            .then(|| crate::pool::pidfd_open(pid).ok())
            .flatten();
        let reply = crate::frame::Header {
            kind: forkserver::SPAWNED,
            len: 0,
            id: number,
            aux: pid as u64,
        };
        let fds: Vec<RawFd> = pidfd.iter().map(|fd| fd.as_raw_fd()).collect();
        forkserver::send_msg(sock, reply, &fds)?;
    }
}

/// The core's `log` records go to Python's logging, under the logger name "rpool", through
/// pyo3-log, whose levels are cached (a disabled record costs no GIL); each new pool clears the
/// cache (`reset_log_cache`).
///
/// pyo3-log imports Python's logging, a good part of a pool's start-up (and of an exec'd
/// worker's, which never logs through it). So it is made only once the program has imported
/// logging itself, or for the first warning or error, which Python's logging shows even
/// unconfigured. Until then, records below WARNING are dropped: no one can have asked for them.
struct DeferredLogger {
    inner: std::sync::OnceLock<pyo3_log::Logger>,
}

static LOGGER: DeferredLogger = DeferredLogger {
    inner: std::sync::OnceLock::new(),
};
static LOGGER_TRIED: AtomicBool = AtomicBool::new(false);

impl DeferredLogger {
    fn start(&self, py: Python<'_>) -> Option<&pyo3_log::Logger> {
        if let Some(logger) = self.inner.get() {
            return Some(logger);
        }
        let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels).ok()?;
        Some(
            self.inner
                .get_or_init(|| logger.filter(log::LevelFilter::Trace)),
        )
    }
}

impl log::Log for DeferredLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        match self.inner.get() {
            Some(logger) => logger.enabled(metadata),
            None => metadata.level() <= log::Level::Warn,
        }
    }

    fn log(&self, record: &log::Record<'_>) {
        let logger = match self.inner.get() {
            Some(logger) => logger,
            None if record.level() <= log::Level::Warn => {
                match Python::attach(|py| self.start(py)) {
                    Some(logger) => logger,
                    None => return,
                }
            }
            None => return,
        };
        logger.log(record);
    }

    fn flush(&self) {}
}

/// Install the core's logger (once), and start pyo3-log if the program uses logging by now.
/// Done by each core made, not when the module is imported.
pub(crate) fn install_logger(py: Python<'_>) -> PyResult<()> {
    // Fails only if some logger is installed already (the embedder's): then it gets the records.
    if !LOGGER_TRIED.swap(true, Ordering::AcqRel) && log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    if LOGGER.inner.get().is_none() && py.import("sys")?.getattr("modules")?.contains("logging")? {
        LOGGER.start(py);
    }
    Ok(())
}

/// Forget the logging levels cached for the core's records, so that a level set since (say
/// `logging.getLogger("rpool").setLevel(logging.DEBUG)`) applies. `Pool()` calls it.
#[pyfunction]
pub fn reset_log_cache(py: Python<'_>) -> PyResult<()> {
    install_logger(py)?;
    if let Some(logger) = LOGGER.inner.get() {
        logger.reset_handle().reset();
    }
    Ok(())
}

/// In a worker: send `record` (a pickled log record) to the pool's `log_sink`, ahead of the
/// result of the task running now. Returns False outside a worker process.
#[pyfunction]
pub fn forward_log(py: Python<'_>, record: &[u8]) -> PyResult<bool> {
    Ok(py.detach(|| child::send_log(record))?)
}

/// Runs callbacks in the parent, one at a time, with the GIL: `deliver(job_ids)` looks the jobs
/// up, calls their callbacks (guarded) and marks them ready.
pub(crate) fn spawn_callbacks_thread(
    rx: Receiver<Arc<job::Job>>,
    deliver: Py<PyAny>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rpool-callbacks".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                Python::attach(|py| {
                    let ids: Vec<u64> = batch.iter().map(|j| j.id).collect();
                    if let Err(e) = deliver.call1(py, (ids,)) {
                        e.print(py);
                    }
                });
                // Whatever deliver() did, no waiter may hang on these jobs.
                for job in batch {
                    job.mark_ready();
                }
            }
            Python::attach(|_py| drop(deliver));
        })
}

fn lifecycle_name(lifecycle: Lifecycle) -> &'static str {
    match lifecycle {
        Lifecycle::Running => "RUN",
        Lifecycle::Closed => "CLOSE",
        Lifecycle::Terminated => "TERMINATE",
    }
}

/// `join()`'s wait: a running pool is an error; else wait (interruptibly) until `finished`.
fn wait_stopped(
    py: Python<'_>,
    lifecycle: Lifecycle,
    timeout: Option<f64>,
    finished: impl Fn(Duration) -> bool + Sync,
) -> PyResult<bool> {
    if lifecycle == Lifecycle::Running {
        return Err(PyValueError::new_err("Pool is still running"));
    }
    wait_interruptibly(py, timeout, finished)
}

/// Join a callbacks thread, unless this is it (a callback may close its own pool).
/// Wait up to `timeout` for a callbacks thread to finish the callbacks it was given, then join
/// it. A callback still running then is left to finish on its own.
fn join_callbacks(
    py: Python<'_>,
    callbacks: &Mutex<Option<JoinHandle<()>>>,
    timeout: Option<f64>,
) -> PyResult<()> {
    let mut slot = callbacks.lock().unwrap();
    let Some(h) = slot.as_ref() else {
        return Ok(());
    };
    if h.thread().id() == std::thread::current().id() {
        return Ok(()); // close/terminate/join called from a callback
    }
    let finished = wait_interruptibly(py, timeout, |slice| {
        let until = Instant::now() + slice;
        while !h.is_finished() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    })?;
    if finished {
        let _ = slot.take().map(JoinHandle::join);
    } else if timeout.is_some() {
        slot.take();
        log::warn!(target: "rpool", "a callback is still running after terminate(); it is left to finish");
    }
    Ok(())
}

/// A fork server started before its pool (`rpool.get_context("forkserver").Pool`), for
/// `PoolCore(forkserver=...)`: it boots while the parent imports the rest of rpool.
#[pyclass(frozen, module = "rpool._rpool")]
pub struct EarlyForkServer {
    server: Mutex<Option<forkserver::StartedServer>>,
}

impl EarlyForkServer {
    fn take(&self) -> Option<forkserver::StartedServer> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[pymethods]
impl EarlyForkServer {
    /// Start `argv` (the server's command line, as the pool would give it). Only on the main
    /// thread: the server's PR_SET_PDEATHSIG follows the thread that started it, and another
    /// may end before the pool does (the pool then starts its server on rpool-supervise).
    #[new]
    fn new(py: Python<'_>, argv: Vec<String>) -> PyResult<Self> {
        launch::check_argv(&argv)?;
        if unsafe { libc::gettid() != libc::getpid() } {
            return Ok(EarlyForkServer {
                server: Mutex::new(None),
            });
        }
        let server = py
            .detach(|| forkserver::StartedServer::start(argv))
            .map_err(|e| PyOSError::new_err(format!("could not start the fork server: {e}")))?;
        Ok(EarlyForkServer {
            server: Mutex::new(Some(server)),
        })
    }

    /// Stop the server if no pool took it.
    fn stop(&self, py: Python<'_>) {
        let unused = self.take();
        py.detach(|| drop(unused));
    }
}

/// An argument that may be omitted: unlike `Option`, an explicit None is kept as given.
pub struct MaybeGiven<'py>(Option<Bound<'py, PyAny>>);

impl<'py> FromPyObject<'py> for MaybeGiven<'py> {
    fn extract_bound(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(MaybeGiven(Some(obj.clone())))
    }
}

/// `Pool.apply_async` for its common case, in one native call: a function that pickles by
/// name, plain-data arguments, no `timeout=`. Each pool puts this object's `apply_async` on
/// itself, where it shadows the method: for tiny tasks, the method's own Python frame was a
/// good part of what a task cost its caller, under the GIL that the callbacks thread needs
/// too. Anything else goes to the method, `Pool.apply_async(pool, ...)`.
#[pyclass(frozen, module = "rpool._rpool")]
pub struct ApplyAsync {
    core: Arc<Core>,
    /// A weak reference to the pool: the pool holds this object.
    pool: Py<PyAny>,
    general: Py<PyAny>,
    /// `rpool.pool._by_name_cache` and `_by_name`, which fills it.
    by_name_cache: Py<PyDict>,
    by_name: Py<PyAny>,
    function_type: Py<PyAny>,
    result_type: Py<PyAny>,
    /// The pool's results that have callbacks, by job id, until the callbacks thread runs them.
    results: Py<PyDict>,
    task_timeout: Option<Duration>,
    min_shared: usize,
}

#[pymethods]
impl ApplyAsync {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        core: PyRef<'_, PoolCore>,
        pool: Py<PyAny>,
        general: Py<PyAny>,
        by_name_cache: Py<PyDict>,
        by_name: Py<PyAny>,
        result_type: Py<PyAny>,
        results: Py<PyDict>,
        task_timeout: Option<f64>,
        min_shared: usize,
    ) -> PyResult<Self> {
        let function_type = py.import("types")?.getattr("FunctionType")?.unbind();
        Ok(ApplyAsync {
            core: core.core.clone(),
            pool,
            general,
            by_name_cache,
            by_name,
            function_type,
            result_type,
            results,
            task_timeout: time_limit(task_timeout)?,
            min_shared,
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (func, args=MaybeGiven(None), kwds=MaybeGiven(None), callback=None, error_callback=None, *, timeout=None))]
    fn apply_async<'py>(
        &self,
        py: Python<'py>,
        func: &Bound<'py, PyAny>,
        args: MaybeGiven<'py>,
        kwds: MaybeGiven<'py>,
        callback: Option<Bound<'py, PyAny>>,
        error_callback: Option<Bound<'py, PyAny>>,
        timeout: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = args.0.unwrap_or_else(|| PyTuple::empty(py).into_any());
        let kwds = kwds.0.unwrap_or_else(|| PyDict::new(py).into_any());
        let none = || py.None().into_bound(py);
        let callback = callback.unwrap_or_else(none);
        let error_callback = error_callback.unwrap_or_else(none);
        if timeout.is_none() {
            if let Some(named) = self.named(py, func)? {
                let (callable, label) = named.extract::<(Bound<'py, PyBytes>, String)>()?;
                if let Some(result) = self.submit(
                    py,
                    &callable,
                    label,
                    &args,
                    &kwds,
                    &callback,
                    &error_callback,
                )? {
                    return Ok(result);
                }
            }
        }
        let pool = self.pool.bind(py).call0()?;
        if pool.is_none() {
            return Err(not_running());
        }
        let kw = PyDict::new(py);
        kw.set_item("timeout", timeout)?;
        self.general.bind(py).call(
            (pool, func, args, kwds, callback, error_callback),
            Some(&kw),
        )
    }
}

impl ApplyAsync {
    /// `(pickle, label)` of `func` sent by name, from `_by_name`'s cache when `func` is a
    /// plain function (other callables are not looked up by hash: some cannot be hashed).
    fn named<'py>(
        &self,
        py: Python<'py>,
        func: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        if func.get_type().is(self.function_type.bind(py)) {
            if let Some(named) = self.by_name_cache.bind(py).get_item(func)? {
                return Ok(Some(named));
            }
        }
        let named = self.by_name.bind(py).call1((func,))?;
        Ok((!named.is_none()).then_some(named))
    }

    /// Pickle `(args, kwds)` straight into the task's frame, make the result and file it
    /// (if it has callbacks) before the task is queued. None, having queued nothing, if the
    /// arguments are not plain data, hold a buffer for shared memory, or the pool is closed.
    #[allow(clippy::too_many_arguments)]
    fn submit<'py>(
        &self,
        py: Python<'py>,
        callable: &Bound<'py, PyBytes>,
        label: String,
        args: &Bound<'py, PyAny>,
        kwds: &Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        error_callback: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let has_callbacks = !callback.is_none() || !error_callback.is_none();
        let queued = crate::quick::with_plain_call(args, kwds, self.min_shared, |payload| {
            let Ok(job) =
                self.core
                    .new_described_job(Some(1), has_callbacks, label, self.task_timeout)
            else {
                return Ok(None); // closed: the method raises the error
            };
            let id = job.id;
            let handle = Bound::new(py, PyJob { inner: job.clone() })?;
            let result = self
                .result_type
                .bind(py)
                .call1((handle, callback, error_callback))?;
            if has_callbacks {
                self.results.bind(py).set_item(id, &result)?;
            }
            let part = TaskPart {
                part: 0,
                callable: Callable::Reusable(callable.as_bytes()),
                payload,
                buffers: None,
            };
            self.core.submit_parts(&job, vec![part])?;
            Ok::<_, PyErr>(Some(result))
        });
        queued.unwrap_or(Ok(None))
    }
}

#[pyclass(frozen, module = "rpool._rpool")]
pub struct PoolCore {
    core: Arc<Core>,
    callbacks: Mutex<Option<JoinHandle<()>>>,
}

impl PoolCore {
    /// Join the core's threads, then wait up to `timeout` for the callbacks thread to finish the
    /// callbacks it was given. A callback still running then is left to finish on its own.
    fn join_threads(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let core = self.core.clone();
        py.detach(|| core.join_threads());
        join_callbacks(py, &self.callbacks, timeout)
    }
}

#[pymethods]
impl PoolCore {
    /// `fork_bootstrap(number) -> (execute, max_tasks, max_memory)` for fork; `exec_argv` and
    /// `exec_preamble` (two pickles: spawn preparation data, worker setup) for spawn, where
    /// `exec_argv` starts a worker, and for forkserver, where it starts the fork server.
    /// `log_sink(records: list[bytes])` gets the records workers send with `forward_log`.
    #[new]
    // One argument per pool setting, as the Python constructor passes them.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (processes, start_method, max_tasks_per_child, deliver, fork_bootstrap=None, exec_argv=None, exec_preamble=None, log_sink=None, forkserver=None))]
    fn new(
        py: Python<'_>,
        processes: usize,
        start_method: String,
        max_tasks_per_child: Option<u64>,
        deliver: Py<PyAny>,
        fork_bootstrap: Option<Py<PyAny>>,
        exec_argv: Option<Vec<String>>,
        exec_preamble: Option<Vec<Vec<u8>>>,
        log_sink: Option<Py<PyAny>>,
        forkserver: Option<PyRef<'_, EarlyForkServer>>,
    ) -> PyResult<Self> {
        install_logger(py)?;
        let launcher: Arc<dyn Launch> = match (fork_bootstrap, exec_argv) {
            (Some(b), None) => Arc::new(ForkLauncher {
                bootstrap: Mutex::new(Some(b)),
            }),
            (None, Some(argv)) => {
                launch::check_argv(&argv)?;
                let preamble = exec_preamble.unwrap_or_default();
                if start_method == "forkserver" {
                    let started = forkserver.and_then(|s| s.take());
                    Arc::new(ForkServerLauncher::new(argv, preamble, started))
                } else {
                    Arc::new(ExecLauncher { argv, preamble })
                }
            }
            _ => {
                return Err(PyValueError::new_err(
                    "give exactly one of fork_bootstrap and exec_argv",
                ))
            }
        };
        let config = PoolConfig {
            processes,
            max_tasks_per_child,
            log_sink: log_sink.map(python_log_sink),
        };
        let (core, callbacks_rx) = py
            .detach(|| Core::start(config, launcher))
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let callbacks = spawn_callbacks_thread(callbacks_rx, deliver)?;
        Ok(PoolCore {
            core,
            callbacks: Mutex::new(Some(callbacks)),
        })
    }

    /// A new result slot with `total` parts (`None`: parts are added until `seal`). `label`
    /// names the function in error messages; each part may run `timeout` seconds in a worker.
    #[pyo3(signature = (total, has_callbacks, label=String::new(), timeout=None))]
    fn new_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
        label: String,
        timeout: Option<f64>,
    ) -> PyResult<PyJob> {
        let limit = time_limit(timeout)?;
        Ok(PyJob {
            inner: self
                .core
                .new_described_job(total, has_callbacks, label, limit)?,
        })
    }

    /// Queue part `part` of `job`: `payload` is the pickled `(func, args, kwds)`, or, with
    /// `callable` (the pickled function), the pickled `(args, kwds)`. `reusable`: the worker may
    /// keep the unpickled callable for later tasks (a function sent by name).
    #[pyo3(signature = (job, part, payload, callable=None, reusable=false))]
    fn submit(
        &self,
        job: &PyJob,
        part: usize,
        payload: &Bound<'_, PyAny>,
        callable: Option<&[u8]>,
        reusable: bool,
    ) -> PyResult<()> {
        self.submit_many(job, part, vec![payload.clone()], callable, reusable)
    }

    /// `submit_many` for parts `first` to `first + count - 1` of a map over a range of `length`
    /// items from `start` by `step`, in chunks of `size` items: each part's payload is its
    /// chunk's `((start, stop, step), {})` for `rangestar` (the reusable `callable`), written
    /// here rather than sliced and pickled one by one in Python.
    #[allow(clippy::too_many_arguments)]
    fn submit_range_chunks(
        &self,
        job: &PyJob,
        first: usize,
        start: i64,
        step: i64,
        length: usize,
        size: usize,
        count: usize,
        callable: &[u8],
    ) -> PyResult<()> {
        let bound = |index: usize| {
            i64::try_from(index.min(length))
                .ok()
                .and_then(|i| i.checked_mul(step))
                .and_then(|offset| offset.checked_add(start))
        };
        let payloads = (first..first + count)
            .map(|part| {
                let (lo, hi) = (
                    bound(part.checked_mul(size)?)?,
                    bound((part + 1).checked_mul(size)?)?,
                );
                Some(crate::quick::range_chunk_call(lo, hi, step))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                pyo3::exceptions::PyOverflowError::new_err("range bounds out of 64-bit range")
            })?;
        let parts = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| TaskPart {
                part: first + i,
                callable: Callable::Reusable(callable),
                payload,
                buffers: None,
            })
            .collect();
        Ok(self.core.submit_parts(&job.inner, parts)?)
    }

    /// `submit` for parts `first`, `first + 1`, ... of `job`, one payload each, all with the
    /// same callable: queued together, so that they reach the workers in few writes.
    #[pyo3(signature = (job, first, payloads, callable=None, reusable=false))]
    fn submit_many(
        &self,
        job: &PyJob,
        first: usize,
        payloads: Vec<Bound<'_, PyAny>>,
        callable: Option<&[u8]>,
        reusable: bool,
    ) -> PyResult<()> {
        let callable = match callable {
            None => Callable::InPayload,
            Some(c) if reusable => Callable::Reusable(c),
            Some(c) => Callable::Pickled(c),
        };
        // bytes (what rpool's pickling returns) are read in place: the frame is the only copy.
        let mut copies = Vec::new();
        let mut held = Vec::with_capacity(payloads.len());
        for payload in &payloads {
            match payload.downcast::<PyBytes>() {
                Ok(bytes) => {
                    let buffers = if bytes.is_exact_instance_of::<PyBytes>() {
                        None
                    } else {
                        take_shared_fd(payload)?
                    };
                    held.push((Some(bytes.as_bytes()), buffers));
                }
                Err(_) => {
                    copies.push(PyBuffer::<u8>::get(payload)?.to_vec(payload.py())?);
                    held.push((None, None));
                }
            }
        }
        let mut copied = copies.iter();
        let parts = held
            .into_iter()
            .enumerate()
            .map(|(i, (bytes, buffers))| TaskPart {
                part: first + i,
                callable,
                payload: bytes
                    .unwrap_or_else(|| copied.next().expect("a copy per non-bytes payload")),
                buffers,
            })
            .collect();
        Ok(self.core.submit_parts(&job.inner, parts)?)
    }

    /// Fail part `part` in the parent (its input could not be pickled); `exc` is the pickled error.
    fn fail_part(&self, job: &PyJob, part: usize, exc: Vec<u8>) {
        self.core.fail_part(&job.inner, part, exc);
    }

    fn seal(&self, job: &PyJob, total: usize) {
        self.core.seal(&job.inner, total);
    }

    /// Drop `job`'s parts that no worker has received yet (they end cancelled); returns how many.
    fn cancel(&self, job: &PyJob) -> usize {
        self.core.cancel(&job.inner)
    }

    fn close(&self) {
        self.core.close();
    }

    /// Kill the workers, fail unfinished tasks, and wait (bounded) until the workers are reaped.
    fn terminate(&self, py: Python<'_>) -> PyResult<()> {
        let core = self.core.clone();
        py.detach(|| {
            core.terminate();
            core.wait_finished(Duration::from_secs(10))
        });
        // Callbacks of terminated tasks are not called; only one already running can delay this.
        self.join_threads(py, Some(1.0))
    }

    /// Wait until every worker has exited and every callback has run (after close or terminate).
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let core = &self.core;
        let stopped = wait_stopped(py, core.lifecycle(), timeout, |s| core.wait_finished(s))?;
        if stopped {
            self.join_threads(py, None)?;
        }
        Ok(stopped)
    }

    fn worker_pids(&self) -> Vec<i32> {
        self.core.worker_pids()
    }

    #[getter]
    fn state(&self) -> &'static str {
        lifecycle_name(self.core.lifecycle())
    }

    #[getter]
    fn processes(&self) -> usize {
        self.core.processes()
    }
}

/// The core of `rpool.ThreadPool`: the pool's Python threads take tasks (any Python object,
/// never pickled) with `next_task` and settle them with `complete`; results, callbacks and
/// lifecycle work as in `PoolCore`.
#[pyclass(frozen, module = "rpool._rpool")]
pub struct ThreadCore {
    core: Arc<threads::ThreadCore<Py<PyAny>>>,
    callbacks: Mutex<Option<JoinHandle<()>>>,
}

#[pymethods]
impl ThreadCore {
    /// `threads`: how many pool threads will call `next_task` (each calls `thread_exited` at
    /// the end); `deliver(job_ids)` runs callbacks, as for `PoolCore`.
    #[new]
    fn new(py: Python<'_>, threads: usize, deliver: Py<PyAny>) -> PyResult<Self> {
        install_logger(py)?;
        let (core, rx) = threads::ThreadCore::new(threads);
        Ok(ThreadCore {
            core: Arc::new(core),
            callbacks: Mutex::new(Some(spawn_callbacks_thread(rx, deliver)?)),
        })
    }

    /// As `PoolCore.new_job`; `label` is unused and a time limit is refused: a thread cannot
    /// be stopped.
    #[pyo3(signature = (total, has_callbacks, label=String::new(), timeout=None))]
    fn new_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
        label: String,
        timeout: Option<f64>,
    ) -> PyResult<PyJob> {
        let _ = label;
        if timeout.is_some() {
            return Err(PyValueError::new_err(
                "ThreadPool cannot limit how long a task runs (a thread cannot be stopped)",
            ));
        }
        Ok(PyJob {
            inner: self.core.new_job(total, has_callbacks)?,
        })
    }

    /// Queue part `part` of `job`; `payload` is handed as it is to the thread that runs it.
    fn submit(&self, job: &PyJob, part: usize, payload: Py<PyAny>) -> PyResult<()> {
        Ok(self.core.submit(&job.inner, part, payload)?)
    }

    /// `submit` for parts `first`, `first + 1`, ... of `job`.
    fn submit_many(&self, job: &PyJob, first: usize, payloads: Vec<Py<PyAny>>) -> PyResult<()> {
        for (i, payload) in payloads.into_iter().enumerate() {
            self.core.submit(&job.inner, first + i, payload)?;
        }
        Ok(())
    }

    fn fail_part(&self, job: &PyJob, part: usize, exc: Vec<u8>) {
        self.core.finish(&job.inner, part, Outcome::Raised(exc));
    }

    fn seal(&self, job: &PyJob, total: usize) {
        self.core.seal(&job.inner, total);
    }

    fn cancel(&self, job: &PyJob) -> usize {
        self.core.cancel(&job.inner)
    }

    /// Wait for a task: `(task_id, payload)`, or `None` when the thread should exit.
    #[pyo3(signature = (timeout=None))]
    fn next_task(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(u64, Py<PyAny>)>> {
        let found = Mutex::new(None);
        let core = &self.core;
        let got = wait_interruptibly(py, timeout, |slice| match core.next_task(slice) {
            Next::Run(task) => {
                *found.lock().unwrap() = Some((task.id, task.payload));
                true
            }
            Next::Exit => true,
            Next::Idle => false,
        })?;
        Ok(if got {
            found.into_inner().unwrap()
        } else {
            None
        })
    }

    /// Settle task `task_id` with its return value (`ok`) or the exception it raised.
    fn complete(&self, task_id: u64, ok: bool, value: Py<PyAny>) {
        let value = job::Held(Arc::new(value));
        self.core.complete(task_id, Outcome::Object { ok, value });
    }

    /// A pool thread's initializer failed: queued and later tasks fail with `reason`.
    fn break_pool(&self, reason: String) {
        self.core.break_pool(reason);
    }

    fn thread_exited(&self) {
        self.core.thread_exited();
    }

    fn close(&self) {
        self.core.close();
    }

    /// Fail every unfinished task; `join` then waits for the threads (running tasks finish unheard).
    fn terminate(&self) {
        self.core.terminate();
    }

    /// Wait until every pool thread has exited and every callback has run (after close or terminate).
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let core = &self.core;
        let stopped = wait_stopped(py, core.lifecycle(), timeout, |s| core.wait_finished(s))?;
        if stopped {
            core.stop_callbacks();
            join_callbacks(py, &self.callbacks, None)?;
        }
        Ok(stopped)
    }

    #[getter]
    fn state(&self) -> &'static str {
        lifecycle_name(self.core.lifecycle())
    }
}
