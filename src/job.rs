//! Result slots: one `Job` per submission (`apply`: one part; `map`: one part per chunk;
//! `imap`: parts added as the input is read). Completed by the pool's threads, read by callers.

use crossbeam::channel::Sender;
use std::any::Any;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How one part (task) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pickled return value.
    Value(Vec<u8>),
    /// The pickled exception (with its remote traceback) the task raised.
    Raised(Vec<u8>),
    /// The worker running the task died; the text says which worker, how, and what it ran.
    WorkerLost(String),
    /// The pool was terminated before the task finished.
    Terminated(String),
    /// The task ran past its time limit; its worker was killed. The text says which and how long.
    TimedOut(String),
    /// Cancelled while still queued: it never ran.
    Cancelled,
    /// A result kept as the object itself, never pickled (thread pools): the return value, or
    /// the exception raised when `ok` is false.
    Object { ok: bool, value: Held },
    /// A pickled return value (`ok`) or exception whose large buffers are in `buffers`, a
    /// memfd the worker sent along (see rpool._shm).
    Shared {
        ok: bool,
        pickle: Vec<u8>,
        buffers: SharedFd,
    },
}

/// A descriptor shared by clones of an outcome; closed when the last one goes.
#[derive(Clone)]
pub struct SharedFd(pub Arc<OwnedFd>);

impl std::fmt::Debug for SharedFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedFd({})", self.0.as_raw_fd())
    }
}

