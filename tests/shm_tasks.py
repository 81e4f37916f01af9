"""Task functions for test_shm.py (importable by spawned workers)."""

import hashlib
import os
import signal
import time


def describe(obj):
    """Type name, length and digest of a buffer, or of each item of a container."""
    if isinstance(obj, (bytes, bytearray)):
        return type(obj).__name__, len(obj), hashlib.sha1(obj).hexdigest()
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    return [describe(item) for item in obj]


def echo(obj):
    return obj


def same_object(pair):
    return pair[0] is pair[1]


def raise_with(data):
    raise ValueError(data)


def fill(n, byte=7):
    return bytes([byte]) * n


def die_holding(data):
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_holding(data, seconds=30):
    time.sleep(seconds)
    return len(data)


def numpy_sum(array):
    array += 1  # pickle gives a writable array; so must rpool
    return float(array.sum()), array.dtype.str, array.shape


def open_memfds():
    """`(fd, link target)` of each rpool shared-memory file this process has open."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:rpool-buffers"):
            found.append((int(name), target))
    return found


def mapped_memfds():
    """`(address range, file)` of each mapping of an rpool shared-memory file in this process."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/memfd:rpool-buffers"):
                found.append((fields[0], fields[5].strip()))
    return found


def memfd_links(_=None):
    """The rpool shared-memory files this worker has open or mapped."""
    return [target for _, target in open_memfds()] + [f"mapped {target}" for _, target in mapped_memfds()]
