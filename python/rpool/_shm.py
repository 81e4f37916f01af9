"""Large buffers of tasks and results go through shared memory (a memfd), not the pipes.

A task or result holding a `bytes`/`bytearray` of at least `MIN_SHARED` bytes, or an object whose
pickle gives such an out-of-band buffer (pickle protocol 5: numpy arrays, `PickleBuffer`), is
pickled with those buffers left out; they are written once into a memfd and read once on the
other side. The pickle that travels on the pipe is small. A memfd is reused once no one can still
read it: writing into pages the kernel already has is several times faster. Both sides copy with
a memcpy through mappings they keep (a kernel `pread`/`pwrite` of the same bytes costs about half
as much again).

Who owns the memfd, so that nothing outlives the processes that use it (a memfd has no name):
- Tasks: the parent creates it; the core keeps it open until the task has an outcome (result,
  worker lost, timed out, terminated); the worker opens it through /proc/<parent>/fd/<n> while
  it unpickles the task and checks it is the same file (inode).
- Results: the worker sends it to the parent on its memfd socket (SCM_RIGHTS: in flight, the
  kernel holds it) just before the result frame, which says to take it; the parent holds it
  until the result is read.
Small tasks never get here: a cheap look at the top of the object decides.
"""

from __future__ import annotations

import _pickle as pickle  # `pickle`'s own functions, without importing its Python half (re...)
import _thread
import functools  # _pickle imports it anyway
import io
import os
import struct

from . import _rpool

# Workers import this module at start-up: multiprocessing.reduction's ForkingPickler (socket,
# array, ...) is imported only when something plain pickle refuses or a large buffer comes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Buffers this big (bytes) leave the pickle stream; a memfd costs a few system calls. The
# environment variable lets a setup where /proc/<pid>/fd cannot be opened turn it off.
MIN_SHARED = int(os.environ.get("RPOOL_SHM_MIN_BYTES", 1 << 20))
# How many objects the look for large buffers takes in what `quick_dumps` cannot write (it
# runs for every task and result).
_LOOK_BUDGET = 16
_ALIGN = 4096

_BYTES, _BYTEARRAY, _BUFFER = 0, 1, 2


class SharedPayload(bytes):
    """A pickle whose large buffers are in a memfd.

    A task's: `fd` is that memfd (the number its envelope names); the core takes it over when the
    task is submitted and sets `fd` to -1, until then this object owns it. A result's: the memfd
    has already gone to the parent, and `fd` is -1.
    """

    def __del__(self):
        fd = self.__dict__.get("fd", -1)
        if fd >= 0:
            self.fd = -1
            os.close(fd)


@functools.cache
def _sharing_pickler():
    """The pickler class for large payloads, defined on first use (it is a ForkingPickler)."""
    from multiprocessing.reduction import ForkingPickler

    class _SharingPickler(ForkingPickler):
        """Leaves large bytes and bytearrays out of the stream (as persistent ids, since pickle's
        fast path for exact `bytes` never asks a reducer) and collects out-of-band buffers."""

        def __init__(self, file, buffers):
            super().__init__(file, 5, True, _collector(buffers))  # ForkingPickler takes no keywords
            self.objects = []
            self._ids = {}

        def persistent_id(self, obj):
            kind = type(obj)
            if (kind is bytes or kind is bytearray) and len(obj) >= MIN_SHARED:
                index = self._ids.get(id(obj))
                if index is None:
                    index = self._ids[id(obj)] = len(self.objects)
                    self.objects.append(obj)
                return index
            return None

    return _SharingPickler


def _collector(buffers):
    def collect(buffer):
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if raw.nbytes < MIN_SHARED:
            return True
        buffers.append(raw)
        return False

    return collect


