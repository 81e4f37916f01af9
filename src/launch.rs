//! Starting worker processes: the one place that decides between fork and a fresh interpreter.
//!
//! Why forking here is safe although the parent runs Rust threads: the fork happens (on the main
//! thread for a pool's first workers, on rpool-supervise for replacements; see `Core::start`)
//! while the forking thread holds the GIL, between `PyOS_BeforeFork` and `PyOS_AfterFork_*`, so
//! the interpreter's own locks are in a known state. The child runs only `child::serve` on its own
//! two pipe ends and calls into Python; it never touches the parent's Rust state (scheduler mutex,
//! channels), which other threads may have held at the moment of the fork. Rust allocates through
//! glibc's malloc, which is fork-safe. Python objects are never dropped by a thread without the
//! GIL in rpool, so pyo3's deferred-decref lock cannot be held by another thread at fork time.
//!
//! Every worker gets PR_SET_PDEATHSIG(SIGKILL): it dies with the thread that started it, which is
//! the main thread (it ends with the process) or rpool-supervise (it lives until the pool's
//! workers are gone). Workers learn to stop from a
//! STOP frame and the parent learns of exits from a pidfd, so a pipe end inherited by some other
//! process can neither keep a worker alive nor hide a death.

use crate::frame::{self, kind};
use crate::pool::{Launch, Launched};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The two pipes of one worker: (task read end, task write end), (result read end, result write
/// end), and its memfd socket: (parent's end, worker's end).
pub struct WorkerPipes {
    pub task_r: OwnedFd,
    pub task_w: OwnedFd,
    pub result_r: OwnedFd,
    pub result_w: OwnedFd,
    pub memfd_r: OwnedFd,
    pub memfd_w: OwnedFd,
}

pub fn worker_pipes() -> io::Result<WorkerPipes> {
    let flags = nix::fcntl::OFlag::O_CLOEXEC;
    let (task_r, task_w) = nix::unistd::pipe2(flags)?;
    let (result_r, result_w) = nix::unistd::pipe2(flags)?;
    // Bigger pipes: fewer wake-ups for large payloads and deep prefetch.
    for fd in [&task_w, &result_w] {
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    let (memfd_r, memfd_w) = crate::shm::memfd_socket()?;
    Ok(WorkerPipes {
        task_r,
        task_w,
        result_r,
        result_w,
        memfd_r,
        memfd_w,
    })
}

/// Called in a freshly forked child: die with the parent thread, and notice if it is already gone.
pub fn die_with_parent(parent: libc::pid_t) {
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// The fd numbers an exec'd worker finds its pipes (and memfd socket) on.
pub const EXEC_TASK_FD: i32 = 3;
pub const EXEC_RESULT_FD: i32 = 4;
pub const EXEC_MEMFD_FD: i32 = 5;

/// A fresh interpreter per worker (`spawn`), started by `exec_with_fds`: nothing of the parent's
/// memory is shared, so this is safe from any thread.
pub struct ExecLauncher {
    pub argv: Vec<String>,
    /// Pickled start-up frames' payloads, sent as CONFIG frames before any task.
    pub preamble: Vec<Vec<u8>>,
}

/// Start `argv` with `fds[0]`, `fds[1]` (and `fds[2]`) at fd 3, 4 (and 5), returning its pid.
///
/// By posix_spawn, which glibc does with a vfork: nothing of this process is copied. A fork of a
/// pool's parent (the interpreter, the core's threads) costs ~2 ms here in page tables and
/// copy-on-write faults, on the path of every exec'd pool's start-up, only for exec to throw it
/// away. The child gets this process's pid as its last argument, and `die_with_exec_parent`
/// then ties its life to the thread that started it, as a fork's `die_with_parent` does.
pub fn exec_with_fds(argv: &[String], fds: &[RawFd]) -> io::Result<libc::pid_t> {
    check_argv(argv)?;
    // Sources above every target, so that no dup2 overwrites a source still to be moved.
    let sources = fds
        .iter()
        .map(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)))
        .map(|fd| fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect::<Result<Vec<_>, _>>()?;
    let mut args = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).expect("checked"))
        .collect::<Vec<_>>();
    args.push(CString::new(std::process::id().to_string()).expect("digits"));
    let mut pointers: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    pointers.push(std::ptr::null_mut());
    extern "C" {
        static environ: *const *mut libc::c_char;
    }
    unsafe {
        let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
        let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
        libc::posix_spawn_file_actions_init(actions.as_mut_ptr());
        libc::posix_spawnattr_init(attr.as_mut_ptr());
        let mut rc = 0;
        for (target, source) in (EXEC_TASK_FD..).zip(&sources) {
            if rc == 0 {
                rc = libc::posix_spawn_file_actions_adddup2(
                    actions.as_mut_ptr(),
                    source.as_raw_fd(),
                    target,
                );
            }
        }
        // As std's Command: no blocked signals, SIGPIPE back to its default.
        let mut no_signals = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut no_signals);
        let mut sigpipe = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut sigpipe);
        libc::sigaddset(&mut sigpipe, libc::SIGPIPE);
        libc::posix_spawnattr_setsigmask(attr.as_mut_ptr(), &no_signals);
        libc::posix_spawnattr_setsigdefault(attr.as_mut_ptr(), &sigpipe);
        let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        libc::posix_spawnattr_setflags(attr.as_mut_ptr(), flags as libc::c_short);
        let mut pid: libc::pid_t = 0;
        if rc == 0 {
            rc = libc::posix_spawnp(
                &mut pid,
                args[0].as_ptr(),
                actions.as_ptr(),
                attr.as_ptr(),
                pointers.as_ptr(),
                environ,
            );
        }
        libc::posix_spawn_file_actions_destroy(actions.as_mut_ptr());
        libc::posix_spawnattr_destroy(attr.as_mut_ptr());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(pid)
    }
}

/// In a process started by `exec_with_fds`: die with the thread that started it (whose process's
/// pid is our last argument), and exit now if that process is already gone.
pub fn die_with_exec_parent(argv: &[String]) {
    if let Some(parent) = argv.last().and_then(|pid| pid.parse::<libc::pid_t>().ok()) {
        die_with_parent(parent);
    }
}

impl Launch for ExecLauncher {
    fn launch(&self, number: u64) -> io::Result<Launched> {
        let pipes = worker_pipes()?;
        let pid = exec_with_fds(
            &self.argv,
            &[
                pipes.task_r.as_raw_fd(),
                pipes.result_w.as_raw_fd(),
                pipes.memfd_w.as_raw_fd(),
            ],
        )?;
        let mut preamble = Vec::new();
        for part in &self.preamble {
            frame::encode_into(&mut preamble, kind::CONFIG, number, 0, part);
        }
        Ok(Launched {
            pid,
            task_fd: pipes.task_w,
            result_fd: pipes.result_r,
            memfd_fd: pipes.memfd_r,
            preamble,
            pidfd: None,
        })
    }
}

/// Refuse a worker command line that exec could not take.
pub fn check_argv(argv: &[String]) -> io::Result<()> {
    if argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty worker command line",
        ));
    }
    for a in argv {
        CString::new(a.as_bytes()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "NUL in worker command line")
        })?;
    }
    Ok(())
}
