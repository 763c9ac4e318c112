"""The local side of a transfer: ``.partial`` files opened without following links and locked, the resume
sidecar, in-order MD5 of parts held in memory, ``O_DIRECT`` part writes, writeback and shared syncs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from etl.transfer.common import HASH_CHUNK, FileJob, LocalWriteError, TransferError, write_at

log = logging.getLogger(__name__)

DIRECT_ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block size; 4 KiB covers all

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if hasattr(os, "fdatasync") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, start: int, length: int) -> None:
    """Ask the kernel to start writing [start, start + length) to disk now, without waiting (Linux).

    A later fdatasync then has little left to wait for: the disk works while the download goes on.
    Elsewhere (or if the call is missing) this does nothing and fdatasync does all the work.
    """
    func = getattr(_libc, "sync_file_range", None)
    if func is not None:
        func(ctypes.c_int(fd), ctypes.c_longlong(start), ctypes.c_longlong(length),
             ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


@dataclass
class Sidecar:
    """What a ``.partial`` holds: the ranges that reached disk, for the manifest entry it was started for."""

    path: Path
    size: int
    md5: str
    part_size: int
    etag: str | None
    done: set[int]

    @classmethod
    def load(cls, path: Path, partial: Path, job: FileJob, part_size: int) -> Sidecar:
        fresh = cls(path, job.size, job.md5, part_size, None, set())
        try:
            fd = open_nofollow(path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as handle:
                doc = json.loads(handle.read())
            if (doc["size"], doc["md5"]) != (job.size, job.md5) or partial.lstat().st_size != job.size:
                return fresh
            return cls(path, job.size, job.md5, int(doc["part_size"]), doc.get("etag"), set(doc["done"]))
        except (OSError, ValueError, KeyError, TypeError):
            return fresh

    def save(self, fd: int, durable: bool) -> None:
        """Without ``durable`` a power cut may lose listed ranges: the MD5 check then discards the file."""
        if durable:
            os.fdatasync(fd)  # the ranges listed must really be on disk
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_file_nofollow(tmp, json.dumps({"size": self.size, "md5": self.md5, "part_size": self.part_size,
                                             "etag": self.etag, "done": sorted(self.done)}).encode(), durable)
        os.replace(tmp, self.path)  # replaces a symlink at the sidecar's name itself, never its target


class SymlinkRefusedError(TransferError):
    """A file the mirror writes (``.partial``, sidecar, temporary file) is a symlink: never followed."""


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a symlink planted at ``path`` is refused by name, never followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise SymlinkRefusedError(f"{path} is a symlink; refusing to follow it") from None
        raise


def write_file_nofollow(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` (created or truncated) without following a symlink there."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of an open file, in chunks; positional reads, so threads may share ``fd``."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
        if not chunk:
            raise TransferError(f"file ended at byte {pos}, expected {end}")
        yield chunk
        pos += len(chunk)


def file_md5(path: Path) -> tuple[str, os.stat_result]:
    """MD5 of a whole file and its stat taken before reading (what a record of it must match)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        digest = hashlib.md5()
        for chunk in read_chunks(fd, 0, st.st_size):
            digest.update(chunk)
        return digest.hexdigest(), st
    finally:
        os.close(fd)


def lock_partial(partial: Path, final: Path, job: FileJob, wait: bool = True) -> tuple[int | None, bool]:
    """The ``.partial`` of ``final``, opened and locked, and whether it is new (created here and locked at
    once: nothing in it to continue); None if a concurrent run placed the file meanwhile.

    Two runs (releases sharing a key, mirrored at once) must not write one ``.partial`` together:
    the second waits for the lock, then finds the file placed, or continues what the first left.
    With ``wait`` False it raises :class:`BlockingIOError` instead of waiting (a caller holding other
    ``.partial`` locks must not wait for one: two runs could each wait for the other).
    The directory is made only when the file cannot be created without it (no mkdir per file).
    """
    while True:
        try:
            fd, new = open_nofollow(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, new = open_nofollow(partial, os.O_RDWR | os.O_CREAT), False
        except FileNotFoundError:
            partial.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)
            new = False
        try:
            if os.lstat(partial).st_ino == os.fstat(fd).st_ino:
                return fd, new
        except FileNotFoundError:
            pass
        os.close(fd)  # renamed into place or discarded by the other run while we waited
        if final.is_file() and final.stat().st_size == job.size and file_md5(final)[0] == job.md5:
            return None, False


class Held(NamedTuple):
    """A small file verified into its locked ``.partial``, waiting for a sync and its rename."""

    index: int  # its place in the caller's results
    fd: int
    partial: Path
    final: Path


def place_held(held: list[Held], results: list, sync: Callable[[int], None] | None) -> None:
    """One sync (``sync`` None: none) for all ``held`` files, then their renames; closes them (releasing their
    locks) and empties ``held``. A file that could not be synced or renamed gets the error in ``results``."""
    try:
        if held and sync is not None:
            try:
                sync(held[0].fd)
            except OSError as exc:
                for file in held:
                    results[file.index] = exc
                return
        for file in held:
            try:
                os.replace(file.partial, file.final)
            except OSError as exc:
                results[file.index] = exc
    finally:
        for file in held:
            os.close(file.fd)  # releases the locks, after the renames
        held.clear()