def dumps(
    obj: object,
    _quick: Callable[[object, int, int], bytes | bool] = _rpool.quick_dumps,
    _min: int = MIN_SHARED,
    _look: int = _LOOK_BUDGET,
) -> bytes:
    """Pickle a task as rpool's pool does (protocol 5, ForkingPickler's reducers if needed); if
    it holds large buffers, return a `SharedPayload` whose memfd holds them. The core keeps that
    memfd until the task ends; the worker opens it through /proc."""
    # Plain data (most arguments) is pickled natively; else the answer says where it goes.
    quick = _quick(obj, _min, _look)
    if quick is True or quick is False:
        return _dumps_not_plain(obj, quick, False)
    return quick


def dumps_result(
    obj: object,
    _quick: Callable[[object, int, int], bytes | bool] = _rpool.quick_dumps,
    _min: int = MIN_SHARED,
    _look: int = _LOOK_BUDGET,
) -> bytes:
    """`dumps` for a worker's result or exception: its memfd goes to the parent at once."""
    quick = _quick(obj, _min, _look)
    if quick is True or quick is False:
        return _dumps_not_plain(obj, quick, True)
    return quick


def _dumps_not_plain(obj: object, shared: bool, sent: bool) -> bytes:
    """What `quick_dumps` did not write: through shared memory if `shared` (`sent`: its memfd
    goes to the parent now), else with pickle, plain pickle's faster path first."""
    if shared:
        return _dump_shared(obj, sent)
    try:
        return pickle.dumps(obj, 5)
    except Exception:
        return _forking_dumps(obj)


def _forking_dumps(obj):
    from multiprocessing.reduction import ForkingPickler

    out = io.BytesIO()
    ForkingPickler(out, 5).dump(obj)
    return out.getvalue()


def _dump_shared(obj, sent):
    if sent and result_socket is None:  # not in an rpool worker: nowhere to send a memfd
        return _in_band(obj)
    buffers = []
    out = io.BytesIO()
    pickler = _sharing_pickler()(out, buffers)
    pickler.dump(obj)
    if not (pickler.objects or buffers):
        return out.getvalue()
    try:
        payload = _share(out.getvalue(), pickler.objects, buffers, sent)
    except OSError:  # no memfd to be had (out of memory or descriptors): the slow way, then
        payload = None
    return _in_band(obj) if payload is None else payload


def _in_band(obj):
    try:
        return pickle.dumps(obj, 5)
    except Exception:
        return _forking_dumps(obj)


