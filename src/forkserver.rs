//! The `forkserver` start method: one server process per pool, started by exec, prepares
//! `__main__` and the worker setup once, then forks a worker for each request.
//!
//! The server is single-threaded, so its forks are safe whatever threads the pool's parent runs.
//! Workers are the server's children, not the pool's: the server reaps them and reports each
//! exit status, so the pool can still say how a worker died.
//!
//! Control socket (SOCK_SEQPACKET, one 24-byte frame header per message):
//! pool → server `SPAWN(id = worker number)` carrying the worker's two pipe ends (SCM_RIGHTS);
//! server → pool `SPAWNED(id = number, aux = pid)` and `EXITED(id = pid, aux = wait status)`.

use crate::frame::{self, Header, HEADER_LEN};
use crate::launch::{self, worker_pipes, WorkerPipes, EXEC_RESULT_FD, EXEC_TASK_FD};
use crate::pool::{Launch, Launched};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const SPAWN: u8 = 20;
pub const SPAWNED: u8 = 21;
pub const EXITED: u8 = 22;

pub fn send_msg(sock: RawFd, h: Header, fds: &[RawFd]) -> io::Result<()> {
    let raw = h.encode();
    let iov = [IoSlice::new(&raw)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message and the descriptors it carried; `None` when the peer closed the socket.
pub fn recv_msg(sock: RawFd) -> io::Result<Option<(Header, Vec<OwnedFd>)>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    loop {
        let mut iov = [IoSliceMut::new(&mut raw)];
        match socket::recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                if msg.bytes == 0 {
                    return Ok(None);
                }
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                return Ok(Some((Header::decode(&raw), fds)));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

struct Server {
    pid: i32,
    sock: OwnedFd,
    /// Worker number → its pid and the pidfd the server opened for it.
    spawned: HashMap<u64, (i32, Option<OwnedFd>)>,
    exited: HashMap<i32, i32>,
}

impl Server {
    /// Read one message (waiting up to `timeout`) and file it.
    fn read_one(&mut self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let r = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if r <= 0 {
            return Ok(());
        }
        match recv_msg(self.sock.as_raw_fd())? {
            Some((h, mut fds)) if h.kind == SPAWNED => {
                self.spawned.insert(h.id, (h.aux as i32, fds.pop()));
            }
            Some((h, _)) if h.kind == EXITED => {
                self.exited.insert(h.id as i32, h.aux as i32);
            }
            Some(_) => {}
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the fork server exited",
                ))
            }
        }
        Ok(())
    }
}

/// A fork server process that waits for its CONFIG frames: started as early as the program
/// allows (see `Pool` of `rpool.get_context`), so that its interpreter boots while the parent
/// still imports, and handed to the pool's launcher. Dropped unused, it is stopped.
pub struct StartedServer {
    argv: Vec<String>,
    /// None once handed on.
    parts: Option<(i32, OwnedFd, OwnedFd)>,
}

impl StartedServer {
    pub fn start(argv: Vec<String>) -> io::Result<StartedServer> {
        let (ours, theirs) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )?;
        let (config_r, config_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let pid = launch::exec_with_fds(&argv, &[theirs.as_raw_fd(), config_r.as_raw_fd()])?;
        Ok(StartedServer {
            argv,
            parts: Some((pid, ours, config_w)),
        })
    }

    /// Write the server's CONFIG frames: from then on it forks workers on request.
    fn configure(mut self, preamble: &[Vec<u8>]) -> io::Result<Server> {
        let (pid, sock, config_w) = self.parts.take().expect("a server is configured once");
        let mut config = Vec::new();
        for part in preamble {
            frame::encode_into(&mut config, frame::kind::CONFIG, 0, 0, part);
        }
        if let Err(e) = frame::write_all(config_w.as_raw_fd(), &[&config]) {
            let how = stop_server(pid, Duration::from_millis(500));
            return Err(io::Error::new(
                e.kind(),
                format!("the fork server {how}: {e}"),
            ));
        }
        Ok(Server {
            pid,
            sock,
            spawned: HashMap::new(),
            exited: HashMap::new(),
        })
    }
}

impl Drop for StartedServer {
    fn drop(&mut self) {
        if let Some((pid, sock, config_w)) = self.parts.take() {
            drop((sock, config_w)); // EOF on both: the server exits at once.
            stop_server(pid, Duration::from_millis(500));
        }
    }
}

pub struct ForkServerLauncher {
    pub argv: Vec<String>,
    /// The server's start-up frames' payloads (spawn preparation data, worker setup).
    pub preamble: Vec<Vec<u8>>,
    server: Mutex<Option<Server>>,
    /// A server started before the pool, used for its first server if it runs `argv`.
    started: Mutex<Option<StartedServer>>,
}

impl ForkServerLauncher {
    pub fn new(argv: Vec<String>, preamble: Vec<Vec<u8>>, started: Option<StartedServer>) -> Self {
        ForkServerLauncher {
            argv,
            preamble,
            server: Mutex::new(None),
            started: Mutex::new(started),
        }
    }

