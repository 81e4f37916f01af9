//! Starting worker processes: the one place that decides between fork and fork+exec.
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

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

/// fork+exec of a fresh interpreter per worker (`spawn`): nothing of the parent's
/// memory is shared, so this is safe from any thread.
pub struct ExecLauncher {
    pub argv: Vec<String>,
    /// Pickled start-up frames' payloads, sent as CONFIG frames before any task.
    pub preamble: Vec<Vec<u8>>,
}

/// fork+exec `argv` with `fds[0]`, `fds[1]` (and `fds[2]`) at fd 3, 4 (and 5), dying with the
/// calling thread.
pub fn exec_with_fds(argv: &[String], fds: &[RawFd]) -> io::Result<std::process::Child> {
    let fds = fds.to_vec();
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    unsafe {
        cmd.pre_exec(move || {
            // Move the ends to fixed numbers, via high numbers so none clobbers another.
            let mut high = [-1; 3];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD, 10);
                if high[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, EXEC_TASK_FD + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(fd);
            }
            die_with_parent(parent);
            Ok(())
        });
    }
    cmd.spawn()
}

impl Launch for ExecLauncher {
    fn launch(&self, number: u64) -> io::Result<Launched> {
        let pipes = worker_pipes()?;
        let child = exec_with_fds(
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
            pid: child.id() as i32,
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
