//! The pool's core: scheduling, worker supervision and result routing, with no Python in it.
//!
//! ```text
//!  submit() ──► queue ──pump──► worker.outbox ──writev──► task pipe ──► worker process
//!                                   │ (in-flight ids per worker)             │
//!  Job (result slot) ◄── rpool-io ◄─┴────────── result pipe ◄────────────────┘
//!        │                  │ pidfd readable: drain, reap, fail the head in-flight task,
//!        │                  │                 requeue the rest, ask for a replacement
//!        ▼                  ▼
//!  callbacks channel   rpool-supervise: launches workers (fork needs the GIL, so not on rpool-io)
//! ```
//!
//! Each worker has private pipes, so a dying worker cannot wedge a lock anyone else needs, and the
//! parent always knows which tasks a worker holds. Tasks run in the order a worker received them,
//! so when it dies only the first of its in-flight tasks can have started: that one fails, the
//! others go back to the front of the queue.

use crate::frame::{self, kind, FrameReader, HEADER_LEN};
use crate::job::{self, wait_until, Job, Outcome};
use crossbeam::channel::{unbounded, Receiver, Sender};
use crossbeam::queue::SegQueue;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A started worker process, as the launcher hands it over.
pub struct Launched {
    pub pid: i32,
    /// Parent's end of the task pipe (parent writes).
    pub task_fd: OwnedFd,
    /// Parent's end of the result pipe (parent reads).
    pub result_fd: OwnedFd,
    /// Parent's end of the worker's memfd socket (see `shm::memfd_socket`).
    pub memfd_fd: OwnedFd,
    /// Frames to send before any task (an exec'd worker's start-up data).
    pub preamble: Vec<u8>,
    /// A pidfd for it, when the launcher has one: a fork server's worker may exit and be reaped
    /// by the server before the pool could open one by pid.
    pub pidfd: Option<OwnedFd>,
}

