//! The core of `rpool.ThreadPool`: a task queue that the pool's own Python threads take tasks
//! from, completing the same result slots (`Job`) as the process pool, with the same lifecycle.
//! No Python here: a task's payload is whatever the bindings put in (`T`).
//!
//! ```text
//!  submit() ──► queue ──next_task()──► pool thread runs it ──complete()──► Job ──► callbacks channel
//! ```

use crate::job::{self, wait_until, Job, Outcome};
use crate::pool::{Lifecycle, SubmitError};
use crossbeam::channel::{unbounded, Receiver, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

const TERMINATED: &str = "the pool was terminated before this task finished";

/// A task as a pool thread gets it.
pub struct Task<T> {
    pub id: u64,
    pub job: Arc<Job>,
    pub part: usize,
    pub payload: T,
}

/// What `next_task` found.
pub enum Next<T> {
    Run(Task<T>),
    /// Nothing yet (the wait timed out).
    Idle,
    /// The pool is closed and drained, or terminated: the thread should exit.
    Exit,
}

struct State<T> {
    lifecycle: Lifecycle,
    queue: VecDeque<Task<T>>,
    /// Tasks a thread took and has not completed: (task id, job, part).
    running: Vec<(u64, Arc<Job>, usize)>,
    open_jobs: usize,
    /// Pool threads that have not exited yet.
    alive: usize,
    /// Set when a thread's initializer failed: queued and later tasks fail with this.
    broken: Option<String>,
}

pub struct ThreadCore<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    next_id: AtomicU64,
    callbacks_tx: Mutex<Option<Sender<Arc<Job>>>>,
}

