//! Result slots that Python settles itself, for pools whose tasks run where the core does not
//! drive them (`rpool.distributed` runs them on a Dask cluster). They are the same `Job`s, with
//! the same `take()` encoding, waits and callbacks thread as `PoolCore`'s, so `ApplyResult`,
//! `MapResult` and `IMapIterator` behave the same over both.

use crate::bindings::{self, spawn_callbacks_thread, PyJob};
use crate::job::{self, Job, Outcome};
use crossbeam::channel::{unbounded, Sender};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[pyclass(frozen, module = "rpool._rpool")]
pub struct JobBoard {
    next_id: AtomicU64,
    /// Set by `terminate`: jobs completed from then on skip their callbacks, as in `PoolCore`.
    terminated: AtomicBool,
    callbacks_tx: Mutex<Option<Sender<Arc<Job>>>>,
    callbacks: Mutex<Option<JoinHandle<()>>>,
}

impl JobBoard {
    fn job_complete(&self, job: &Arc<Job>) {
        job::deliver(
            &self.callbacks_tx,
            job,
            self.terminated.load(Ordering::SeqCst),
        );
    }
}

#[pymethods]
impl JobBoard {
    /// `deliver(job_ids)` runs on the board's rpool-callbacks thread, as `PoolCore`'s does.
    #[new]
    fn new(py: Python<'_>, deliver: Py<PyAny>) -> PyResult<Self> {
        crate::bindings::install_logger(py)?;
        let (tx, rx) = unbounded();
        let handle = spawn_callbacks_thread(rx, deliver)?;
        Ok(JobBoard {
            next_id: AtomicU64::new(1),
            terminated: AtomicBool::new(false),
            callbacks_tx: Mutex::new(Some(tx)),
            callbacks: Mutex::new(Some(handle)),
        })
    }

    /// A new result slot with `total` parts (`None`: parts are added until `seal`), named
    /// `label` in messages, each part limited to `time_limit` seconds (enforced by the caller).
    #[pyo3(signature = (total, has_callbacks, label=String::new(), time_limit=None))]
    fn new_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
        label: String,
        time_limit: Option<f64>,
    ) -> PyResult<PyJob> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job =
            Job::new(id, total, has_callbacks).described(label, bindings::time_limit(time_limit)?);
        Ok(PyJob {
            inner: Arc::new(job),
        })
    }

    /// Record how part `part` ended, in `take()`'s encoding: kind 0 value and 1 raised carry
    /// pickled bytes, 2 worker lost, 3 terminated and 4 timed out a message. The first outcome of a part wins.
    fn settle(&self, job: &PyJob, part: usize, kind: u8, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let outcome = match kind {
            0 => Outcome::Value(data.downcast::<PyBytes>()?.as_bytes().to_vec()),
            1 => Outcome::Raised(data.downcast::<PyBytes>()?.as_bytes().to_vec()),
            2 => Outcome::WorkerLost(data.extract()?),
            3 => Outcome::Terminated(data.extract()?),
            4 => Outcome::TimedOut(data.extract()?),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "outcome kind must be 0 to 4, not {kind}"
                )))
            }
        };
        if job.inner.complete_part(part, outcome) {
            self.job_complete(&job.inner);
        }
        Ok(())
    }

    /// No more parts for an open job: it has `total`.
    fn seal(&self, job: &PyJob, total: usize) {
        if job.inner.seal(total) {
            self.job_complete(&job.inner);
        }
    }

    /// From now on, jobs that complete are marked ready without running their callbacks.
    fn terminate(&self) {
        self.terminated.store(true, Ordering::SeqCst);
    }

    /// Let the callbacks thread finish what it was given, then wait for it to exit.
    fn close(&self, py: Python<'_>) {
        self.callbacks_tx.lock().unwrap().take();
        let handle = self.callbacks.lock().unwrap().take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                py.detach(|| {
                    let _ = h.join();
                });
            }
        }
    }
}