/// Starts worker processes. The fork launcher needs the GIL, so launching runs on its own thread.
pub trait Launch: Send + Sync {
    fn launch(&self, number: u64) -> io::Result<Launched>;
    /// Called on rpool-supervise before it exits (lets a launcher drop Python objects with the GIL).
    fn release(&self) {}
    /// The raw wait status of worker `pid`, which has exited (its pidfd said so).
    fn reap(&self, pid: i32) -> i32 {
        reap(pid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    Closed,
    Terminated,
}

#[derive(Debug)]
pub enum SubmitError {
    NotRunning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    /// Launched, initializer not finished.
    Starting,
    Ready,
    /// Sent its last task (maxtasksperchild) or a STOP: it will exit on its own.
    Leaving,
}

/// How a task frame carries the function to call.
#[derive(Clone, Copy)]
pub enum Callable<'a> {
    /// The payload is one pickled `(func, args, kwds)`.
    InPayload,
    /// This pickled callable comes first, then the pickled `(args, kwds)`.
    Pickled(&'a [u8]),
    /// `Pickled`, and the worker may keep the callable for later tasks with the same bytes.
    Reusable(&'a [u8]),
}

/// A part of a job to queue.
pub struct TaskPart<'a> {
    pub part: usize,
    pub callable: Callable<'a>,
    pub payload: &'a [u8],
    /// A memfd holding the payload's large buffers (rpool._shm), open until the task ends.
    pub buffers: Option<OwnedFd>,
}

/// A task, queued or held by a worker.
struct InFlight {
    id: u64,
    job: Arc<Job>,
    part: usize,
    /// Header and payload, ready to write; kept until the result arrives so that a task a dead
    /// worker never started can be sent to another.
    frame: Arc<Vec<u8>>,
    /// A memfd holding the task's large buffers, which the worker opens through /proc (see
    /// rpool._shm): kept open until the task has an outcome.
    _buffers: Option<OwnedFd>,
}

struct Worker {
    number: u64,
    pid: i32,
    task_fd: OwnedFd,
    result_fd: OwnedFd,
    memfd_fd: OwnedFd,
    pidfd: OwnedFd,
    reader: FrameReader,
    state: WorkerState,
    inflight: VecDeque<InFlight>,
    /// Frames to write, each marked whether it is a task.
    outbox: VecDeque<(Arc<Vec<u8>>, bool)>,
    /// Task frames in `outbox` not yet completely written.
    unwritten_tasks: usize,
    /// Bytes of `outbox[0]` already written.
    out_off: usize,
    want_writable: bool,
    sent: u64,
    stop_sent: bool,
    init_error: Option<String>,
    /// When the first in-flight task started (tasks run in the order they were sent, so it is
    /// the one running): when it was sent to an idle worker, or when the task before it ended.
    head_since: Instant,
    /// Killed by the pool because its task ran past its time limit.
    timed_out: bool,
}

impl Worker {
    /// When the running task's time limit runs out, if it has one.
    fn head_deadline(&self) -> Option<Instant> {
        if self.timed_out || self.state == WorkerState::Starting {
            return None;
        }
        let limit = self.inflight.front()?.job.time_limit?;
        Some(self.head_since + limit)
    }

    fn overdue(&self, now: Instant) -> bool {
        self.head_deadline().is_some_and(|d| d <= now)
    }

    /// Tasks the worker has been sent in full and not answered yet: each answer wakes rpool-io,
    /// which then writes whatever the outbox holds.
    fn sent_unanswered(&self) -> usize {
        self.inflight.len().saturating_sub(self.unwritten_tasks)
    }

    fn clear_outbox(&mut self) {
        self.outbox.clear();
        self.unwritten_tasks = 0;
        self.out_off = 0;
    }
}

/// Who calls `pump`: a caller's `submit` may leave frames for rpool-io to write in one batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writes {
    Now,
    Batched,
}

struct Sched {
    lifecycle: Lifecycle,
    queue: VecDeque<InFlight>,
    workers: Vec<Worker>,
    /// Jobs that may still get parts (an `imap` still reading its input).
    open_jobs: usize,
    /// Launches asked for and not yet done.
    launching: usize,
    /// Average task run time reported by workers, for the prefetch depth.
    avg_task_ns: f64,
    /// Workers that exited in their initializer since a worker last started cleanly.
    init_failures: u32,
    broken: Option<String>,
    /// Why the last launch failed, if it did (only this makes `Core::start` fail).
    launch_error: Option<String>,
    /// Payloads of LOG frames read and not yet handed to `PoolConfig::log_sink`.
    forwarded: Vec<Vec<u8>>,
}

enum SuperviseMsg {
    Launch,
    Stop,
}

pub struct PoolConfig {
    pub processes: usize,
    pub max_tasks_per_child: Option<u64>,
    /// Gets the payloads of workers' LOG frames, on rpool-io, outside the scheduler lock and
    /// before the results read with them are delivered. Without one, LOG frames are dropped.
    pub log_sink: Option<LogSink>,
}

pub type LogSink = Box<dyn Fn(Vec<Vec<u8>>) + Send + Sync>;

pub struct Core {
    config: PoolConfig,
    sched: Mutex<Sched>,
    /// Tasks submitted while another thread held the scheduler lock (rpool-io, mostly, during
    /// its system calls): a caller never waits for that lock, with the GIL held, to queue a
    /// task. Whoever takes the lock next moves them to the queue (`drain_inbox`), before any
    /// task submitted after them.
    inbox: SegQueue<InFlight>,
    /// Notified when workers start or exit.
    changed: Condvar,
    epoll: OwnedFd,
    wake: OwnedFd,
    next_id: AtomicU64,
    /// `lifecycle == Running`, readable without the scheduler lock (which rpool-io holds while it
    /// reads and writes pipes): a new `apply` job needs nothing else from it.
    running: AtomicBool,
    /// rpool-io was poked to write outboxes and has not yet woken for it: a burst of
    /// submissions pokes it once.
    flush_poked: AtomicBool,
    /// rpool-io sleeps with a timeout over a millisecond: frames left for it need a poke.
    io_sleeps_long: AtomicBool,
    supervise_tx: Sender<SuperviseMsg>,
    callbacks_tx: Mutex<Option<Sender<Arc<Job>>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    launcher: Arc<dyn Launch>,
}

static WORKER_NUMBERS: AtomicU64 = AtomicU64::new(1);

const TOKEN_WAKE: u64 = u64::MAX;
const FD_RESULT: u64 = 0;
const FD_TASK: u64 = 1;
const FD_PID: u64 = 2;

const TERMINATED: &str = "the pool was terminated before this task finished";

/// Tasks shorter than this on average are "short": answers come often enough for rpool-io to
/// write what callers submit in batches.
const SHORT_TASK_NS: f64 = 1_000_000.0;

/// How long rpool-io polls for an answer before it sleeps, while tasks are in flight. Waking a
/// sleeping thread costs tens of microseconds where an idle virtual CPU halts; a short task's
/// answer often comes sooner.
const ANSWER_SPIN: Duration = Duration::from_micros(50);

/// Give up on a pool whose workers keep dying in their initializer after this many in a row.
const MAX_INIT_FAILURES: u32 = 3;

impl Core {
    /// Start the pool's threads and its first workers. Completed jobs that have callbacks are
    /// sent on the returned channel; the caller runs them and then calls `Job::mark_ready`.
    pub fn start(
        config: PoolConfig,
        launcher: Arc<dyn Launch>,
    ) -> io::Result<(Arc<Core>, Receiver<Arc<Job>>)> {
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_WAKE,
        )?;
        let (supervise_tx, supervise_rx) = unbounded();
        let (callbacks_tx, callbacks_rx) = unbounded();
        let processes = config.processes;
        let core = Arc::new(Core {
            config,
            sched: Mutex::new(Sched {
                lifecycle: Lifecycle::Running,
                queue: VecDeque::new(),
                workers: Vec::new(),
                open_jobs: 0,
                launching: 0,
                avg_task_ns: 1_000_000.0,
                init_failures: 0,
                broken: None,
                launch_error: None,
                forwarded: Vec::new(),
            }),
            inbox: SegQueue::new(),
            changed: Condvar::new(),
            epoll,
            wake,
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(true),
            flush_poked: AtomicBool::new(false),
            io_sleeps_long: AtomicBool::new(false),
            supervise_tx,
            callbacks_tx: Mutex::new(Some(callbacks_tx)),
            threads: Mutex::new(Vec::new()),
            launcher,
        });
        let io_core = core.clone();
        let io = std::thread::Builder::new()
            .name("rpool-io".into())
            .spawn(move || io_core.io_loop())?;
        let sup_core = core.clone();
        let supervise = std::thread::Builder::new()
            .name("rpool-supervise".into())
            // A fork-started worker keeps running on this thread's stack: give it a main-thread-sized one.
            .stack_size(16 << 20)
            .spawn(move || sup_core.supervise_loop(supervise_rx))?;
        core.threads.lock().unwrap().extend([io, supervise]);
        // The first workers start now, before the pool is handed out, so that fork-started workers
        // see the parent as it was when the pool was made (as the stdlib's do). On the main thread
        // they fork right here, as the stdlib's do: a pool made while a module is being imported
        // then gets workers in which that module's import lock is still their own thread's, so
        // unpickling its functions does not wait forever. From any other thread they start on
        // rpool-supervise instead, because a worker's PR_SET_PDEATHSIG follows the thread that
        // forked it and the caller's thread may end long before the pool does (the main thread
        // ends only with the process).
        core.lock().launching = processes;
        let on_main_thread = unsafe { libc::gettid() == libc::getpid() };
        for _ in 0..processes {
            if on_main_thread {
                if let Err(e) = core.launch_one(&*core.launcher) {
                    core.launch_failed(format!("could not start a worker process: {e}"));
                }
            } else {
                let _ = core.supervise_tx.send(SuperviseMsg::Launch);
            }
        }
        let mut s = core.lock();
        while s.launching > 0 {
            s = core.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let failure = s.launch_error.clone();
        drop(s);
        if let Some(reason) = failure {
            core.terminate();
            core.wait_finished(Duration::from_secs(5));
            core.join_threads();
            return Err(io::Error::other(reason));
        }
        Ok((core, callbacks_rx))
    }

    fn lock(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lock().lifecycle
    }

    pub fn processes(&self) -> usize {
        self.config.processes
    }

    /// A new result slot. `total` is `None` for a job whose parts are still being read (`imap`).
    pub fn new_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
    ) -> Result<Arc<Job>, SubmitError> {
        self.new_described_job(total, has_callbacks, String::new(), None)
    }

    /// `new_job` with a label for messages and a time limit for each part.
    pub fn new_described_job(
        &self,
        total: Option<usize>,
        has_callbacks: bool,
        label: String,
        time_limit: Option<Duration>,
    ) -> Result<Arc<Job>, SubmitError> {
        let new = || {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            Arc::new(Job::new(id, total, has_callbacks).described(label, time_limit))
        };
        if total.is_some() {
            if !self.running.load(Ordering::Acquire) {
                return Err(SubmitError::NotRunning);
            }
            return Ok(new());
        }
        // An open job keeps the workers of a closed pool alive: counted under the lock that
        // close() takes, so that the count and the lifecycle agree.
        let mut s = self.lock();
        if s.lifecycle != Lifecycle::Running {
            return Err(SubmitError::NotRunning);
        }
        s.open_jobs += 1;
        Ok(new())
    }

    /// Queue part `part` of `job`; `payload` is the pickled call.
    pub fn submit(&self, job: &Arc<Job>, part: usize, payload: &[u8]) -> Result<(), SubmitError> {
        self.submit_with_buffers(job, part, payload, None)
    }

