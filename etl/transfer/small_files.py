"""Small files fetched by one thread over many keep-alive connections at once (a selector loop).

With a thread per connection, 10,000 objects of 1-4 KiB cost 63 ``futex`` calls a file: the GIL changed
hands at every blocking call, and the threads queued on their directory's lock to create the files
(benchmarks/RESULTS.md, issue 16). Here one thread sends a GET on every idle connection, waits for
whichever answers, and places the file answered: a handful of system calls a file, no thread switch.

The loop takes only the plain answer: 200 or 206 with the whole object, of the manifest's size. Any
other (an error status, a redirect, a body of unknown length, a dropped connection, a timeout) leaves
the file to the blocking path (:meth:`Transfer.download`), which asks again and has the retries,
hand-overs and error messages; so does a file whose ``.partial`` another run holds. A connection that
had answered GETs before and drops the next one unanswered (the server closed it while it was idle) is
replaced and the GET sent once more, as HTTP clients do. The bytes are hashed in memory: a file that
does not match the manifest's MD5 is never written (the error says so; the mirror tries the whole file
again). A verified file goes into a new, locked ``.partial``; every ``FLUSH_FILES`` files, and at the
end, one filesystem sync makes them durable before they are renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from etl.transfer.common import (
    PARTIAL_SUFFIX,
    SIDECAR_SUFFIX,
    FileJob,
    RateLimiter,
    TransferError,
    content_total,
    write_at,
)
from etl.transfer.files import Held, lock_partial, place_held, unlink_quietly
from etl.transfer.http_source import MAX_HEADER_LINE, MAX_HEADERS, Head, HttpSource, served_as_asked

FLUSH_FILES = 256  # verified files held open (locked) until one sync and their renames
RECEIVE_BUFFER = 256 << 10
MAX_HEAD = MAX_HEADERS * MAX_HEADER_LINE


class _Unanswered(Exception):
    """This GET is left to the blocking path (the reason is for the log only: that path says its own)."""


@dataclass(eq=False)
class _Slot:
    """One connection of the loop and the GET it carries."""

    conn: http.client.HTTPConnection
    index: int = -1  # the job being fetched; -1 when idle
    received: bytearray = field(default_factory=bytearray)
    head: Head | None = None
    answered: int = 0  # GETs answered on this connection
    deadline: float = 0.0

    def reset(self) -> None:
        self.index, self.head = -1, None
        self.received.clear()


class SmallFileLoop:
    """The loop's connections, kept from one call to the next, and what it needs of the transfer."""

    def __init__(self, source: HttpSource, connections: int, sync: Callable[[int], None] | None,
                 on_bytes: Callable[[int], None], limiter: RateLimiter | None, stopped: threading.Event) -> None:
        self.source = source
        self.connections = connections
        self.sync = sync  # None: files are not made durable
        self.on_bytes = on_bytes
        self.limiter = limiter
        self.stopped = stopped
        self.idle: list[_Slot] = []
        self.refused = False  # a connect failed during this call
        self.buffer = memoryview(bytearray(RECEIVE_BUFFER))
        self.lock = threading.Lock()  # one caller at a time: the connections are this loop's alone

    def fetch(self, jobs: list[tuple[FileJob, Path]]) -> list[str | Exception | None]:
        """Per job: its ETag once placed, the error that stopped it, or None: left to the blocking path."""
        with self.lock:
            results: list[str | Exception | None] = [None] * len(jobs)
            held: list[Held] = []
            try:
                self._run(jobs, results, held)
            except Exception as exc:  # a fault of this code: the files not yet placed fail with it, alone
                for index, result in enumerate(results):
                    if result is None:
                        results[index] = exc
            finally:
                place_held(held, results, self.sync)  # verified files are placed, and reported as placed
            return results

    def _run(self, jobs: list[tuple[FileJob, Path]], results: list, held: list[Held]) -> None:
        todo = deque(i for i, (job, _) in enumerate(jobs) if job.size)  # empty files: a HEAD, elsewhere
        self.refused = False
        self._connect(min(self.connections, len(todo)) - len(self.idle))
        retried: set[int] = set()
        busy: set[_Slot] = set()
        selector = selectors.DefaultSelector()
        try:
            while todo or busy:
                if self.stopped.is_set():
                    for index in [*todo, *(slot.index for slot in busy)]:
                        results[index] = TransferError("interrupted")
                    return
                while todo and self.idle:
                    slot = self._idle_slot(fresh=todo[0] in retried)
                    if slot is None:  # no new connection for a GET sent again: the blocking path takes it
                        todo.popleft()
                        continue
                    slot.index = todo.popleft()
                    job = jobs[slot.index][0]
                    try:
                        slot.conn.sock.sendall(self.source.request(job.key, 0, job.size))
                    except OSError:
                        self._failed(slot, todo, retried)
                        continue
                    slot.deadline = time.monotonic() + self.source.read_timeout
                    selector.register(slot.conn.sock, selectors.EVENT_READ, slot)
                    busy.add(slot)
                if not busy:
                    break  # no connection left: the blocking path takes the rest
                now = time.monotonic()
                ready = selector.select(max(0.0, min(s.deadline for s in busy) - now))
                for key, _ in ready:
                    slot = key.data
                    try:
                        body = self._receive(slot, jobs[slot.index][0])
                    except (_Unanswered, OSError, http.client.HTTPException):
                        selector.unregister(slot.conn.sock)
                        busy.discard(slot)
                        self._failed(slot, todo, retried)
                        continue
                    if body is None:
                        slot.deadline = time.monotonic() + self.source.read_timeout
                        continue
                    selector.unregister(slot.conn.sock)
                    busy.discard(slot)
                    index, etag = slot.index, (slot.head.getheader("ETag") or "").strip('"')
                    try:
                        self._place(index, *jobs[index], body, etag, held, results)
                    except Exception as exc:  # that file's outcome; the others go on
                        results[index] = exc
                    slot.answered += 1
                    if slot.head.reusable:
                        slot.reset()
                        self.idle.append(slot)
                    else:
                        slot.conn.close()
                        self._connect(1)
                    if len(held) >= FLUSH_FILES:
                        place_held(held, results, self.sync)
                for slot in [s for s in busy if s.deadline <= time.monotonic()]:  # no byte for read_timeout
                    selector.unregister(slot.conn.sock)
                    busy.discard(slot)
                    retried.add(slot.index)  # a slow source is not asked twice here
                    self._failed(slot, todo, retried)
        finally:
            for slot in busy:  # interrupted: their answers are unread
                slot.conn.close()
            selector.close()

    def _connect(self, n: int) -> None:
        """``n`` more idle connections. If the source refuses one, the loop goes on with those it has and
        connects no more until its next call (a source that is down costs one connect timeout, not one a file)."""
        if n <= 0 or self.refused:
            return
        conns = [self.source.new_connection() for _ in range(n)]

        def connect(conn: http.client.HTTPConnection) -> _Slot | None:
            try:
                conn.connect()
                conn.sock.setblocking(False)
                return _Slot(conn)
            except (OSError, http.client.HTTPException):  # the blocking path will say why, if it persists
                conn.close()
                return None

        if n == 1:
            slots = [connect(conns[0])]
        else:  # a remote source's round trips in parallel, not one after the other
            with ThreadPoolExecutor(n, thread_name_prefix="mirror-connect") as pool:
                slots = list(pool.map(connect, conns))
        self.idle += [slot for slot in slots if slot is not None]
        self.refused = None in slots

    def _idle_slot(self, fresh: bool) -> _Slot | None:
        """An idle connection; ``fresh``: one that has answered nothing yet (made now if need be), for a GET sent
        again after a connection the server had closed: another kept-alive one may be closed too."""
        if not fresh:
            return self.idle.pop()
        for i in range(len(self.idle) - 1, -1, -1):
            if not self.idle[i].answered:
                return self.idle.pop(i)
        self._connect(1)
        return self.idle.pop() if self.idle and not self.idle[-1].answered else None

    def _failed(self, slot: _Slot, todo: deque[int], retried: set[int]) -> None:
        """Drop the connection; a GET it carried unanswered after earlier answers goes again, once, on a new one."""
        stale = slot.answered > 0 and slot.head is None and not slot.received and slot.index not in retried
        if stale:
            retried.add(slot.index)
            todo.appendleft(slot.index)
        slot.conn.close()
        self._connect(1)

    def _receive(self, slot: _Slot, job: FileJob) -> bytearray | None:
        """Read what the connection holds; the whole body once it is all there, None while it is not.

        Raises :class:`_Unanswered` for an answer other than the plain one (module docstring) or a
        connection that closed.
        """
        sock = slot.conn.sock
        try:
            while True:
                n = sock.recv_into(self.buffer)
                if not n:
                    raise _Unanswered("the connection closed")
                slot.received += self.buffer[:n]
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass  # nothing more yet (a TLS record not whole)
        while slot.head is None:
            end = slot.received.find(b"\r\n\r\n")
            if end < 0:
                if len(slot.received) > MAX_HEAD:
                    raise _Unanswered("a response head without end")
                return None
            head = Head.parse(bytes(slot.received[:end]))
            del slot.received[:end + 4]
            if not head.interim:
                slot.head = head
                total = content_total({"ContentRange": head.getheader("Content-Range")})
                if (head.status not in (200, 206) or head.length != job.size
                        or not served_as_asked(head, 0, job.size) or (total is not None and total != job.size)):
                    raise _Unanswered(f"HTTP {head.status}")
        if len(slot.received) < slot.head.length:
            return None
        if len(slot.received) > slot.head.length:
            raise _Unanswered("more bytes than the body")
        body, slot.received = slot.received, bytearray()  # the caller's now: an error may keep a view of it
        return body

    def _place(self, index: int, job: FileJob, final: Path, body: bytearray, etag: str, held: list[Held],
               results: list) -> None:
        """Verify a fetched body and write it into its new, locked ``.partial`` (renamed at the next flush)."""
        if self.limiter:
            self.limiter.acquire(len(body))
        self.on_bytes(len(body))
        md5 = hashlib.md5(body).hexdigest()
        if md5 != job.md5:
            results[index] = TransferError(f"MD5 {md5} of the fetched bytes differs from the manifest's {job.md5}",
                                           retry_file=True)
            return
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            fd, new = lock_partial(partial, final, job, wait=False)
        except BlockingIOError:
            return  # another run holds it: the blocking path waits for it, holding no other lock
        if fd is None:
            results[index] = ""  # placed by another run meanwhile
            return
        try:
            if not new:  # left by an interrupted run: replaced whole
                unlink_quietly(final.with_name(final.name + SIDECAR_SUFFIX))
                os.ftruncate(fd, 0)
            write_at(fd, body, 0, partial)
        except BaseException:
            os.close(fd)
            raise
        held.append(Held(index, fd, partial, final))
        results[index] = etag
