//! Length-prefixed frames on a pipe: the only wire format between the pool and its workers.
//!
//! A frame is a 24-byte header (kind, payload length, task id, an auxiliary word) and the payload.
//! Short reads and EOF inside a frame are errors; EOF between frames is the peer leaving.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

pub const HEADER_LEN: usize = 24;

/// Frame kinds. Parent to worker: `TASK`, `STOP`, `CONFIG`. Worker to parent: the rest.
pub mod kind {
    /// `aux` is the length of the pickled callable the payload starts with (`TASK_CALLABLE_LEN`),
    /// the rest being a pickled `(args, kwds)`; 0 when the payload is one pickled
    /// `(func, args, kwds)`. With `TASK_REUSABLE`, the worker may keep the unpickled callable for
    /// later tasks that start with the same bytes (a function sent by name has no state to lose).
    pub const TASK: u8 = 1;
    pub const STOP: u8 = 2;
    /// Pickled start-up data for an exec'd worker; sent before any task.
    pub const CONFIG: u8 = 3;
    pub const READY: u8 = 10;
    pub const VALUE: u8 = 11;
    pub const RAISED: u8 = 12;
    /// The initializer raised; the payload is the traceback text.
    pub const INIT_FAILED: u8 = 13;
    /// After its last result: the worker grew past its memory limit and reads no more tasks.
    /// `aux` is its resident set size in bytes.
    pub const RETIRING: u8 = 14;
    /// A log record a task logged, for the parent's `logging` (`Pool(forward_logs=True)`);
    /// the payload is opaque to the core. Sent before the result of the task that logged it.
    pub const LOG: u8 = 15;
    /// VALUE and RAISED whose pickle keeps its large buffers in a memfd, which the worker sent
    /// just before, on its memfd socket (see rpool._shm).
    pub const VALUE_FD: u8 = 16;
    pub const RAISED_FD: u8 = 17;
}

pub const TASK_CALLABLE_LEN: u64 = 0xffff_ffff;
pub const TASK_REUSABLE: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: u32,
    pub id: u64,
    /// For results: nanoseconds the task ran in the worker.
    pub aux: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.kind;
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.aux.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Header {
        Header {
            kind: raw[0],
            len: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
            id: u64::from_le_bytes(raw[8..16].try_into().unwrap()),
            aux: u64::from_le_bytes(raw[16..24].try_into().unwrap()),
        }
    }
}

/// Encode one frame into `out` (used where frames are batched into one buffer).
pub fn encode_into(out: &mut Vec<u8>, kind: u8, id: u64, aux: u64, payload: &[u8]) {
    encode_parts_into(out, kind, id, aux, &[payload]);
}

/// `encode_into` for a payload made of several pieces, written one after the other.
pub fn encode_parts_into(out: &mut Vec<u8>, kind: u8, id: u64, aux: u64, payload: &[&[u8]]) {
    let total: usize = payload.iter().map(|p| p.len()).sum();
    let len = u32::try_from(total).expect("frame payload over 4 GiB");
    out.reserve(HEADER_LEN + total);
    out.extend_from_slice(&Header { kind, len, id, aux }.encode());
    for piece in payload {
        out.extend_from_slice(piece);
    }
}

/// Reads frames from a pipe into one growing buffer, so that one `read` can deliver many frames.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

pub enum Fill {
    /// Some bytes arrived.
    Data,
    /// Some bytes arrived, fewer than there was room for: the pipe was empty after them, so
    /// another read now would most likely find nothing.
    Drained,
    /// The writer closed its end.
    Eof,
    /// Nothing to read now (non-blocking descriptor).
    WouldBlock,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader {
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        }
    }

    /// The next complete frame already buffered, if any.
    pub fn next_frame(&mut self) -> Option<(Header, &[u8])> {
        let avail = self.end - self.start;
        if avail < HEADER_LEN {
            return None;
        }
        let header = Header::decode(&self.buf[self.start..self.start + HEADER_LEN]);
        let total = HEADER_LEN + header.len as usize;
        if avail < total {
            return None;
        }
        let body = self.start + HEADER_LEN..self.start + total;
        self.start += total;
        Some((header, &self.buf[body]))
    }

    /// True when bytes of an unfinished frame are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    /// Read once from `fd`, making room for at least the frame being assembled.
    pub fn fill(&mut self, fd: RawFd) -> io::Result<Fill> {
        self.make_room();
        loop {
            let n = unsafe {
                libc::read(
                    fd,
                    self.buf[self.end..].as_mut_ptr().cast(),
                    self.buf.len() - self.end,
                )
            };
            if n > 0 {
                let room = self.buf.len() - self.end;
                self.end += n as usize;
                return Ok(if (n as usize) < room {
                    Fill::Drained
                } else {
                    Fill::Data
                });
            }
            if n == 0 {
                return Ok(Fill::Eof);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                _ => return Err(err),
            }
        }
    }

    /// Blocking: make sure a whole frame is buffered (then `next_frame` returns it).
    /// Returns false at a clean EOF between frames.
    pub fn wait_frame(&mut self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        self.wait_frame_spinning(fd, Duration::ZERO)
    }

    /// `wait_frame`, first polling for up to `spin` before sleeping: a frame that comes within
    /// it is read without the wake-up of a sleeping process, which costs more than the whole
    /// round trip on some machines (a halted virtual CPU).
    pub fn wait_frame_spinning(&mut self, fd: BorrowedFd<'_>, spin: Duration) -> io::Result<bool> {
        if !self.peek_complete() && !spin.is_zero() {
            poll_for(fd.as_raw_fd(), spin);
        }
        loop {
            if self.peek_complete() {
                return Ok(true);
            }
            match self.fill(fd.as_raw_fd())? {
                Fill::Data | Fill::Drained => {}
                Fill::Eof if self.has_partial() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "pipe closed inside a frame",
                    ))
                }
                Fill::Eof => return Ok(false),
                Fill::WouldBlock => wait_readable(fd.as_raw_fd())?,
            }
        }
    }

    fn peek_complete(&self) -> bool {
        let avail = self.end - self.start;
        avail >= HEADER_LEN
            && avail
                >= HEADER_LEN
                    + Header::decode(&self.buf[self.start..self.start + HEADER_LEN]).len as usize
    }

    /// Blocking: the next frame, or `None` at a clean EOF between frames.
    pub fn read_frame(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<(Header, Vec<u8>)>> {
        if !self.wait_frame(fd)? {
            return Ok(None);
        }
        Ok(self.next_frame().map(|(h, body)| (h, body.to_vec())))
    }

    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let needed = if self.end - self.start >= HEADER_LEN {
            let h = Header::decode(&self.buf[self.start..self.start + HEADER_LEN]);
            HEADER_LEN + h.len as usize
        } else {
            HEADER_LEN
        };
        if self.start > 0 && self.buf.len() - self.start < needed.max(16 * 1024) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start < needed {
            self.buf.resize(self.start + needed, 0);
        }
        if self.end == self.buf.len() {
            let grow = self.buf.len();
            self.buf.resize(grow * 2, 0);
        }
    }
}