    /// `submit`, keeping `buffers` (a memfd the payload refers to) open until the task ends.
    pub fn submit_with_buffers(
        &self,
        job: &Arc<Job>,
        part: usize,
        payload: &[u8],
        buffers: Option<OwnedFd>,
    ) -> Result<(), SubmitError> {
        let task = TaskPart {
            part,
            callable: Callable::InPayload,
            payload,
            buffers,
        };
        self.submit_parts(job, vec![task])
    }

    /// Queue several parts of `job` under one lock: rpool-io can then write them in one batch.
    pub fn submit_parts(
        &self,
        job: &Arc<Job>,
        parts: Vec<TaskPart<'_>>,
    ) -> Result<(), SubmitError> {
        let flights: Vec<InFlight> = parts
            .into_iter()
            .map(|t| {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (callable, aux) = match t.callable {
                    Callable::InPayload => (&[][..], 0),
                    Callable::Pickled(c) => (c, c.len() as u64),
                    Callable::Reusable(c) => (c, c.len() as u64 | frame::TASK_REUSABLE),
                };
                let mut frame = Vec::new();
                frame::encode_parts_into(&mut frame, kind::TASK, id, aux, &[callable, t.payload]);
                InFlight {
                    id,
                    job: job.clone(),
                    part: t.part,
                    frame: Arc::new(frame),
                    _buffers: t.buffers,
                }
            })
            .collect();
        let mut s = match self.sched.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                flights.into_iter().for_each(|f| self.inbox.push(f));
                self.left_in_inbox();
                return Ok(());
            }
        };
        let mut done = Vec::new();
        self.drain_inbox(&mut s, &mut done);
        let submitted = if s.lifecycle == Lifecycle::Terminated {
            Err(SubmitError::NotRunning)
        } else {
            if let Some(reason) = s.broken.clone() {
                done.extend(
                    flights
                        .into_iter()
                        .map(|f| (f, Outcome::WorkerLost(reason.clone()))),
                );
            } else {
                s.queue.extend(flights);
                self.pump_with(&mut s, Writes::Batched);
            }
            Ok(())
        };
        drop(s);
        self.finish(done);
        submitted
    }

    /// Move tasks from the inbox to the queue, or fail them if the pool can no longer run them.
    fn drain_inbox(&self, s: &mut Sched, done: &mut Vec<(InFlight, Outcome)>) {
        while let Some(flight) = self.inbox.pop() {
            if s.lifecycle == Lifecycle::Terminated {
                done.push((flight, Outcome::Terminated(TERMINATED.into())));
            } else if let Some(reason) = &s.broken {
                done.push((flight, Outcome::WorkerLost(reason.clone())));
            } else {
                s.queue.push_back(flight);
            }
        }
    }

    /// After tasks went to the inbox: make sure someone moves them on soon.
    fn left_in_inbox(&self) {
        // Pairs with the fences in close(), terminate() and wait_ms(): either they see these
        // tasks in the inbox, or this sees what they set.
        fence(Ordering::SeqCst);
        if !self.running.load(Ordering::Relaxed) {
            // Closed or terminated meanwhile, maybe after close() decided that nothing was left
            // to run: take the lock and settle them here.
            let mut done = Vec::new();
            {
                let mut s = self.lock();
                self.drain_inbox(&mut s, &mut done);
                self.pump(&mut s);
                self.check_finished(&mut s);
            }
            self.finish(done);
        } else if self.io_sleeps_long.load(Ordering::Relaxed)
            && !self.flush_poked.swap(true, Ordering::AcqRel)
        {
            self.poke();
        }
    }

    pub fn fail_part(&self, job: &Arc<Job>, part: usize, exc: Vec<u8>) {
        if job.complete_part(part, Outcome::Raised(exc)) {
            self.job_complete(job);
        }
    }

    /// Drop `job`'s parts that are still queued (not yet sent to a worker); they end as
    /// `Outcome::Cancelled`. Returns how many were dropped.
    pub fn cancel(&self, job: &Arc<Job>) -> usize {
        let mut done = Vec::new();
        let dropped: VecDeque<InFlight> = {
            let mut s = self.lock();
            self.drain_inbox(&mut s, &mut done);
            let (mine, rest) = std::mem::take(&mut s.queue)
                .into_iter()
                .partition(|f| Arc::ptr_eq(&f.job, job));
            s.queue = rest;
            self.pump(&mut s);
            mine
        };
        let n = dropped.len();
        done.extend(dropped.into_iter().map(|f| (f, Outcome::Cancelled)));
        self.finish(done);
        n
    }

    /// No more parts for an open job.
    pub fn seal(&self, job: &Arc<Job>, total: usize) {
        let complete = job.seal(total);
        {
            let mut s = self.lock();
            s.open_jobs = s.open_jobs.saturating_sub(1);
            self.pump(&mut s);
        }
        if complete {
            self.job_complete(job);
        }
    }

    pub fn close(&self) {
        let mut done = Vec::new();
        {
            let mut s = self.lock();
            if s.lifecycle == Lifecycle::Running {
                s.lifecycle = Lifecycle::Closed;
                self.running.store(false, Ordering::Release);
            }
            // See left_in_inbox: from here on, tasks left in the inbox are seen below or by
            // their submitter.
            fence(Ordering::SeqCst);
            self.drain_inbox(&mut s, &mut done);
            self.pump(&mut s);
            self.check_finished(&mut s);
        }
        self.finish(done);
    }

    /// Kill every worker and fail every unfinished task. Returns at once; `wait_finished` waits.
    pub fn terminate(&self) {
        let mut failed = Vec::new();
        {
            let mut s = self.lock();
            if s.lifecycle == Lifecycle::Terminated {
                return;
            }
            s.lifecycle = Lifecycle::Terminated;
            self.running.store(false, Ordering::Release);
            fence(Ordering::SeqCst); // as in close()
            self.drain_inbox(&mut s, &mut failed);
            let why = TERMINATED;
            failed.extend(
                s.queue
                    .drain(..)
                    .map(|f| (f, Outcome::Terminated(why.into()))),
            );
            for w in &mut s.workers {
                failed.extend(
                    w.inflight
                        .drain(..)
                        .map(|f| (f, Outcome::Terminated(why.into()))),
                );
                w.clear_outbox();
                // SIGKILL at once: the worker's state is being thrown away, and a worker stuck in C
                // code or ignoring SIGTERM must not make terminate() wait.
                kill_worker(w);
            }
            self.check_finished(&mut s);
        }
        self.finish(failed);
    }

    /// True once every worker has exited and been reaped after close() or terminate().
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        wait_until(self.lock(), &self.changed, timeout, |s| self.is_finished(s)).1
    }

    /// Join the core's threads (after `wait_finished`) and close the callbacks channel.
    pub fn join_threads(&self) {
        let _ = self.supervise_tx.send(SuperviseMsg::Stop);
        self.poke();
        let handles: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        let me = std::thread::current().id();
        for h in handles {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        self.callbacks_tx.lock().unwrap().take();
    }

    pub fn worker_pids(&self) -> Vec<i32> {
        self.lock().workers.iter().map(|w| w.pid).collect()
    }

    fn is_finished(&self, s: &Sched) -> bool {
        s.lifecycle != Lifecycle::Running && s.workers.is_empty() && s.launching == 0
    }

    fn check_finished(&self, s: &mut Sched) {
        self.changed.notify_all();
        if self.is_finished(s) {
            self.poke();
        }
    }

    fn poke(&self) {
        let one: u64 = 1;
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Move queued tasks to workers with room, write what can be written, and stop idle workers
    /// once a closed pool has nothing left to run.
    fn pump(&self, s: &mut Sched) {
        self.pump_with(s, Writes::Now)
    }

    /// `pump`; with `Writes::Batched` (a caller's submit), only a pool with nothing in flight is
    /// written to at once. Otherwise new frames wait in the outboxes and rpool-io writes them in
    /// one `writev` per worker, when an answer arrives or when poked, instead of one system call
    /// (and one wake-up of a worker) per task on the caller's thread.
    fn pump_with(&self, s: &mut Sched, writes: Writes) {
        // No worker takes more than its fair share of the work in sight, counting workers still
        // starting: otherwise the first ready worker could take every long task of a short map.
        let in_flight: usize = s.workers.iter().map(|w| w.inflight.len()).sum();
        let busy = in_flight > 0;
        let short_tasks = s.avg_task_ns < SHORT_TASK_NS;
        let mut poke = false;
        let fair_share = (s.queue.len() + in_flight).div_ceil(self.config.processes.max(1));
        let depth = prefetch_depth(s.avg_task_ns).min(fair_share.max(1));
        let max_tasks = self.config.max_tasks_per_child;
        let mut new_deadline = false;
        while !s.queue.is_empty() {
            let pick = s
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.state == WorkerState::Ready && w.inflight.len() < depth)
                .min_by_key(|(_, w)| w.inflight.len())
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            let task = s.queue.pop_front().unwrap();
            let w = &mut s.workers[i];
            if w.inflight.is_empty() {
                w.head_since = Instant::now();
                new_deadline |= task.job.time_limit.is_some();
            }
            w.outbox.push_back((task.frame.clone(), true));
            w.unwritten_tasks += 1;
            w.inflight.push_back(task);
            w.sent += 1;
            if max_tasks.is_some_and(|m| w.sent >= m) {
                w.state = WorkerState::Leaving;
            }
        }
        // rpool-io may be asleep in epoll_wait for up to a second, computed before this deadline
        // existed: wake it so the limit is enforced on time.
        if new_deadline {
            self.poke();
        }
        let drained = s.lifecycle != Lifecycle::Running
            && s.queue.is_empty()
            && s.open_jobs == 0
            && self.inbox.is_empty();
        for w in &mut s.workers {
            if drained && w.state == WorkerState::Ready && w.inflight.is_empty() {
                w.state = WorkerState::Leaving;
            }
            // A worker at its task limit exits by itself after its last task; the STOP makes
            // sure of it (a worker that already left never reads it).
            if w.state == WorkerState::Leaving && w.inflight.is_empty() && !w.stop_sent {
                let mut stop = Vec::with_capacity(HEADER_LEN);
                frame::encode_into(&mut stop, kind::STOP, 0, 0, &[]);
                w.outbox.push_back((Arc::new(stop), false));
                w.stop_sent = true;
            }
            if w.outbox.is_empty() {
                continue;
            }
            match writes {
                Writes::Now => self.flush(w),
                // Its next answer wakes rpool-io, which writes the whole outbox then.
                Writes::Batched if w.sent_unanswered() > 0 => {}
                // Short tasks are in flight: some answer is due soon, and rpool-io then writes
                // what gathered meanwhile in one go, where the caller would make a system call
                // (and wake a worker) per task. rpool-io looks at least every millisecond.
                Writes::Batched if busy && short_tasks => poke = true,
                // A lone task for an idle pool goes at once: that is apply()'s latency.
                Writes::Batched => self.flush(w),
            }
        }
        // rpool-io went to sleep for longer than a millisecond (it saw nothing in flight).
        if poke
            && self.io_sleeps_long.load(Ordering::Acquire)
            && !self.flush_poked.swap(true, Ordering::AcqRel)
        {
            self.poke();
        }
    }

    /// Non-blocking write of a worker's outbox; what does not fit waits for EPOLLOUT on rpool-io.
    fn flush(&self, w: &mut Worker) {
        while !w.outbox.is_empty() {
            let parts: Vec<&[u8]> = w
                .outbox
                .iter()
                .take(64)
                .map(|(f, _)| f.as_slice())
                .collect();
            let iov: Vec<libc::iovec> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let skip = if i == 0 { w.out_off } else { 0 };
                    libc::iovec {
                        iov_base: p[skip..].as_ptr() as *mut _,
                        iov_len: p.len() - skip,
                    }
                })
                .collect();
            let n = unsafe {
                libc::writev(
                    w.task_fd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    // EPIPE: the worker is gone; its pidfd will tell rpool-io.
                    _ => {
                        w.clear_outbox();
                        break;
                    }
                }
            }
            let mut n = n as usize;
            while n > 0 {
                let left = w.outbox[0].0.len() - w.out_off;
                if n >= left {
                    n -= left;
                    if w.outbox.pop_front().is_some_and(|(_, task)| task) {
                        w.unwritten_tasks -= 1;
                    }
                    w.out_off = 0;
                } else {
                    w.out_off += n;
                    n = 0;
                }
            }
        }
        let want = !w.outbox.is_empty();
        if want != w.want_writable {
            w.want_writable = want;
            let events = if want { libc::EPOLLOUT as u32 } else { 0 };
            let _ = epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                w.task_fd.as_raw_fd(),
                events,
                token(w.number, FD_TASK),
            );
        }
    }

    fn forward(&self, records: Vec<Vec<u8>>) {
        if let (Some(sink), false) = (&self.config.log_sink, records.is_empty()) {
            sink(records);
        }
    }

    /// Record outcomes outside the scheduler lock, then hand finished jobs on.
    fn finish(&self, done: Vec<(InFlight, Outcome)>) {
        for (flight, outcome) in done {
            if flight.job.complete_part(flight.part, outcome) {
                self.job_complete(&flight.job);
            }
        }
    }

    fn job_complete(&self, job: &Arc<Job>) {
        if job.has_callbacks {
            let terminated = self.lifecycle() == Lifecycle::Terminated;
            job::deliver(&self.callbacks_tx, job, terminated);
        }
    }

    fn launch_one(&self, launcher: &dyn Launch) -> io::Result<()> {
        let number = WORKER_NUMBERS.fetch_add(1, Ordering::Relaxed);
        let launched = launcher.launch(number);
        let mut s = self.lock();
        s.launching -= 1;
        self.changed.notify_all();
        let launched = match launched {
            Ok(l) => l,
            Err(e) => {
                self.check_finished(&mut s);
                return Err(e);
            }
        };
        let opened = match launched.pidfd {
            Some(fd) => Ok(fd),
            None => pidfd_open(launched.pid),
        };
        let pidfd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                unsafe { libc::kill(launched.pid, libc::SIGKILL) };
                reap(launched.pid);
                return Err(e);
            }
        };
        set_nonblocking(launched.task_fd.as_raw_fd())?;
        set_nonblocking(launched.result_fd.as_raw_fd())?;
        let ep = self.epoll.as_raw_fd();
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            launched.result_fd.as_raw_fd(),
            libc::EPOLLIN as u32,
            token(number, FD_RESULT),
        )?;
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            launched.task_fd.as_raw_fd(),
            0,
            token(number, FD_TASK),
        )?;
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            pidfd.as_raw_fd(),
            libc::EPOLLIN as u32,
            token(number, FD_PID),
        )?;
        let mut w = Worker {
            number,
            pid: launched.pid,
            task_fd: launched.task_fd,
            result_fd: launched.result_fd,
            memfd_fd: launched.memfd_fd,
            pidfd,
            reader: FrameReader::new(),
            state: WorkerState::Starting,
            inflight: VecDeque::new(),
            outbox: VecDeque::new(),
            unwritten_tasks: 0,
            out_off: 0,
            want_writable: false,
            sent: 0,
            stop_sent: false,
            init_error: None,
            head_since: Instant::now(),
            timed_out: false,
        };
        if !launched.preamble.is_empty() {
            w.outbox.push_back((Arc::new(launched.preamble), false));
            self.flush(&mut w);
        }
        if s.lifecycle == Lifecycle::Terminated {
            kill_worker(&w);
        }
        let started = format!("started worker {} (pid {})", w.number, w.pid);
        s.workers.push(w);
        drop(s);
        log::debug!(target: "rpool", "{started}");
        Ok(())
    }

    fn supervise_loop(&self, rx: Receiver<SuperviseMsg>) {
        let launcher = &*self.launcher;
        while let Ok(msg) = rx.recv() {
            match msg {
                SuperviseMsg::Launch => {
                    if let Err(e) = self.launch_one(launcher) {
                        log::error!(target: "rpool", "could not start a worker process: {e}");
                        self.launch_failed(format!("could not start a worker process: {e}"));
                    }
                }
                SuperviseMsg::Stop => break,
            }
        }
        launcher.release();
    }

    /// A worker could not be started: fail everything queued and everything submitted later.
    fn launch_failed(&self, reason: String) {
        let failed: Vec<_> = {
            let mut s = self.lock();
            s.broken = Some(reason.clone());
            s.launch_error = Some(reason.clone());
            let failed = s
                .queue
                .drain(..)
                .map(|f| (f, Outcome::WorkerLost(reason.clone())))
                .collect();
            self.check_finished(&mut s);
            failed
        };
        self.finish(failed);
    }

    fn io_loop(&self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let (wait_ms, in_flight) = self.wait_ms();
            let ep = self.epoll.as_raw_fd();
            let mut n = 0;
            if in_flight {
                // An answer due soon is read without waking a sleeping thread (see ANSWER_SPIN).
                frame::spin_until(ANSWER_SPIN, || {
                    n = unsafe {
                        libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 0)
                    };
                    n != 0
                });
            }
            if n == 0 {
                n = unsafe {
                    libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, wait_ms)
                };
            }
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!(target: "rpool", "rpool-io: epoll_wait failed: {}", io::Error::last_os_error());
                return;
            }
            let mut done = Vec::new();
            let mut exited = Vec::new();
            // Logging takes the GIL (pyo3-log), and a Python thread may hold the GIL while it waits
            // for the scheduler lock: so lines are logged only after the lock is released.
            let mut logs = Vec::new();
            let forwarded;
            {
                let mut s = self.lock();
                for ev in &events[..n as usize] {
                    let (tok, flags) = (ev.u64, ev.events);
                    if tok == TOKEN_WAKE {
                        let mut buf = [0u8; 8];
                        unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                        // Before the pump below: a submission after it pokes again.
                        self.flush_poked.store(false, Ordering::Release);
                        continue;
                    }
                    let (number, which) = (tok >> 2, tok & 3);
                    let Some(i) = s.workers.iter().position(|w| w.number == number) else {
                        continue;
                    };
                    match which {
                        FD_RESULT => self.read_results(&mut s, i, &mut done, &mut logs),
                        FD_TASK if flags & libc::EPOLLOUT as u32 != 0 => {
                            self.flush(&mut s.workers[i])
                        }
                        FD_PID => exited.push(number),
                        _ => {}
                    }
                }
                for number in exited {
                    if let Some(i) = s.workers.iter().position(|w| w.number == number) {
                        self.read_results(&mut s, i, &mut done, &mut logs);
                        let w = s.workers.swap_remove(i);
                        self.worker_exited(&mut s, w, &mut done, &mut logs);
                    }
                }
                self.drain_inbox(&mut s, &mut done);
                self.expire_overdue(&mut s, &mut done, &mut logs);
                self.pump(&mut s);
                self.check_finished(&mut s);
                forwarded = std::mem::take(&mut s.forwarded);
                if self.is_finished(&s) {
                    drop(s);
                    emit(logs);
                    self.forward(forwarded);
                    self.finish(done);
                    return;
                }
            }
            emit(logs);
            // Records first: a task's log lines reach the parent before its result does.
            self.forward(forwarded);
            self.finish(done);
        }
    }

    fn read_results(
        &self,
        s: &mut Sched,
        i: usize,
        done: &mut Vec<(InFlight, Outcome)>,
        logs: &mut Vec<LogLine>,
    ) {
        let mut became_ready = false;
        let w = &mut s.workers[i];
        let mut timings = Vec::new();
        let mut unstarted = Vec::new();
        let mut drained = false;
        loop {
            while let Some((h, body)) = w.reader.next_frame() {
                match h.kind {
                    kind::READY => {
                        if w.state == WorkerState::Starting {
                            w.state = WorkerState::Ready;
                            became_ready = true;
                        }
                    }
                    kind::VALUE | kind::RAISED | kind::VALUE_FD | kind::RAISED_FD => {
                        let body = body.to_vec();
                        // Taken first: the memfd belongs to this frame even if it is stale.
                        let fd = matches!(h.kind, kind::VALUE_FD | kind::RAISED_FD)
                            .then(|| crate::shm::recv_memfd(w.memfd_fd.as_raw_fd()));
                        let Some(pos) = w.inflight.iter().position(|f| f.id == h.id) else {
                            continue;
                        };
                        let flight = w.inflight.remove(pos).unwrap();
                        if pos == 0 {
                            w.head_since = Instant::now();
                        }
                        let outcome = match (h.kind, fd) {
                            (kind::VALUE, _) => Outcome::Value(body),
                            (kind::RAISED, _) => Outcome::Raised(body),
                            (_, Some(Some(fd))) => Outcome::Shared {
                                ok: h.kind == kind::VALUE_FD,
                                pickle: body,
                                buffers: job::SharedFd(Arc::new(fd)),
                            },
                            _ => Outcome::WorkerLost(format!(
                                "worker {} (pid {}) sent a shared-memory result without its memfd",
                                w.number, w.pid
                            )),
                        };
                        timings.push(h.aux);
                        done.push((flight, outcome));
                    }
                    kind::LOG => {
                        if self.config.log_sink.is_some() {
                            s.forwarded.push(body.to_vec());
                        }
                    }
                    kind::INIT_FAILED => {
                        w.init_error = Some(String::from_utf8_lossy(body).into_owned())
                    }
                    kind::RETIRING => {
                        // It reads no more tasks: what it still holds never started.
                        w.state = WorkerState::Leaving;
                        unstarted.extend(w.inflight.drain(..));
                        logs.push((
                            log::Level::Info,
                            format!(
                                "worker {} (pid {}) is retiring: it uses {} MiB, over max_memory_per_child",
                                w.number,
                                w.pid,
                                h.aux >> 20
                            ),
                        ));
                    }
                    other => logs.push((
                        log::Level::Warn,
                        format!("worker {} sent an unknown frame kind {other}", w.pid),
                    )),
                }
            }
            if drained {
                break;
            }
            // A short read emptied the pipe: its frames are handled above, and the epoll (level
            // triggered) reports anything written since; one more read would cost a system
            // call under the scheduler lock to learn there is nothing.
            match w.reader.fill(w.result_fd.as_raw_fd()) {
                Ok(frame::Fill::Data) => continue,
                Ok(frame::Fill::Drained) => drained = true,
                Ok(_) | Err(_) => break,
            }
        }
        for ns in timings {
            s.avg_task_ns = 0.8 * s.avg_task_ns + 0.2 * ns as f64;
        }
        for flight in unstarted.into_iter().rev() {
            s.queue.push_front(flight);
        }
        if became_ready {
            s.init_failures = 0;
        }
    }

    fn worker_exited(
        &self,
        s: &mut Sched,
        mut w: Worker,
        done: &mut Vec<(InFlight, Outcome)>,
        logs: &mut Vec<LogLine>,
    ) {
        let ep = self.epoll.as_raw_fd();
        for fd in [
            w.result_fd.as_raw_fd(),
            w.task_fd.as_raw_fd(),
            w.pidfd.as_raw_fd(),
        ] {
            let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
        let status = self.launcher.reap(w.pid);
        let how = describe_exit(status);
        let who = format!("worker process {} (pid {})", w.number, w.pid);
        let terminated = s.lifecycle == Lifecycle::Terminated;
        let expected = w.timed_out || (w.state == WorkerState::Leaving && w.inflight.is_empty());
        let work_left = !s.queue.is_empty() || s.open_jobs > 0 || w.inflight.len() > 1;
        let mut replace = match s.lifecycle {
            Lifecycle::Running => true,
            Lifecycle::Closed => work_left,
            Lifecycle::Terminated => false,
        };
        // A worker that dies before it is ready failed in the initializer (or could not start
        // at all), unless someone SIGKILLed it: the OOM killer and `kill -9` are not its fault.
        let sigkilled = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        let failed_start = !terminated
            && (w.init_error.is_some() || (w.state == WorkerState::Starting && !sigkilled));
        if failed_start {
            s.init_failures += 1;
            let why = match &w.init_error {
                Some(tb) => format!(
                    "failed while starting (in the pool's initializer, or preparing `__main__`); \
                     the last one {how}:\n{tb}"
                ),
                None => format!(
                    "exited while starting, before running any task (in the pool's initializer?); \
                     the last one {how}"
                ),
            };
            logs.push((log::Level::Warn, format!("{who} {how} before it was ready")));
            if s.init_failures >= MAX_INIT_FAILURES && s.broken.is_none() {
                let reason = format!("{} worker processes in a row {why}", s.init_failures);
                s.broken = Some(reason.clone());
                done.extend(
                    s.queue
                        .drain(..)
                        .map(|f| (f, Outcome::WorkerLost(reason.clone()))),
                );
            }
        } else if !expected && !terminated {
            let then = if replace {
                "; starting a replacement"
            } else {
                ""
            };
            logs.push((log::Level::Warn, format!("{who} {how}{then}")));
        } else {
            logs.push((log::Level::Debug, format!("{who} {how}")));
        }
        replace &= s.broken.is_none();
        // A timed-out worker's running task has already failed; otherwise the first in-flight
        // task is the one it was running.
        if !w.timed_out {
            if let Some(lost) = w.inflight.pop_front() {
                let what = lost.job.describe_part(lost.part);
                done.push((
                    lost,
                    Outcome::WorkerLost(format!("{who} {how} while running {what}")),
                ));
            }
        }
        // The rest were never started: run them elsewhere, ahead of newer work.
        while let Some(flight) = w.inflight.pop_back() {
            if terminated {
                done.push((flight, Outcome::Terminated(TERMINATED.into())));
            } else {
                s.queue.push_front(flight);
            }
        }
        if replace {
            s.launching += 1;
            let _ = self.supervise_tx.send(SuperviseMsg::Launch);
        }
    }

    /// How long rpool-io may sleep: until the nearest time limit runs out, and at most a
    /// millisecond while short tasks are in flight (callers leave frames for it then).
    fn wait_ms(&self) -> (i32, bool) {
        let s = self.lock();
        let in_flight = s.workers.iter().any(|w| !w.inflight.is_empty());
        let deadline = s.workers.iter().filter_map(Worker::head_deadline).min();
        let mut ms = deadline.map_or(1000, |d| {
            let left = d.saturating_duration_since(Instant::now());
            left.as_micros().div_ceil(1000).min(1000) as i32
        });
        if s.avg_task_ns < SHORT_TASK_NS && in_flight {
            ms = ms.min(1);
        }
        self.io_sleeps_long.store(ms > 1, Ordering::Release);
        // See left_in_inbox: a task left there from now on pokes; one left before is seen here.
        fence(Ordering::SeqCst);
        if !self.inbox.is_empty() {
            ms = 0;
        }
        (ms, in_flight)
    }

    /// Kill each worker whose running task is past its time limit; that task fails with
    /// `TimedOut`, the tasks queued behind it go back to the queue when the worker is reaped.
    fn expire_overdue(
        &self,
        s: &mut Sched,
        done: &mut Vec<(InFlight, Outcome)>,
        logs: &mut Vec<LogLine>,
    ) {
        let now = Instant::now();
        for i in 0..s.workers.len() {
            if !s.workers[i].overdue(now) {
                continue;
            }
            // Its result may be sitting in the pipe: a task that finished in time is not failed.
            self.read_results(s, i, done, logs);
            let w = &mut s.workers[i];
            if !w.overdue(now) {
                continue;
            }
            let task = w
                .inflight
                .pop_front()
                .expect("a deadline means a running task");
            let limit = task.job.time_limit.unwrap_or_default().as_secs_f64();
            let msg = format!(
                "{} ran longer than its time limit of {limit} s; worker process {} (pid {}) was \
                 killed and replaced",
                task.job.describe_part(task.part),
                w.number,
                w.pid
            );
            kill_worker(w);
            w.timed_out = true;
            w.state = WorkerState::Leaving;
            logs.push((log::Level::Warn, msg.clone()));
            done.push((task, Outcome::TimedOut(msg)));
        }
    }
}

