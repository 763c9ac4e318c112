"""Moving bytes for the mirror: parallel ranged GETs into a resumable ``.partial`` file or an S3 upload.

Every transfer is checked against the manifest's size and MD5 before anything becomes visible:
a local file is renamed from ``<name>.partial`` only after its whole content hashed right, and an
S3 upload is completed only then (a multipart upload is aborted otherwise). Large files are split
into byte ranges (parts) fetched by a shared pool of threads, each part read from the socket
straight into a page-aligned buffer of its own, written from that buffer (``O_DIRECT`` where the
filesystem takes it and files are made durable: no copy into the page cache) and hashed from it
in order: a part that arrives ahead of its turn is held until the parts before it are hashed, so
no byte is read back from disk. Parts held in memory are bounded (``PART_MEMORY``), whatever the
file size. The parts already on disk are listed in ``<name>.partial.json`` (written after an
fdatasync), so an interrupted download continues where it stopped; those parts are read back to
be hashed when their turn comes. Small files (one part) are fetched with one GET each, verified in
memory (over plain HTTP, by one thread driving many connections: ``small_files``) and written into a
new ``.partial``.

Requests to a public bucket are unsigned; those GETs skip botocore and go over plain
``http.client`` keep-alive connections (one per thread), reading the socket straight into the
part's buffer (small files: a reused one). They go where botocore's would, as botocore's would:
its URL for the key (endpoint, region, virtual-hosted or path addressing), its certificate checks
(``AWS_CA_BUNDLE``, ``verify``), its proxy (``HTTPS_PROXY``/``NO_PROXY``: a CONNECT tunnel for
HTTPS) and timeouts; a client whose transport they cannot reproduce (signed, a client
certificate, proxy TLS options), or a source that redirects, gets botocore's GETs instead.

Retries are one layer per failure. botocore retries its own requests as the client's config says; a
body that breaks off mid-range is resumed here, from the last byte received. The plain-HTTP path
does both itself, with the client's attempt count and botocore's backoff: throttling, 500/502/503/504
and dropped connections are retried, other errors (403, 404, an untrusted certificate) are not. A
range gives up after the client's attempts, or ``ABC_TRANSFER_RETRY_SECONDS`` after it started
failing without progress, with an error naming the key and the last reason; a file is fetched again
whole only when its bytes did not match (mirror's ``FILE_ATTEMPTS``), never for a failed GET.

Durability (``durable``, the default): a file is fsynced before its rename, so a placed file
survives a power cut. Large files' parts go to the disk as they are written (``O_DIRECT``, or a
writeback started at once where the filesystem refuses it), so that fsync finds little left to
wait for; small files share one ``syncfs`` among all files waiting for theirs.

One module a job: ``common`` (settings, errors, a file job, the bandwidth cap, the retry clock),
``http_source`` (the plain-HTTP GETs), ``small_files`` (the selector loop for many small files),
``files`` (the local side: ``.partial`` files, the resume sidecar, in-order MD5, ``O_DIRECT`` writes,
syncs) and ``engine`` (:class:`Transfer`, :func:`copy_verified`). What the mirror and the other stages
use is re-exported here.
"""

from __future__ import annotations

from etl.transfer.common import (
    PARTIAL_SUFFIX,
    SIDECAR_SUFFIX,
    FileJob,
    LocalWriteError,
    TransferError,
    backoff_delay,
    parse_rate,
)
from etl.transfer.engine import Transfer, copy_verified
from etl.transfer.files import SymlinkRefusedError, file_md5, open_nofollow, write_file_nofollow
from etl.transfer.http_source import botocore_get_url

__all__ = [
    "FileJob",
    "LocalWriteError",
    "PARTIAL_SUFFIX",
    "SIDECAR_SUFFIX",
    "SymlinkRefusedError",
    "Transfer",
    "TransferError",
    "backoff_delay",
    "botocore_get_url",
    "copy_verified",
    "file_md5",
    "open_nofollow",
    "parse_rate",
    "write_file_nofollow",
]
