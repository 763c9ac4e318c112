"""What every part of the transfer engine shares: the settings of a transfer (part size, memory, retries),
its errors, a file job, the bandwidth cap and the retry clock that gives a failing range up."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from botocore.client import BaseClient
from botocore.retries.standard import DEFAULT_MAX_ATTEMPTS

from etl.config import env

MiB = 1 << 20
PART_SIZE = 32 * MiB
S3_MIN_PART_SIZE = 8 * MiB  # S3 refuses multipart parts under 5 MiB; 8 MiB keeps part counts sane
MAX_PARTS = 9000  # below S3's 10,000-part limit; also keeps the resume sidecar small
PART_MEMORY = 256 * MiB  # parts held in memory until hashed (and uploaded), at most about this much
READ_CHUNK = 1 * MiB
HASH_CHUNK = 4 * MiB
LEGACY_MAX_ATTEMPTS = 5  # botocore's attempts in its legacy retry mode when none are configured
PERSIST_EVERY_S = 1.0
PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"
RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}
RETRYABLE_STATUSES = {429, 500, 502, 503, 504}


class TransferError(RuntimeError):
    """A file could not be transferred. ``retry_file``: a fresh attempt at the whole file may help."""

    def __init__(self, message: str, retry_file: bool = False) -> None:
        super().__init__(message)
        self.retry_file = retry_file


class LocalWriteError(TransferError):
    """Writing the mirror's own file failed (no space left on the device, an I/O error): not a fault of
    the source, so not retried like a dropped connection; the ``.partial`` keeps the ranges that
    reached disk for the next run."""


def write_at(fd: int, chunk: memoryview | bytes, pos: int, path: Path) -> None:
    """All of ``chunk`` at ``pos``; an OS error becomes :class:`LocalWriteError` naming the file."""
    view = memoryview(chunk)
    try:
        while view:
            written = os.pwrite(fd, view, pos)
            view, pos = view[written:], pos + written
    except OSError as exc:
        raise LocalWriteError(f"writing {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class FileJob:
    key: str
    size: int
    md5: str


def parse_rate(text: str | None) -> float | None:
    """``50M``, ``1.5G``, ``800k`` or plain bytes per second -> bytes per second (None: unlimited)."""
    if not text:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("/s").removesuffix("b")
    factor = units.get(text[-1:], 1)
    value = float(text[:-1] if text[-1:] in units else text) * factor
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value


class RateLimiter:
    """A token bucket shared by all transfer threads: ``--max-bandwidth``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate / 4, READ_CHUNK)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate) - n
            self.updated = now
            wait_s = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait_s:
            time.sleep(wait_s)


class ShortRead(Exception):
    """The connection ended before the requested range did."""


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    """Exponential backoff with full jitter, so throttled workers do not retry in step.

    The defaults are botocore's own (up to 1, 2, 4, ... s, at most 20 s) for the ``attempt``-th failure.
    """
    return random.uniform(0, min(cap, base * 2 ** attempt))


def content_total(response: dict) -> int | None:
    content_range = response.get("ContentRange") or ""
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


@dataclass(frozen=True)
class RetryPolicy:
    """When a failing data GET is given up: after ``attempts`` tries of a range, or once ``seconds`` have
    passed since it started failing without a byte more arriving.

    ``attempts`` is the S3 client's own count (botocore's ``retries`` config, ``AWS_MAX_ATTEMPTS``),
    so a GET gives up after as many tries on either path; ``seconds`` is ``ABC_TRANSFER_RETRY_SECONDS``.
    """

    attempts: int
    seconds: float

    @classmethod
    def for_client(cls, client: BaseClient, seconds: float | None = None) -> RetryPolicy:
        retries = client.meta.config.retries or {}
        attempts = retries.get("total_max_attempts") or (
            LEGACY_MAX_ATTEMPTS if retries.get("mode") == "legacy" else DEFAULT_MAX_ATTEMPTS)
        return cls(int(attempts), float(env("ABC_TRANSFER_RETRY_SECONDS")) if seconds is None else seconds)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HttpError) else f"{type(exc).__name__}: {exc}"


class Failures:
    """One range's failed attempts: waits (backoff) before the next one, or gives up as the policy says."""

    def __init__(self, key: str, policy: RetryPolicy) -> None:
        self.key, self.policy = key, policy
        self.count = 0
        self.since = 0.0  # when the current run of failures without progress began
        self.pos = -1  # the byte reached at the last failure

    def failed(self, exc: Exception, pos: int) -> None:
        """Sleep before the next attempt, or raise :class:`TransferError` naming the key and ``exc``."""
        now = time.monotonic()
        self.count += 1
        if pos != self.pos:  # the first failure, or bytes arrived since the last one: the clock starts again
            self.since, self.pos = now, pos
        delay = backoff_delay(self.count)
        if self.count >= self.policy.attempts or now + delay - self.since > self.policy.seconds:
            raise TransferError(f"GET gave up on {self.key} after {self.count} attempts "
                                f"({now - self.since:.1f} s without progress): {_reason(exc)}") from exc
        time.sleep(delay)


class HttpError(Exception):
    """A non-2xx answer to a GET: the HTTP status and the S3 error code from its body."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status, self.code = status, code

    @property
    def retryable(self) -> bool:
        """What botocore retries: throttling and transient error codes, and 500, 502, 503, 504 (and 429)."""
        return self.code in RETRYABLE_CODES or self.status in RETRYABLE_STATUSES