type LogLine = (log::Level, String);

fn emit(lines: Vec<LogLine>) {
    for (level, line) in lines {
        log::log!(target: "rpool", level, "{line}");
    }
}

/// How many tasks a worker may hold at once: enough to hide the round trip for tiny tasks,
/// one for long tasks so that no task waits behind another while a worker is idle.
fn prefetch_depth(avg_task_ns: f64) -> usize {
    const WINDOW_NS: f64 = 2_000_000.0;
    if avg_task_ns >= WINDOW_NS / 2.0 {
        1
    } else {
        ((WINDOW_NS / avg_task_ns.max(1.0)) as usize).clamp(2, 64)
    }
}

/// SIGKILL through the worker's pidfd: a fork server may already have reaped it, and a plain
/// pid could by then name some other process.
fn kill_worker(w: &Worker) {
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            w.pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0,
        )
    };
}

fn token(number: u64, which: u64) -> u64 {
    (number << 2) | which
}

fn cvt(r: i32) -> io::Result<i32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    cvt(unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) }).map(|_| ())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as RawFd;
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wait for a child that has exited (its pidfd said so) and return its raw wait status.
fn reap(pid: i32) -> i32 {
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return status;
        }
    }
}

pub fn describe_exit(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| format!("signal {sig}"));
        format!("was killed by {name} (signal {sig})")
    } else {
        format!("exited with code {}", libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::worker_pipes;
    use std::time::Instant;

    /// A worker without Python: `echo:X` answers X, `sleep:MS` sleeps then answers, `die` exits 7,
    /// `log:X` sends X as a LOG frame, then answers X.
    struct FakeLauncher;

    impl Launch for FakeLauncher {
        fn launch(&self, _number: u64) -> io::Result<Launched> {
            let pipes = worker_pipes()?;
            let parent = std::process::id() as libc::pid_t;
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                crate::launch::die_with_parent(parent);
                let (task, result) = (pipes.task_r.as_raw_fd(), pipes.result_w.as_raw_fd());
                crate::child::attach_result_pipe(result);
                let _ = crate::child::send(result, kind::READY, 0, 0, &[]);
                let mut reader = FrameReader::new();
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(task) };
                while let Ok(Some((h, body))) = reader.read_frame(fd) {
                    if h.kind == kind::STOP {
                        break;
                    }
                    let text = String::from_utf8_lossy(&body).into_owned();
                    if text == "die" {
                        unsafe { libc::_exit(7) };
                    }
                    if let Some(record) = text.strip_prefix("log:") {
                        let _ = crate::child::send_log(record.as_bytes());
                    }
                    let answer = if let Some(ms) = text.strip_prefix("sleep:") {
                        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                        ms.to_string()
                    } else {
                        let text = text.trim_start_matches("echo:");
                        text.trim_start_matches("log:").to_string()
                    };
                    let _ = crate::child::send(result, kind::VALUE, h.id, 1000, answer.as_bytes());
                }
                unsafe { libc::_exit(0) };
            }
            Ok(Launched {
                pid,
                task_fd: pipes.task_w,
                result_fd: pipes.result_r,
                memfd_fd: pipes.memfd_r,
                preamble: Vec::new(),
                pidfd: None,
            })
        }
    }

    fn pool(processes: usize, max_tasks: Option<u64>) -> Arc<Core> {
        let config = PoolConfig {
            processes,
            max_tasks_per_child: max_tasks,
            log_sink: None,
        };
        Core::start(config, Arc::new(FakeLauncher)).unwrap().0
    }

    #[test]
    fn log_frames_reach_the_sink_before_their_results() {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink_received = received.clone();
        let config = PoolConfig {
            processes: 2,
            max_tasks_per_child: None,
            log_sink: Some(Box::new(move |records| {
                sink_received.lock().unwrap().extend(records)
            })),
        };
        let core = Core::start(config, Arc::new(FakeLauncher)).unwrap().0;
        for round in 0..20 {
            let payload = format!("log:record {round}");
            let job = run(&core, &[&payload]);
            assert_eq!(
                received.lock().unwrap().last().cloned(),
                Some(format!("record {round}").into_bytes()),
                "the record was handed on before the result"
            );
            assert_eq!(
                job.take(0),
                Some(Outcome::Value(format!("record {round}").into_bytes()))
            );
        }
        assert_eq!(received.lock().unwrap().len(), 20);
        shut_down(&core);
    }

    #[test]
    fn log_frames_are_dropped_without_a_sink() {
        let core = pool(1, None);
        let job = run(&core, &["log:x", "echo:y"]);
        assert_eq!(job.take(0), Some(Outcome::Value(b"x".to_vec())));
        assert_eq!(job.take(1), Some(Outcome::Value(b"y".to_vec())));
        shut_down(&core);
    }

    fn run(core: &Arc<Core>, payloads: &[&str]) -> Arc<Job> {
        let job = core.new_job(Some(payloads.len()), false).unwrap();
        for (i, p) in payloads.iter().enumerate() {
            core.submit(&job, i, p.as_bytes()).unwrap();
        }
        assert!(
            job.wait_for(Duration::from_secs(10), |v| v.ready()),
            "job never finished"
        );
        job
    }

    /// Run `n` echo tasks as one job and check each part got its own answer.
    fn echo_each(core: &Arc<Core>, n: usize) {
        let payloads: Vec<String> = (0..n).map(|i| format!("echo:{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let job = run(core, &refs);
        for i in 0..n {
            assert_eq!(
                job.take(i),
                Some(Outcome::Value(i.to_string().into_bytes()))
            );
        }
    }

    fn shut_down(core: &Arc<Core>) {
        core.close();
        assert!(
            core.wait_finished(Duration::from_secs(10)),
            "workers did not exit after close"
        );
        core.join_threads();
    }

    /// Submit `payload` as a one-part job while the scheduler lock is held (as rpool-io holds
    /// it during its system calls): the submit must not wait for the lock.
    fn submit_while_locked(core: &Arc<Core>, payload: &str) -> Arc<Job> {
        let job = core.new_job(Some(1), false).unwrap();
        let held = core.lock();
        core.submit(&job, 0, payload.as_bytes()).unwrap();
        drop(held);
        job
    }

    #[test]
    fn a_task_submitted_while_the_lock_is_held_runs() {
        let core = pool(2, None);
        // Idle pool: rpool-io sleeps long and must be woken for it.
        let job = submit_while_locked(&core, "echo:idle");
        assert!(job.wait_for(Duration::from_secs(10), |v| v.ready()));
        assert_eq!(job.take(0), Some(Outcome::Value(b"idle".to_vec())));
        // Busy pool, and several submitting threads at once.
        let busy = run(&core, &["sleep:1"]);
        drop(busy);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let core = core.clone();
                std::thread::spawn(move || {
                    let payloads: Vec<String> = (0..300).map(|i| format!("echo:{t}-{i}")).collect();
                    let jobs: Vec<_> = payloads
                        .iter()
                        .map(|p| submit_while_locked(&core, p))
                        .collect();
                    for (job, p) in jobs.iter().zip(&payloads) {
                        assert!(job.wait_for(Duration::from_secs(10), |v| v.ready()));
                        let answer = p.trim_start_matches("echo:").as_bytes().to_vec();
                        assert_eq!(job.take(0), Some(Outcome::Value(answer)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        shut_down(&core);
    }

    #[test]
    fn close_runs_tasks_left_in_the_inbox() {
        let core = pool(1, None);
        let job = submit_while_locked(&core, "echo:last");
        core.close();
        assert!(core.wait_finished(Duration::from_secs(10)));
        assert_eq!(job.take(0), Some(Outcome::Value(b"last".to_vec())));
        core.join_threads();
    }

    #[test]
    fn terminate_fails_tasks_left_in_the_inbox() {
        let core = pool(1, None);
        let _long = core.new_job(Some(1), false).unwrap();
        core.submit(&_long, 0, b"sleep:5000").unwrap();
        let job = submit_while_locked(&core, "echo:never");
        core.terminate();
        assert!(job.wait_for(Duration::from_secs(10), |v| v.ready()));
        assert!(matches!(job.take(0), Some(Outcome::Terminated(_))));
        assert!(core.wait_finished(Duration::from_secs(10)));
        core.join_threads();
    }

    #[test]
    fn every_part_gets_its_own_answer() {
        let core = pool(2, None);
        echo_each(&core, 200);
        shut_down(&core);
    }

    #[test]
    fn a_dying_worker_fails_only_the_task_it_was_running() {
        let core = pool(1, None);
        // One worker: the death holds the head, the echo behind it was sent but never started.
        let job = run(&core, &["die", "echo:after"]);
        match job.take(0) {
            Some(Outcome::WorkerLost(msg)) => assert!(msg.contains("exited with code 7"), "{msg}"),
            other => panic!("expected WorkerLost, got {other:?}"),
        }
        assert_eq!(job.take(1), Some(Outcome::Value(b"after".to_vec())));
        // The pool replaced the worker and keeps serving.
        let again = run(&core, &["echo:still here"]);
        assert_eq!(again.take(0), Some(Outcome::Value(b"still here".to_vec())));
        shut_down(&core);
    }

    #[test]
    fn cancel_drops_only_queued_parts_of_that_job() {
        let core = pool(1, None);
        let busy = core.new_job(Some(1), false).unwrap();
        core.submit(&busy, 0, b"sleep:300").unwrap();
        let job = core.new_job(Some(3), false).unwrap();
        for i in 0..3 {
            core.submit(&job, i, b"echo:x").unwrap();
        }
        // One worker holding one long task: the three parts are still queued.
        assert_eq!(core.cancel(&job), 3);
        assert!(job.is_ready());
        assert!((0..3).all(|i| job.take(i) == Some(Outcome::Cancelled)));
        assert!(busy.wait_for(Duration::from_secs(10), |v| v.ready()));
        assert_eq!(busy.take(0), Some(Outcome::Value(b"300".to_vec())));
        assert_eq!(core.cancel(&busy), 0, "a finished job has nothing queued");
        shut_down(&core);
    }

    #[test]
    fn max_tasks_per_child_replaces_workers_without_losing_tasks() {
        let core = pool(2, Some(1));
        echo_each(&core, 20);
        shut_down(&core);
    }

    #[test]
    fn terminate_fails_unfinished_tasks_and_reaps_workers() {
        let core = pool(2, None);
        let job = core.new_job(Some(3), false).unwrap();
        for (i, p) in ["sleep:5000", "sleep:5000", "echo:queued"]
            .iter()
            .enumerate()
        {
            core.submit(&job, i, p.as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        core.terminate();
        assert!(core.wait_finished(Duration::from_secs(5)));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "terminate waited for the tasks"
        );
        assert!(job.is_ready());
        for i in 0..3 {
            assert!(matches!(job.take(i), Some(Outcome::Terminated(_))));
        }
        assert!(matches!(
            core.submit(&job, 0, b"x"),
            Err(SubmitError::NotRunning)
        ));
        core.join_threads();
    }

    #[test]
    fn close_lets_queued_work_finish_then_workers_exit() {
        let core = pool(2, None);
        let job = core.new_job(Some(4), false).unwrap();
        for i in 0..4 {
            core.submit(&job, i, b"sleep:50").unwrap();
        }
        core.close();
        assert!(
            core.new_job(Some(1), false).is_err(),
            "a closed pool accepts no new jobs"
        );
        assert!(core.wait_finished(Duration::from_secs(10)));
        assert!(job.is_ready());
        assert!(core.worker_pids().is_empty());
        core.join_threads();
    }

    #[test]
    fn a_task_over_its_time_limit_fails_and_the_tasks_behind_it_run() {
        let core = pool(1, None);
        let limit = Some(Duration::from_millis(200));
        let job = core
            .new_described_job(Some(3), false, "mod.slow".into(), limit)
            .unwrap();
        for (i, p) in ["sleep:10000", "echo:a", "echo:b"].iter().enumerate() {
            core.submit(&job, i, p.as_bytes()).unwrap();
        }
        assert!(job.wait_for(Duration::from_secs(10), |v| v.ready()));
        match job.take(0) {
            Some(Outcome::TimedOut(msg)) => assert!(
                msg.starts_with("mod.slow (chunk 1 of 3) ran longer than its time limit of 0.2 s"),
                "{msg}"
            ),
            other => panic!("expected TimedOut, got {other:?}"),
        }
        assert_eq!(job.take(1), Some(Outcome::Value(b"a".to_vec())));
        assert_eq!(job.take(2), Some(Outcome::Value(b"b".to_vec())));
        shut_down(&core);
    }

    #[test]
    fn prefetch_is_deep_for_tiny_tasks_and_one_for_long_ones() {
        assert_eq!(prefetch_depth(10_000_000.0), 1);
        assert_eq!(prefetch_depth(1_000_000.0), 1);
        assert_eq!(prefetch_depth(100_000.0), 20);
        assert_eq!(prefetch_depth(1_000.0), 64);
    }
}
