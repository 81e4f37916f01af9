"""Large buffers of tasks and results go through shared memory (a memfd), not the pipes.

A task or result holding a `bytes`/`bytearray` of at least `MIN_SHARED` bytes, or an object whose
pickle gives such an out-of-band buffer (pickle protocol 5: numpy arrays, `PickleBuffer`), is
pickled with those buffers left out; they are written once into a fresh memfd and read once on
the other side. The pickle that travels on the pipe is small.

Who owns the memfd, so that nothing outlives the processes that use it (a memfd has no name):
- Tasks: the parent creates it; the core keeps it open until the task has an outcome (result,
  worker lost, timed out, terminated); the worker opens it through /proc/<parent>/fd/<n> while
  it unpickles the task and checks it is the same file (inode).
- Results: the worker creates it and the core sends it with the result frame (SCM_RIGHTS on the
  result socket), then closes its own; the parent holds it until the result is read.
Small tasks never get here: a cheap look at the top of the object decides.
"""

import io
import itertools
import mmap
import os
import pickle
from multiprocessing.reduction import ForkingPickler

# Buffers this big (bytes) leave the pickle stream; a memfd costs a few system calls.
MIN_SHARED = 1 << 20
# How many objects `_holds_large_buffer` looks at before it gives up (it runs for every task).
_LOOK_BUDGET = 64
_ALIGN = 4096
# One read(2) moves at most this much (Linux's MAX_RW_COUNT).
_MAX_READ = 0x7FFFF000

_BYTES, _BYTEARRAY, _BUFFER = 0, 1, 2


class SharedPayload(bytes):
    """A pickle whose large buffers are in memfd `fd`.

    Whoever sends it (the core) takes the memfd over and sets `fd` to -1; until then this object
    owns it.
    """

    def __del__(self):
        fd = self.__dict__.get("fd", -1)
        if fd >= 0:
            self.fd = -1
            os.close(fd)


def _holds_large_buffer(obj):
    """Whether `obj`, or an item a few levels down in its tuples, lists and dicts, is a large
    bytes or bytearray. Looks at no more than `_LOOK_BUDGET` objects."""
    stack = [obj]
    budget = _LOOK_BUDGET
    while stack and budget:
        budget -= 1
        item = stack.pop()
        kind = type(item)
        if kind is bytes or kind is bytearray:
            if len(item) >= MIN_SHARED:
                return True
        elif kind is tuple or kind is list:
            stack.extend(item[:budget])
        elif kind is dict:
            stack.extend(itertools.islice(item.values(), budget))
    return False


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


def dumps(obj):
    """Pickle `obj` as rpool's pool does (protocol 5, ForkingPickler's reducers if needed); if it
    holds large buffers, return a `SharedPayload` whose memfd holds them."""
    buffers = []
    objects = ()
    if _holds_large_buffer(obj):
        out = io.BytesIO()
        pickler = _SharingPickler(out, buffers)
        pickler.dump(obj)
        data = out.getvalue()
        objects = pickler.objects
    else:
        try:
            data = pickle.dumps(obj, 5, buffer_callback=_collector(buffers))
        except Exception:
            buffers.clear()
            out = io.BytesIO()
            ForkingPickler(out, 5, True, _collector(buffers)).dump(obj)
            data = out.getvalue()
        if not buffers:
            return data
    return _share(data, objects, buffers)


def _share(data, objects, buffers):
    """Write the buffers into a new memfd; return the envelope that says where they are."""
    pieces = [(_BYTES if type(obj) is bytes else _BYTEARRAY, memoryview(obj).cast("B")) for obj in objects]
    pieces += [(_BUFFER, raw) for raw in buffers]
    layout = []
    offset = 0
    for kind, view in pieces:
        layout.append((kind, offset, view.nbytes))
        offset += -(-view.nbytes // _ALIGN) * _ALIGN
    fd = os.memfd_create("rpool-buffers", os.MFD_CLOEXEC)
    try:
        for (_, view), (_, at, _) in zip(pieces, layout):
            _write_all(fd, view, at)
        inode = os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        raise
    envelope = pickle.dumps(_Envelope((os.getpid(), fd, inode, layout, data)), 5)
    payload = SharedPayload(envelope)
    payload.fd = fd
    return payload


def _write_all(fd, view, at):
    while view.nbytes:
        written = os.pwrite(fd, view, at)
        view = view[written:]
        at += written


class _Envelope:
    """Unpickles into the object itself, reading its buffers from the sender's memfd."""

    __slots__ = ("args",)

    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return _open_shared, self.args


def _open_shared(pid, fd, inode, layout, data):
    """In the receiving process: open the sender's memfd through /proc and rebuild the object."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"rpool: cannot open the shared memory of this task at {path}: {exc.strerror}") from None
    try:
        if os.fstat(own).st_ino != inode:
            raise RuntimeError(f"rpool: {path} is no longer this task's shared memory")
        return _load(own, layout, data)
    finally:
        os.close(own)


def loads_received(data, fd):
    """In the parent: a result whose memfd came with it (the core duplicated it for us)."""
    if fd < 0:
        raise OSError("rpool: the shared memory of this result could not be duplicated")
    try:
        _pid, _fd, inode, layout, inner = _EnvelopeReader(io.BytesIO(data)).load()
        if os.fstat(fd).st_ino != inode:
            raise RuntimeError("rpool: a result came with the wrong shared memory")
        return _load(fd, layout, inner)
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


def _load(fd, layout, data):
    need_map = any(kind != _BYTES for kind, _, _ in layout)
    view = None
    if need_map:
        size = max(offset + length for _, offset, length in layout)
        mapped = mmap.mmap(
            fd, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        view = memoryview(mapped)
    objects = []
    buffers = []
    for kind, offset, length in layout:
        if kind == _BYTES:
            objects.append(_read_bytes(fd, offset, length))
        elif kind == _BYTEARRAY:
            objects.append(bytearray(view[offset : offset + length]))
        else:
            # Zero-copy: the object (a numpy array, say) may keep the private mapping alive.
            buffers.append(view[offset : offset + length])
    unpickler = _Unpickler(io.BytesIO(data), buffers=buffers)
    unpickler.objects = objects
    return unpickler.load()


def _read_bytes(fd, offset, length):
    if length <= _MAX_READ:
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
    with mmap.mmap(fd, offset + length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
        return mapped[offset : offset + length]


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, index):
        return self.objects[index]