impl<T> ThreadCore<T> {
    /// A core for `threads` pool threads (started by the caller). Completed jobs with callbacks
    /// come out of the returned channel, as with `pool::Core`.
    pub fn new(threads: usize) -> (ThreadCore<T>, Receiver<Arc<Job>>) {
        let (tx, rx) = unbounded();
        let core = ThreadCore {
            state: Mutex::new(State {
                lifecycle: Lifecycle::Running,
                queue: VecDeque::new(),
                running: Vec::new(),
                open_jobs: 0,
                alive: threads,
                broken: None,
            }),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            callbacks_tx: Mutex::new(Some(tx)),
        };
        (core, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lock().lifecycle
    }

    pub fn new_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
    ) -> Result<Arc<Job>, SubmitError> {
        let mut s = self.lock();
        if s.lifecycle != Lifecycle::Running {
            return Err(SubmitError::NotRunning);
        }
        if total.is_none() {
            s.open_jobs += 1;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Job::new(id, total, has_callbacks)))
    }

    pub fn submit(&self, job: &Arc<Job>, part: usize, payload: T) -> Result<(), SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.lifecycle == Lifecycle::Terminated {
            return Err(SubmitError::NotRunning);
        }
        if let Some(reason) = s.broken.clone() {
            drop(s);
            self.finish(job, part, Outcome::WorkerLost(reason));
            return Ok(());
        }
        let job = job.clone();
        s.queue.push_back(Task {
            id,
            job,
            part,
            payload,
        });
        drop(s);
        self.changed.notify_all();
        Ok(())
    }

    /// Record a part's outcome and hand a completed job on.
    pub fn finish(&self, job: &Arc<Job>, part: usize, outcome: Outcome) {
        if job.complete_part(part, outcome) {
            job::deliver(
                &self.callbacks_tx,
                job,
                self.lifecycle() == Lifecycle::Terminated,
            );
        }
    }

    pub fn seal(&self, job: &Arc<Job>, total: usize) {
        let complete = job.seal(total);
        {
            let mut s = self.lock();
            s.open_jobs = s.open_jobs.saturating_sub(1);
        }
        self.changed.notify_all();
        if complete {
            job::deliver(
                &self.callbacks_tx,
                job,
                self.lifecycle() == Lifecycle::Terminated,
            );
        }
    }

    /// Wait up to `timeout` for a task; the thread then runs it and calls `complete`.
    pub fn next_task(&self, timeout: Duration) -> Next<T> {
        let s = self.lock();
        let (mut s, _) = wait_until(s, &self.changed, timeout, |s| {
            !s.queue.is_empty() || Self::drained(s)
        });
        if s.lifecycle == Lifecycle::Terminated {
            return Next::Exit;
        }
        match s.queue.pop_front() {
            Some(task) => {
                s.running.push((task.id, task.job.clone(), task.part));
                Next::Run(task)
            }
            None if Self::drained(&s) => Next::Exit,
            None => Next::Idle,
        }
    }

    fn drained(s: &State<T>) -> bool {
        s.lifecycle == Lifecycle::Terminated
            || (s.lifecycle == Lifecycle::Closed && s.queue.is_empty() && s.open_jobs == 0)
    }

    /// A pool thread finished task `id` (a task cut short by terminate keeps its first outcome).
    pub fn complete(&self, id: u64, outcome: Outcome) {
        let entry = {
            let mut s = self.lock();
            let pos = s.running.iter().position(|(t, _, _)| *t == id);
            pos.map(|p| s.running.swap_remove(p))
        };
        if let Some((_, job, part)) = entry {
            self.finish(&job, part, outcome);
        }
    }

    /// Drop `job`'s queued parts (they end as `Outcome::Cancelled`); returns how many.
    pub fn cancel(&self, job: &Arc<Job>) -> usize {
        let dropped: VecDeque<Task<T>> = {
            let mut s = self.lock();
            let (mine, rest) = std::mem::take(&mut s.queue)
                .into_iter()
                .partition(|t| Arc::ptr_eq(&t.job, job));
            s.queue = rest;
            mine
        };
        self.changed.notify_all();
        let n = dropped.len();
        for task in dropped {
            self.finish(&task.job, task.part, Outcome::Cancelled);
        }
        n
    }

    /// A thread's initializer failed: fail what is queued and everything submitted later.
    pub fn break_pool(&self, reason: String) {
        let failed: Vec<Task<T>> = {
            let mut s = self.lock();
            s.broken.get_or_insert(reason.clone());
            s.queue.drain(..).collect()
        };
        for task in failed {
            self.finish(&task.job, task.part, Outcome::WorkerLost(reason.clone()));
        }
    }

    pub fn close(&self) {
        let mut s = self.lock();
        if s.lifecycle == Lifecycle::Running {
            s.lifecycle = Lifecycle::Closed;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Fail every unfinished task (threads cannot be killed: running ones finish, unheard).
    pub fn terminate(&self) {
        let (queued, running) = {
            let mut s = self.lock();
            s.lifecycle = Lifecycle::Terminated;
            let queued: Vec<_> = s.queue.drain(..).map(|t| (t.job, t.part)).collect();
            let running: Vec<_> = s.running.drain(..).map(|(_, j, p)| (j, p)).collect();
            (queued, running)
        };
        self.changed.notify_all();
        for (job, part) in queued.into_iter().chain(running) {
            self.finish(&job, part, Outcome::Terminated(TERMINATED.into()));
        }
    }

    /// A pool thread exited.
    pub fn thread_exited(&self) {
        let mut s = self.lock();
        s.alive = s.alive.saturating_sub(1);
        drop(s);
        self.changed.notify_all();
    }

    /// True once the pool is closed or terminated and every pool thread has exited.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        wait_until(self.lock(), &self.changed, timeout, |s| {
            s.lifecycle != Lifecycle::Running && s.alive == 0
        })
        .1
    }

    /// Close the callbacks channel (after `wait_finished`), so the callbacks thread ends.
    pub fn stop_callbacks(&self) {
        self.callbacks_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_thread(core: Arc<ThreadCore<u32>>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            match core.next_task(Duration::from_millis(20)) {
                Next::Run(t) => core.complete(t.id, Outcome::Value(vec![t.payload as u8 * 2])),
                Next::Idle => {}
                Next::Exit => break core.thread_exited(),
            }
        })
    }

    #[test]
    fn threads_complete_parts_then_exit_after_close() {
        let (core, _rx) = ThreadCore::new(2);
        let core = Arc::new(core);
        let job = core.new_job(Some(4), false).unwrap();
        for i in 0..4 {
            core.submit(&job, i, i as u32).unwrap();
        }
        let threads: Vec<_> = (0..2).map(|_| run_thread(core.clone())).collect();
        assert!(job.wait_for(Duration::from_secs(5), |v| v.ready()));
        assert!((0..4).all(|i| job.take(i) == Some(Outcome::Value(vec![i as u8 * 2]))));
        core.close();
        assert!(core.wait_finished(Duration::from_secs(5)));
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    #[test]
    fn cancel_and_terminate_end_every_part() {
        let (core, _rx) = ThreadCore::<u32>::new(0);
        let job = core.new_job(Some(2), false).unwrap();
        core.submit(&job, 0, 0).unwrap();
        core.submit(&job, 1, 1).unwrap();
        let Next::Run(first) = core.next_task(Duration::ZERO) else {
            panic!("a task was queued")
        };
        assert_eq!(core.cancel(&job), 1);
        core.terminate();
        assert!(job.is_ready());
        assert!(matches!(job.take(0), Some(Outcome::Terminated(_))));
        assert_eq!(job.take(1), Some(Outcome::Cancelled));
        core.complete(first.id, Outcome::Value(vec![]));
        assert!(matches!(core.next_task(Duration::ZERO), Next::Exit));
        assert!(core.wait_finished(Duration::ZERO));
    }
}
