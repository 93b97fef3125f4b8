"""TLS for the server and the client: a self-signed certificate where the user has none, its
fingerprint, and the client's ways to trust a server (system CAs, a CA file, a pinned fingerprint).

A pinned fingerprint is checked on a handshake of its own, before any request: the certificate
that passes becomes the only trusted one for the connections that follow, so the token is never
sent to a server that was not verified, and a certificate swapped in later fails them all.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import trio

from ..errors import ServerNotTrusted

_FINGERPRINT = re.compile(r"(?i)(?:sha256:)?((?:[0-9a-f]{2}:?){31}[0-9a-f]{2})")


def fingerprint(der: bytes) -> str:
    """`SHA256:` and the certificate's digest in hex pairs, as printed for users."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def parse_fingerprint(text: str) -> bytes:
    """The digest a user gave (`SHA256:` optional, colons optional); ValueError if malformed."""
    match = _FINGERPRINT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a SHA-256 fingerprint: {text!r} (expected SHA256:AB:CD:...)")
    return bytes.fromhex(match[1].replace(":", ""))


def certificate_fingerprint(cert_file: Path) -> str:
    """The fingerprint of the first certificate in a PEM file."""
    pem = cert_file.read_text(encoding="ascii")
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem[start:end]))


def is_loopback(host: str) -> bool:
    """Whether *host* (a name or an address) can only be this machine."""
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_self_signed(cert_file: Path, key_file: Path, host: str) -> None:
    """A certificate for this server, valid ten years, its key readable by the owner only.
    Blocking."""
    # Imported here: only a server that needs a certificate of its own pays for the import.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"trio-sync {socket.gethostname()}")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    for address in {"127.0.0.1", "::1", host.strip("[]")}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verify the server against *ca_file*, or else the system's CAs."""
    return ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)


async def pinned_context(url: str, pin: bytes, *, timeout: float = 10.0) -> ssl.SSLContext:
    """Handshake with the server at *url* (nothing is sent over it), check its certificate
    against *pin*, and return a context that trusts that certificate alone. ServerNotTrusted if
    it does not match; OSError if the server cannot be reached."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only to read the certificate, which the pin then checks
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        tls = trio.SSLStream(stream, probe, server_hostname=host)
        try:
            await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
        finally:
            await trio.aclose_forcefully(tls)
    if der is None or not hmac.compare_digest(hashlib.sha256(der).digest(), pin):
        seen = fingerprint(der) if der else "none"
        raise ServerNotTrusted(f"the server's certificate is {seen}, not the pinned fingerprint")
    context = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
    context.check_hostname = False  # the pin names the certificate; the host name adds nothing
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