impl PartialEq for SharedFd {
    fn eq(&self, other: &SharedFd) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedFd {}

/// An object owned by whoever completes the part (a Python object, for the bindings).
#[derive(Clone)]
pub struct Held(pub Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held(..)")
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Held {}

/// One part's place in a job.
enum Slot {
    Pending,
    Done(Outcome),
    /// Finished, and its outcome was handed out.
    Taken,
}

#[derive(Default)]
struct Parts {
    /// Every part below `base` finished and was taken; their slots are gone, so a long `imap`
    /// read as it goes keeps only the parts not yet read.
    base: usize,
    /// Part `base + i` is `slots[i]`.
    slots: VecDeque<Slot>,
    /// Parts finished so far (taken ones included).
    finished: usize,
    /// Known once no more parts will be added.
    total: Option<usize>,
    /// Finished part indices in the order they finished, for `imap_unordered`.
    finish_order: VecDeque<usize>,
    /// Every finished part index in finishing order, never popped: progress bars read it.
    finish_log: Vec<usize>,
    /// Set when all parts are in and any callbacks have run: `get()` may return.
    ready: bool,
    /// Threads waiting for a part or for any change (`wait_for`). Only they need a wake-up for a
    /// part that does not finish the job: a `map` of 20,000 parts would otherwise wake its
    /// waiting caller 20,000 times for nothing.
    part_waiters: usize,
    /// The least `finished` count a `wait_count` caller waits for (0: none waits), so that it is
    /// woken once, when its count is reached, not by every part before.
    wake_at: usize,
    /// Threads blocked in any wait on this job. With none, a change wakes nobody: a condvar
    /// notify is a system call even then, and most `apply_async` results are never waited on.
    waiters: usize,
}

impl Parts {
    fn slot(&self, part: usize) -> Option<&Slot> {
        self.slots.get(part.checked_sub(self.base)?)
    }
}

pub struct Job {
    pub id: u64,
    /// Jobs with callbacks become ready only after the callback thread ran them.
    pub has_callbacks: bool,
    /// What the job runs (`module.function`), for error messages; may be empty.
    pub label: String,
    /// How long each part may run in a worker before the worker is killed.
    pub time_limit: Option<Duration>,
    parts: Mutex<Parts>,
    changed: Condvar,
    /// Event fds written on every change, so an event loop can wait without a thread (asyncio),
    /// keyed by a token so one loop registers once.
    wakers: Mutex<Vec<(u64, OwnedFd)>>,
}

impl Job {
    pub fn new(id: u64, total: Option<usize>, has_callbacks: bool) -> Job {
        let parts = Parts {
            total,
            ..Parts::default()
        };
        Job {
            id,
            has_callbacks,
            label: String::new(),
            time_limit: None,
            parts: Mutex::new(parts),
            changed: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Write to `fd` (an eventfd or non-blocking pipe) whenever a part finishes or the job becomes ready.
    pub fn add_waker(&self, token: u64, fd: OwnedFd) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !wakers.iter().any(|(t, _)| *t == token) {
            wakers.push((token, fd));
        }
    }

    /// Wake the waiting threads, if `p` says there are any, and the event fds.
    fn notify(&self, p: MutexGuard<'_, Parts>) {
        let waited = p.waiters > 0;
        drop(p);
        if waited {
            self.changed.notify_all();
        }
        self.notify_wakers();
    }

    fn notify_wakers(&self) {
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, fd) in wakers.iter() {
            let one: u64 = 1;
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// The same job with a label for messages and a per-part time limit.
    pub fn described(mut self, label: String, time_limit: Option<Duration>) -> Job {
        self.label = label;
        self.time_limit = time_limit;
        self
    }

    /// How messages name part `part`: `f`, or `f (chunk 3 of 10)` for multi-part jobs.
    pub fn describe_part(&self, part: usize) -> String {
        let what = if self.label.is_empty() {
            "the task"
        } else {
            &self.label
        };
        match self.total() {
            Some(1) => what.to_string(),
            Some(n) => format!("{what} (chunk {} of {n})", part + 1),
            None => format!("{what} (chunk {})", part + 1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Parts> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a part's outcome. Returns true when this completed the whole job.
    /// A part that already has an outcome keeps it (the first word wins).
    pub fn complete_part(&self, part: usize, outcome: Outcome) -> bool {
        let mut p = self.lock();
        let Some(index) = part.checked_sub(p.base) else {
            return false; // finished and taken long ago
        };
        if p.slots.len() <= index {
            p.slots.resize_with(index + 1, || Slot::Pending);
        }
        if !matches!(p.slots[index], Slot::Pending) {
            return false;
        }
        p.slots[index] = Slot::Done(outcome);
        p.finished += 1;
        p.finish_order.push_back(part);
        p.finish_log.push(part);
        let complete = p.total == Some(p.finished);
        if complete && !self.has_callbacks {
            p.ready = true;
        }
        let counted = p.wake_at != 0 && p.finished >= p.wake_at;
        if counted {
            p.wake_at = 0; // the woken re-register if they wait on
        }
        if complete || counted || p.part_waiters > 0 {
            self.notify(p);
        } else {
            drop(p);
            self.notify_wakers();
        }
        complete
    }

    /// No more parts will be added; `total` parts exist. Returns true when that completes the job.
    pub fn seal(&self, total: usize) -> bool {
        let mut p = self.lock();
        p.total = Some(total);
        let complete = p.finished == total;
        if complete && !self.has_callbacks {
            p.ready = true;
        }
        self.notify(p);
        complete
    }

    pub fn mark_ready(&self) {
        let mut p = self.lock();
        p.ready = true;
        self.notify(p);
    }

    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// Every part has an outcome (callbacks may not have run yet).
    pub fn is_complete(&self) -> bool {
        let p = self.lock();
        p.total == Some(p.finished)
    }

    pub fn total(&self) -> Option<usize> {
        self.lock().total
    }

    /// Take part `part`'s outcome (each outcome is handed out once, so the pool keeps no copy).
    pub fn take(&self, part: usize) -> Option<Outcome> {
        Self::take_locked(&mut self.lock(), part)
    }

    /// Pop the next part in finishing order and take its outcome, if that part finished with a
    /// pickled value; anything else stays for `pop_finished`.
    pub fn take_next_value(&self) -> Option<Vec<u8>> {
        let mut p = self.lock();
        let &part = p.finish_order.front()?;
        let index = part.checked_sub(p.base)?;
        if !matches!(p.slots.get(index), Some(Slot::Done(Outcome::Value(_)))) {
            return None;
        }
        p.finish_order.pop_front();
        match Self::take_locked(&mut p, part) {
            Some(Outcome::Value(pickled)) => Some(pickled),
            _ => unreachable!("checked above"),
        }
    }

    fn take_locked(p: &mut Parts, part: usize) -> Option<Outcome> {
        let index = part.checked_sub(p.base)?;
        let slot = p.slots.get_mut(index)?;
        if !matches!(slot, Slot::Done(_)) {
            return None;
        }
        let Slot::Done(outcome) = std::mem::replace(slot, Slot::Taken) else {
            unreachable!("checked above")
        };
        while matches!(p.slots.front(), Some(Slot::Taken)) {
            p.slots.pop_front();
            p.base += 1;
        }
        // Readers in order (imap, map) never pop the finish order: drop what they took.
        while p.finish_order.front().is_some_and(|&f| f < p.base) {
            p.finish_order.pop_front();
        }
        Some(outcome)
    }

    /// Block up to `timeout` until `count` parts have finished or the job is complete; returns
    /// whether that happened. Unlike `wait_for`, finished parts short of `count` wake nobody.
    pub fn wait_count(&self, timeout: Duration, count: usize) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock();
        loop {
            if p.finished >= count || p.total == Some(p.finished) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            p.wake_at = if p.wake_at == 0 {
                count
            } else {
                p.wake_at.min(count)
            };
            p.waiters += 1;
            p = self
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            p.waiters -= 1;
        }
    }

    /// Block up to `timeout` until `pred` holds; returns whether it does. Woken by every change.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&JobView) -> bool) -> bool {
        let mut p = self.lock();
        p.part_waiters += 1;
        p.waiters += 1;
        let (mut p, holds) = wait_until(p, &self.changed, timeout, |p| pred(&JobView(p)));
        p.part_waiters -= 1;
        p.waiters -= 1;
        holds
    }

    /// `wait_for` a condition on the whole job (`ready`, `complete`): woken only when the job
    /// completes, is sealed or is marked ready, not by each part.
    pub fn wait_for_whole(&self, timeout: Duration, pred: impl Fn(&JobView) -> bool) -> bool {
        let mut p = self.lock();
        p.waiters += 1;
        let (mut p, holds) = wait_until(p, &self.changed, timeout, |p| pred(&JobView(p)));
        p.waiters -= 1;
        holds
    }

    /// The parts that finished after the first `start` ones, in finishing order.
    pub fn finished_since(&self, start: usize) -> Vec<usize> {
        self.lock()
            .finish_log
            .get(start..)
            .unwrap_or_default()
            .to_vec()
    }

    /// Pop the next part in finishing order, if one finished and was not yet popped.
    pub fn pop_finished(&self) -> Option<usize> {
        self.lock().finish_order.pop_front()
    }
}

/// A job whose parts are all in: send it to the callbacks thread if it has callbacks (they do not
/// run for a terminated pool, as in the stdlib), else it is ready already.
pub fn deliver(callbacks: &Mutex<Option<Sender<Arc<Job>>>>, job: &Arc<Job>, terminated: bool) {
    if !job.has_callbacks {
        return;
    }
    let tx = callbacks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match tx {
        Some(tx) if !terminated => {
            if tx.send(job.clone()).is_err() {
                job.mark_ready();
            }
        }
        _ => job.mark_ready(),
    }
}

/// Wait on `changed` until `pred` holds or `timeout` passes; returns the guard and whether it holds.
pub fn wait_until<'a, T>(
    mut guard: MutexGuard<'a, T>,
    changed: &Condvar,
    timeout: Duration,
    pred: impl Fn(&T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if pred(&guard) {
            return (guard, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (guard, false);
        }
        guard = changed
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Read-only view of a job's state for wait predicates.
pub struct JobView<'a>(&'a Parts);

impl JobView<'_> {
    pub fn ready(&self) -> bool {
        self.0.ready
    }
    /// Part `part` finished (its outcome may have been taken since).
    pub fn part_done(&self, part: usize) -> bool {
        part < self.0.base
            || self
                .0
                .slot(part)
                .is_some_and(|s| !matches!(s, Slot::Pending))
    }
    /// The job is sealed and has no part `part`.
    pub fn beyond(&self, part: usize) -> bool {
        self.0.total.is_some_and(|t| part >= t)
    }
    /// Every part has an outcome.
    pub fn complete(&self) -> bool {
        self.0.total == Some(self.0.finished)
    }
    /// How many parts have finished (taken and popped ones included).
    pub fn finished(&self) -> usize {
        self.0.finished
    }
    pub fn any_unpopped(&self) -> bool {
        !self.0.finish_order.is_empty()
    }
    /// All parts are accounted for and every finished one was popped.
    pub fn exhausted(&self) -> bool {
        self.0.total == Some(self.0.finished) && self.0.finish_order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn single_part_job_is_ready_when_its_part_completes() {
        let job = Job::new(1, Some(1), false);
        assert!(!job.is_ready());
        assert!(job.complete_part(0, Outcome::Value(b"x".to_vec())));
        assert!(job.is_ready());
        assert_eq!(job.take(0), Some(Outcome::Value(b"x".to_vec())));
        assert_eq!(job.take(0), None, "an outcome is handed out once");
    }

    #[test]
    fn job_with_callbacks_waits_for_mark_ready() {
        let job = Job::new(1, Some(2), true);
        assert!(!job.complete_part(1, Outcome::Raised(vec![])));
        assert!(job.complete_part(0, Outcome::Value(vec![])));
        assert!(!job.is_ready());
        job.mark_ready();
        assert!(job.is_ready());
    }

    #[test]
    fn a_second_outcome_for_a_part_is_ignored() {
        let job = Job::new(1, Some(2), false);
        job.complete_part(0, Outcome::Value(vec![1]));
        assert!(!job.complete_part(0, Outcome::Terminated("late".into())));
        assert_eq!(job.take(0), Some(Outcome::Value(vec![1])));
    }

    #[test]
    fn open_ended_job_completes_when_sealed() {
        let job = Job::new(1, None, false);
        job.complete_part(0, Outcome::Value(vec![]));
        job.complete_part(1, Outcome::Value(vec![]));
        assert!(!job.is_complete());
        assert!(job.seal(2));
        assert!(job.is_ready());
    }

    #[test]
    fn parts_read_in_order_leave_nothing_behind() {
        let job = Job::new(1, None, false);
        for part in 0..10_000 {
            job.complete_part(part, Outcome::Value(vec![1]));
            assert_eq!(job.take(part), Some(Outcome::Value(vec![1])));
        }
        let p = job.lock();
        assert_eq!(
            (p.base, p.slots.len(), p.finish_order.len()),
            (10_000, 0, 0)
        );
        drop(p);
        assert!(
            !job.complete_part(5, Outcome::Cancelled),
            "part 5 finished long ago"
        );
        assert!(job.wait_for(Duration::ZERO, |v| v.part_done(9_999)));
        assert!(!job.wait_for(Duration::ZERO, |v| v.part_done(10_000)));
    }

    #[test]
    fn parts_taken_out_of_order_are_dropped_once_the_front_is_taken() {
        let job = Job::new(1, Some(3), false);
        for part in [2, 0, 1] {
            job.complete_part(part, Outcome::Value(vec![part as u8]));
        }
        assert_eq!(job.take(2), Some(Outcome::Value(vec![2])));
        assert_eq!(job.take(2), None);
        assert_eq!(job.lock().base, 0);
        assert_eq!(job.take(0), Some(Outcome::Value(vec![0])));
        assert_eq!(job.take(1), Some(Outcome::Value(vec![1])));
        assert_eq!(job.lock().base, 3);
        assert!(job.is_ready());
    }

    #[test]
    fn finish_order_is_kept_for_unordered_readers() {
        let job = Job::new(1, Some(3), false);
        for part in [2, 0, 1] {
            job.complete_part(part, Outcome::Value(vec![part as u8]));
        }
        let order: Vec<_> = std::iter::from_fn(|| job.pop_finished()).collect();
        assert_eq!(order, vec![2, 0, 1]);
        assert_eq!(
            job.finished_since(1),
            vec![0, 1],
            "popping leaves the log that progress bars read"
        );
        assert!(job.finished_since(5).is_empty());
    }

    #[test]
    fn deliver_marks_ready_only_when_no_callbacks_thread_will() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let callbacks = Mutex::new(Some(tx));
        let job = Arc::new(Job::new(1, Some(1), true));
        deliver(&callbacks, &job, false);
        assert!(
            !job.is_ready(),
            "the callbacks thread marks it ready after the callback"
        );
        assert_eq!(rx.try_recv().map(|j| j.id).ok(), Some(1));
        let skipped = Arc::new(Job::new(2, Some(1), true));
        deliver(&callbacks, &skipped, true);
        assert!(skipped.is_ready(), "no callbacks after terminate");
        drop(rx);
        let orphan = Arc::new(Job::new(3, Some(1), true));
        deliver(&callbacks, &orphan, false);
        assert!(orphan.is_ready(), "no callbacks thread is left to mark it");
    }

    #[test]
    fn waiters_wake_when_a_part_completes_on_another_thread() {
        let job = Arc::new(Job::new(1, Some(1), false));
        let j = job.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            j.complete_part(0, Outcome::Value(vec![]));
        });
        assert!(job.wait_for(Duration::from_secs(5), |v| v.part_done(0)));
        t.join().unwrap();
        assert!(!Job::new(2, Some(1), false).wait_for(Duration::from_millis(10), |v| v.ready()));
    }
}