    fn start_server(&self) -> io::Result<Server> {
        let started = match self.started.lock().unwrap().take() {
            Some(early) if early.argv == self.argv => early,
            _ => StartedServer::start(self.argv.clone())?,
        };
        started.configure(&self.preamble)
    }
}

impl ForkServerLauncher {
    fn spawn_worker(
        &self,
        server: &mut Server,
        number: u64,
        pipes: &WorkerPipes,
    ) -> io::Result<(i32, Option<OwnedFd>)> {
        let request = Header {
            kind: SPAWN,
            len: 0,
            id: number,
            aux: 0,
        };
        send_msg(
            server.sock.as_raw_fd(),
            request,
            &[
                pipes.task_r.as_raw_fd(),
                pipes.result_w.as_raw_fd(),
                pipes.memfd_w.as_raw_fd(),
            ],
        )?;
        // A fresh server first imports __main__ and the setup: allow for a slow start.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.spawned.contains_key(&number) {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the fork server did not start a worker",
                ));
            }
            server.read_one(Duration::from_millis(100))?;
        }
        // The server answers pid 0 when its fork() failed.
        match server.spawned.remove(&number).unwrap() {
            (0, _) => Err(io::Error::other("the fork server could not fork a worker")),
            spawned => Ok(spawned),
        }
    }
}

/// Stop a fork server process: wait up to `grace` for it to exit (it does once its socket is
/// closed), then SIGKILL it; reap it and say how it ended.
fn stop_server(pid: i32, grace: Duration) -> String {
    let mut status = 0;
    let deadline = Instant::now() + grace;
    // Wait on a pidfd first: it wakes us the moment the server exits, which the polling below
    // (for kernels without pidfds) notices only at its next tick.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd >= 0 {
        let mut exit = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = grace.as_millis().min(i32::MAX as u128) as libc::c_int;
        while unsafe { libc::poll(&mut exit, 1, ms) } < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
        unsafe { libc::close(pidfd) };
    }
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
        if Instant::now() >= deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return "stopped answering and was killed".into();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    crate::pool::describe_exit(status)
}

impl Launch for ForkServerLauncher {
    fn launch(&self, number: u64) -> io::Result<Launched> {
        let pipes = worker_pipes()?;
        let mut guard = self.server.lock().unwrap();
        let mut last_error = None;
        // A server that died is replaced once; a second death in a row is reported.
        for _ in 0..2 {
            let attempt = match guard.as_mut() {
                Some(server) => self.spawn_worker(server, number, &pipes),
                None => self
                    .start_server()
                    .and_then(|server| self.spawn_worker(guard.insert(server), number, &pipes)),
            };
            match attempt {
                Ok((pid, pidfd)) => {
                    return Ok(Launched {
                        pid,
                        task_fd: pipes.task_w,
                        result_fd: pipes.result_r,
                        memfd_fd: pipes.memfd_r,
                        preamble: Vec::new(),
                        pidfd,
                    })
                }
                Err(e) => {
                    let Some(dead) = guard.take() else {
                        last_error = Some(e);
                        continue;
                    };
                    let pid = dead.pid;
                    drop(dead.sock);
                    let how = stop_server(pid, Duration::from_millis(500));
                    log::warn!(target: "rpool", "the fork server (pid {pid}) {how}: {e}");
                    last_error = Some(io::Error::new(
                        e.kind(),
                        format!("the fork server (pid {pid}) {how}: {e}"),
                    ));
                }
            }
        }
        Err(last_error.unwrap())
    }

    fn reap(&self, pid: i32) -> i32 {
        let mut guard = self.server.lock().unwrap();
        let Some(server) = guard.as_mut() else {
            return 0;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !server.exited.contains_key(&pid) && Instant::now() < deadline {
            if server.read_one(Duration::from_millis(50)).is_err() {
                break;
            }
        }
        server.exited.remove(&pid).unwrap_or(0)
    }

    fn release(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            drop(server.sock); // EOF: the server exits, and its workers with it.
            stop_server(server.pid, Duration::from_secs(2));
        }
    }
}

/// The server's descriptors, as the exec'd process finds them.
pub const SERVER_SOCK_FD: RawFd = EXEC_TASK_FD;
pub const SERVER_CONFIG_FD: RawFd = EXEC_RESULT_FD;

/// Block SIGCHLD and return a signalfd for it, so the server's loop can wait on both its socket
/// and its children. Forked workers unblock it again.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub fn unblock_sigchld() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Reap every exited child of the server and report it.
pub fn report_exits(sock: RawFd, sigfd: RawFd) {
    let mut buf = [0u8; 128];
    while unsafe { libc::read(sigfd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    loop {
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let _ = send_msg(
            sock,
            Header {
                kind: EXITED,
                len: 0,
                id: pid as u64,
                aux: status as u32 as u64,
            },
            &[],
        );
    }
}