def unlink_quietly(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class GroupSync:
    """Durability for many small files at the cost of few syncs: one ``syncfs`` serves every waiting file.

    A file whose bytes are written takes a ticket and waits until a filesystem sync that started
    after its ticket has finished (its bytes are then on disk); the first waiter runs the sync
    for everyone who took a ticket before it started, later arrivals wait for the next one. This
    replaces thousands of per-file fsyncs (each a journal commit) by a few. Without ``syncfs``
    (not Linux) each file is fsynced on its own.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tickets = 0  # tickets handed out
        self.synced = 0  # every ticket up to this one is durable
        self.running = False
        self.syncs = 0

    def sync(self, fd: int) -> None:
        func = getattr(_libc, "syncfs", None)
        if func is None:
            os.fsync(fd)
            return
        with self.cond:
            self.tickets += 1
            ticket = self.tickets
            while self.synced < ticket:
                if not self.running:
                    break
                self.cond.wait()
            else:
                return
            self.running, covered = True, self.tickets
        ok = False
        try:
            if func(ctypes.c_int(fd)) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
            ok = True
        finally:
            with self.cond:
                self.running = False
                self.syncs += 1
                if ok:
                    self.synced = max(self.synced, covered)
                self.cond.notify_all()


class PayloadMd5:
    """The MD5 of parts that arrive out of order in memory: each is held until every part before it is
    hashed, then hashed and let go (``let_go``, e.g. its buffer back to the pool). Parts already on disk
    (``on_disk``: a ``.partial`` being continued) are read back from ``fd`` when their turn comes."""

    def __init__(self, let_go: Callable[[memoryview | bytes], None] = lambda payload: None, fd: int = -1,
                 size: int = 0, part_size: int = 0, on_disk: set[int] | None = None) -> None:
        self.digest = hashlib.md5()
        self.let_go = let_go
        self.fd, self.size, self.part_size = fd, size, part_size
        self.on_disk = set(on_disk or ())
        self.next = 0  # the next part to hash
        self.waiting: dict[int, memoryview | bytes] = {}

    def part_done(self, i: int, payload: memoryview | bytes) -> list[int]:
        """Part ``i`` arrived; the parts hashed now from memory (their memory may go)."""
        self.waiting[i] = payload
        return self._catch_up()

    def _catch_up(self) -> list[int]:
        hashed = []
        while True:
            if self.next in self.waiting:
                payload = self.waiting.pop(self.next)
                self.digest.update(payload)
                self.let_go(payload)
                hashed.append(self.next)
            elif self.next in self.on_disk:
                start = self.next * self.part_size
                for chunk in read_chunks(self.fd, start, min(self.size, start + self.part_size)):
                    self.digest.update(chunk)
            else:
                return hashed
            self.next += 1

    def hexdigest(self) -> str:
        self._catch_up()
        if self.size and self.next * self.part_size < self.size:
            raise TransferError(f"hashed {self.next} parts of {self.size} bytes: parts missing")
        return self.digest.hexdigest()


class PartBuffers:
    """Page-aligned buffers for whole parts (anonymous mmap: what O_DIRECT needs), reused from part to part.

    The caller bounds how many are out at once (``Transfer.buffer_slots``), so the pool stays that small.
    """

    def __init__(self) -> None:
        self.free: list[mmap.mmap] = []
        self.lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A view of ``size`` bytes of a buffer; give it back with :meth:`give`."""
        with self.lock:
            while self.free:
                buffer = self.free.pop()
                if len(buffer) >= size:
                    return memoryview(buffer)[:size]
        return memoryview(mmap.mmap(-1, size))[:size]

    def give(self, view: memoryview | bytes) -> None:
        if isinstance(view, memoryview):
            with self.lock:
                self.free.append(view.obj)


def _reopen_direct(fd: int) -> int | None:
    """A second descriptor of the open file ``fd`` with ``O_DIRECT``, reopened through ``/proc`` (the very same
    inode, never a path that may have changed since); None where the system or the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        log.debug("O_DIRECT refused (%s): writes go through the page cache", exc)
        return None


class PartWriter:
    """Writes whole parts of a ``.partial`` from their buffers.

    ``durable``: with ``O_DIRECT`` where the filesystem takes it, the bytes go from the buffer (where
    they are also hashed) to the disk without a copy into the page cache, the kernel's largest cost
    here otherwise; they must reach the disk before the rename anyway. Where it is refused, at open or
    at a write (``EINVAL``: tmpfs on older kernels, some network filesystems), the writes go through
    the page cache, each handed to writeback at once. The unaligned tail of a file (under
    ``DIRECT_ALIGN`` bytes) always does. Not ``durable``: through the page cache, left to the kernel.
    """

    def __init__(self, fd: int, path: Path, durable: bool) -> None:
        self.fd, self.path, self.durable = fd, path, durable
        self.direct = _reopen_direct(fd) if durable else None
        self.use_direct = self.direct is not None

    def write(self, view: memoryview, pos: int) -> None:
        if self.use_direct and pos % DIRECT_ALIGN == 0:
            aligned = len(view) - len(view) % DIRECT_ALIGN
            written = 0
            try:
                while written < aligned:
                    written += os.pwrite(self.direct, view[written:aligned], pos + written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise LocalWriteError(f"writing {self.path}: {exc.strerror or exc}") from exc
                log.info("%s: O_DIRECT write refused (%s): writing through the page cache", self.path, exc)
                self.use_direct = False
            view, pos = view[written:], pos + written
        if view:
            write_at(self.fd, view, pos, self.path)
            if self.durable:
                start_writeback(self.fd, pos, len(view))

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