def _share(data, objects, buffers, sent):
    """Write the buffers into a memfd; return the envelope that says where they are."""
    pieces = [(_BYTES if type(obj) is bytes else _BYTEARRAY, memoryview(obj).cast("B")) for obj in objects]
    pieces += [(_BUFFER, raw) for raw in buffers]
    layout = []
    offset = _HEADER
    for kind, view in pieces:
        layout.append((kind, offset, view.nbytes))
        offset += -(-view.nbytes // _ALIGN) * _ALIGN
    memfd, generation = _memfds.lend(offset)
    try:
        for (_, view), (_, at, _) in zip(pieces, layout):
            _rpool.write_buffer(memfd.mapping, at, view)
        # The receiver's own descriptor: the core sends or keeps it, then closes it.
        passed = os.dup(memfd.fd)
        memfd.passed = -1 if sent else passed
    except BaseException:
        _memfds.discard(memfd)
        raise
    envelope = pickle.dumps(_Envelope((os.getpid(), passed, memfd.inode, generation, layout, data)), 5)
    payload = SharedPayload(envelope)
    if not sent:
        payload.fd = passed
        return payload
    # The core writes the result frame right after this returns: the memfd goes first.
    try:
        _rpool.send_memfd(result_socket, passed)
    except OSError:
        _memfds.discard(memfd)
        return None
    finally:
        os.close(passed)
    payload.fd = -1
    return payload


class _Memfd:
    __slots__ = ("fd", "inode", "capacity", "mapping", "generation", "passed")

    def __init__(self):
        self.fd = os.memfd_create("rpool-buffers", os.MFD_CLOEXEC)
        self.inode = _identity(self.fd)
        self.capacity = 0
        self.mapping = None
        self.generation = 0
        # The descriptor the core keeps for a task's receiver; -1 when it was sent away.
        self.passed = -1

    def in_use(self):
        """Whether someone may still read what was written last."""
        _, done = _COUNTERS.unpack(os.pread(self.fd, _COUNTERS.size, 0))
        if done == self.generation:
            return False
        if self.passed < 0:
            return True
        # A task's memfd: the core closes its descriptor once the task has an outcome (then no
        # worker can open it any more); that number may since name another file.
        try:
            return _identity(self.passed) == self.inode
        except OSError:
            return False

    def reserve(self, size):
        """Make the file and its writable mapping at least `size` bytes, rounded up to a sixteenth
        so that payloads growing a little do not remap it each time. Populated at once: faulting
        the pages of a shared mapping in one write at a time costs twice the copy."""
        if self.capacity >= size:
            return
        import mmap

        capacity = _round_up(size, max(_ALIGN, 1 << max(0, size.bit_length() - 4)))
        os.ftruncate(self.fd, capacity)
        self.mapping = None
        self.mapping = mmap.mmap(self.fd, capacity, mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.capacity = capacity

    def close(self):
        # Not mapping.close(): a thread may still be copying out of it; the last reference unmaps.
        self.mapping = None
        os.close(self.fd)


def _round_up(n, step):
    return -(-n // step) * step


def _identity(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _MemfdCache:
    """Memfds this process wrote buffers into, kept for the next large payload: writing into pages
    the kernel already has is several times faster than into new ones (fresh shared memory is
    zeroed page by page).

    Page 0 of each holds two counters: the generation written (one per use) and the last
    generation a receiver finished reading. A memfd is written again only once no receiver can
    still read it; one whose receiver never says so (a result never read) is just dropped.
    """

    # Kept unused between payloads: at most this many, none over MAX_SPARE_BYTES.
    SPARES = 2
    MAX_SPARE_BYTES = 256 << 20
    # In use: past this many, or this many bytes, the oldest is given up (closed here only).
    MAX_LENT = 16
    MAX_LENT_BYTES = 1 << 30

    def __init__(self):
        self.spare = []
        self.lent = []
        # Tasks are pickled on several threads (callers, imap's feeders).
        self.lock = _thread.allocate_lock()
        os.register_at_fork(after_in_child=self.forget)

    def lend(self, size):
        with self.lock:
            return self._lend(size)

    def _lend(self, size):
        self.reclaim()
        memfd = max(self.spare, key=lambda m: m.capacity) if self.spare else _Memfd()
        if self.spare:
            self.spare.remove(memfd)
        memfd.generation += 1
        try:
            memfd.reserve(size)
        except BaseException:
            memfd.close()
            raise
        os.pwrite(memfd.fd, _COUNTERS.pack(memfd.generation, 0), 0)
        self.lent.append(memfd)
        while len(self.lent) > 1 and (
            len(self.lent) > self.MAX_LENT or sum(m.capacity for m in self.lent) > self.MAX_LENT_BYTES
        ):
            self.lent.pop(0).close()
        return memfd, memfd.generation

    def reclaim(self):
        for memfd in list(self.lent):
            if not memfd.in_use():
                self.lent.remove(memfd)
                if len(self.spare) < self.SPARES and memfd.capacity <= self.MAX_SPARE_BYTES:
                    self.spare.append(memfd)
                else:
                    memfd.close()

    def discard(self, memfd):
        with self.lock:
            if memfd in self.lent:
                self.lent.remove(memfd)
        memfd.close()

    def trim(self) -> None:
        """Close every memfd no receiver can still read (pools shutting down call this)."""
        with self.lock:
            self.reclaim()
            spare, self.spare = self.spare, []
        for memfd in spare:
            memfd.close()
        _mapped.clear()

    def forget(self):
        """In a forked child: the parent's memfds are the parent's to reuse, and those the core
        keeps for tasks in flight must not live on in a worker."""
        self.lock = _thread.allocate_lock()
        self.spare = []
        self.lent = []
        _mapped.clear()
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:rpool-buffers"):
                    os.close(int(name))
            except OSError:
                pass


class _MappedFiles:
    """Read-only mappings of memfds that other processes wrote buffers into, kept for their next
    payloads: senders reuse their memfds, and a mapping whose pages are already in the page table
    is copied out of at memcpy speed.

    A kept mapping keeps its file's memory even once the sender has closed it, so few are kept,
    none bigger than the senders keep their own, and pools shutting down drop them (`trim`).
    """

    KEEP = 4
    MAX_BYTES = _MemfdCache.MAX_SPARE_BYTES

    def __init__(self):
        self.maps = {}  # identity -> mmap, least recently used first
        self.lock = _thread.allocate_lock()

    def get(self, fd, identity, needed):
        with self.lock:
            mapping = self.maps.pop(identity, None)
            if mapping is None or len(mapping) < needed:
                import mmap

                size = os.fstat(fd).st_size
                if size < needed:
                    raise OSError("rpool: the shared memory is shorter than its payload says")
                # Not populated: only what is read is faulted in (the file may be much bigger).
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            if len(mapping) <= self.MAX_BYTES:
                self.maps[identity] = mapping
                while len(self.maps) > self.KEEP:
                    del self.maps[next(iter(self.maps))]
            return mapping

    def clear(self):
        # Dropped, not closed: another thread may still be copying out of one.
        with self.lock:
            self.maps = {}


_HEADER = _ALIGN
_COUNTERS = struct.Struct("<QQ")
_memfds = _MemfdCache()
_mapped = _MappedFiles()
trim = _memfds.trim
# In a worker: its memfd socket, on which the memfds of large results go to the parent (set by
# the core when the worker starts).
result_socket = None


class _Envelope:
    """Unpickles into the object itself, reading its buffers from the sender's memfd."""

    __slots__ = ("args",)

    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return _open_shared, self.args


def _open_shared(pid, fd, inode, generation, layout, data):
    """In the receiving process: open the sender's memfd through /proc and rebuild the object."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        message = f"rpool: cannot open the shared memory of this task at {path}: {exc.strerror}"
        raise OSError(exc.errno, message) from None
    try:
        return _load(own, inode, generation, layout, data)
    finally:
        os.close(own)


def loads_received(data: bytes, fd: int) -> Any:
    """In the parent: a result whose memfd came with it (the core duplicated it for us)."""
    if fd < 0:
        raise OSError("rpool: the shared memory of this result could not be duplicated")
    try:
        _pid, _fd, inode, generation, layout, inner = _EnvelopeReader(io.BytesIO(data)).load()
        return _load(fd, inode, generation, layout, inner)
    finally:
        os.close(fd)


class _EnvelopeReader(pickle.Unpickler):
    """Reads an envelope's fields without opening the sender's memfd (we hold it already)."""

    def find_class(self, module, name):
        if (module, name) == (__name__, "_open_shared"):
            return _fields
        raise pickle.UnpicklingError(f"rpool: unexpected {module}.{name} in a shared-memory envelope")


def _fields(*args):
    return args


def _load(fd, inode, generation, layout, data):
    if _identity(fd) != tuple(inode):
        raise RuntimeError("rpool: the shared memory of this payload was replaced")
    written, _ = _COUNTERS.unpack(os.pread(fd, _COUNTERS.size, 0))
    if written != generation:
        raise RuntimeError("rpool: the shared memory of this payload was reused before it was read")
    try:
        source = _mapped.get(fd, tuple(inode), max(offset + length for _, offset, length in layout))
        objects = []
        buffers = []
        for kind, offset, length in layout:
            # Out-of-band buffers are read into a bytearray, which the object (a numpy array,
            # say) is built on, as pickle would have made it from an in-band buffer.
            buffer = _rpool.read_buffer(source, offset, length, kind != _BYTES)
            (buffers if kind == _BUFFER else objects).append(buffer)
    finally:
        # Read (or given up): the sender may write into it again.
        os.pwrite(fd, _COUNTERS.pack(generation, generation), 0)
    unpickler = _Unpickler(io.BytesIO(data), buffers=buffers)
    unpickler.objects = objects
    return unpickler.load()


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, index):
        return self.objects[index]