/// Look at `ready` until it holds or `limit` has passed, without sleeping, letting other threads
/// of this CPU run in between. Returns whether it held. rpool polls like this for a short while
/// where a sleeping thread's wake-up would cost more than the wait (a halted virtual CPU).
pub fn spin_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Poll `fd` for up to `spin` without sleeping. Returns whether it became readable.
pub fn poll_for(fd: RawFd, spin: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    spin_until(spin, || unsafe { libc::poll(&mut pfd, 1, 0) } != 0)
}

fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Write all of `parts` to a blocking descriptor, retrying on EINTR and short writes.
pub fn write_all(fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let n = write_some(fd, parts, idx, off)?;
        advance(parts, &mut idx, &mut off, n);
    }
    Ok(())
}

/// One `writev` of `parts[idx..]` starting `off` bytes into `parts[idx]`.
pub fn write_some(fd: RawFd, parts: &[&[u8]], idx: usize, off: usize) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity((parts.len() - idx).min(512));
    for (i, p) in parts[idx..].iter().enumerate().take(512) {
        let skip = if i == 0 { off } else { 0 };
        if p.len() > skip {
            iov.push(libc::iovec {
                iov_base: p[skip..].as_ptr() as *mut _,
                iov_len: p.len() - skip,
            });
        }
    }
    if iov.is_empty() {
        return Ok(0);
    }
    loop {
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            wait_writable(fd)?;
            continue;
        }
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn wait_writable(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    unsafe { libc::poll(&mut pfd, 1, -1) };
    Ok(())
}

fn advance(parts: &[&[u8]], idx: &mut usize, off: &mut usize, mut n: usize) {
    while *idx < parts.len() {
        let left = parts[*idx].len() - *off;
        if n < left {
            *off += n;
            return;
        }
        n -= left;
        *idx += 1;
        *off = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: kind::VALUE,
            len: 77,
            id: u64::MAX - 3,
            aux: 12345,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn many_frames_arrive_from_one_read() {
        let (r, w) = pipe();
        let mut batch = Vec::new();
        for i in 0..100u64 {
            encode_into(
                &mut batch,
                kind::TASK,
                i,
                0,
                format!("payload {i}").as_bytes(),
            );
        }
        write_all(w.as_raw_fd(), &[&batch]).unwrap();
        drop(w);
        let mut reader = FrameReader::new();
        for i in 0..100u64 {
            let (h, body) = reader.read_frame(r.as_fd()).unwrap().unwrap();
            assert_eq!((h.kind, h.id), (kind::TASK, i));
            assert_eq!(body, format!("payload {i}").as_bytes());
        }
        assert!(reader.read_frame(r.as_fd()).unwrap().is_none());
    }

    #[test]
    fn frame_larger_than_the_buffer_and_the_pipe() {
        let (r, w) = pipe();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = std::thread::spawn(move || {
            let h = Header {
                kind: kind::TASK,
                len: big.len() as u32,
                id: 9,
                aux: 0,
            }
            .encode();
            write_all(w.as_raw_fd(), &[&h, &big]).unwrap();
        });
        let mut reader = FrameReader::new();
        let (h, body) = reader.read_frame(r.as_fd()).unwrap().unwrap();
        writer.join().unwrap();
        assert_eq!(h.id, 9);
        assert!(body == expected);
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let (r, w) = pipe();
        let h = Header {
            kind: kind::TASK,
            len: 10,
            id: 1,
            aux: 0,
        }
        .encode();
        write_all(w.as_raw_fd(), &[&h, b"abc"]).unwrap();
        drop(w);
        let err = FrameReader::new().read_frame(r.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
