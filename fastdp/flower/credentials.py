"""Credentials of a Flower federation: a private CA with a TLS certificate for the SuperLink, and SuperNode keys.

Flower 1.42 encrypts every connection to the SuperLink (SuperNodes' Fleet API, ``flwr``'s
Control API) with TLS when the SuperLink is given a certificate, and admits only SuperNodes
whose public key was registered (``flwr supernode register``) when it runs with
``--enable-supernode-auth``. This module makes what that needs, with ``cryptography``:

    ca = make_ca("certs")                                         # certs/ca.crt, certs/ca.key
    server = make_server_certificate(ca, "certs", hosts=["superlink.example.org", "10.0.0.5"])
    key = make_node_key("keys", "hospital-0")                     # keys/hospital-0(.pub)

The CA is for a federation that has no certificate authority of its own (a local test
federation, a pilot): every SuperNode and ``flwr`` host gets ``ca.crt`` and trusts only it.
Hospitals with a PKI use their own CA's certificates instead (docs/flower.md). Private key
files are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "NodeKey",
    "ServerCertificate",
    "make_ca",
    "make_node_key",
    "make_server_certificate",
]

#: NIST P-384: the curve Flower documents for SuperNode keys; used for the TLS keys too.
_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's certificate and private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """The SuperLink's TLS certificate (signed by ``ca``) and private key (PEM files)."""

    cert: Path
    key: Path
    ca_cert: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair: OpenSSH private key and ``ecdsa-sha2-nistp384`` public key."""

    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    # 0600 from the start: the key is never readable by others, not even for a moment.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    # a minute of slack for clocks that differ a little between machines
    return now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)


def make_ca(directory: str | os.PathLike, name: str = "fastdp federation CA", days: int = 365) -> CertificateAuthority:
    """A new self-signed CA in ``directory``: ca.crt (give to every participant) and ca.key (keep secret).

    Args:
        directory: where ca.crt / ca.key are written (created if missing).
        name: the CA's common name.
        days: validity in days.
    """
    directory = Path(directory)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    ca = CertificateAuthority(cert=directory / "ca.crt", key=directory / "ca.key")
    _write_private(
        ca.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_public(ca.cert, cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_certificate(
    ca: CertificateAuthority,
    directory: str | os.PathLike,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    name: str = "server",
    days: int = 365,
) -> ServerCertificate:
    """A TLS server certificate signed by ``ca`` for the SuperLink: ``name``.crt / ``name``.key in ``directory``.

    Args:
        ca: the CA (make_ca) whose key signs the certificate.
        directory: where the files are written.
        hosts: every name or IP address SuperNodes and ``flwr`` use to reach the SuperLink (the
            certificate's subject alternative names; a client refuses a server whose address is not
            among them).
        name: file name stem.
        days: validity in days.
    """
    if not hosts:
        raise ValueError("make_server_certificate needs at least one host name or IP address")
    directory = Path(directory)
    ca_key = serialization.load_pem_private_key(Path(ca.key).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
    key = ec.generate_private_key(_CURVE())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    out = ServerCertificate(cert=directory / f"{name}.crt", key=directory / f"{name}.key", ca_cert=Path(ca.cert))
    _write_private(
        out.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_public(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    return out


def make_node_key(directory: str | os.PathLike, name: str) -> NodeKey:
    """A SuperNode's authentication key pair in ``directory``: ``name`` (private, OpenSSH) and ``name``.pub.

    The hospital keeps the private key; the federation's operator registers the public key
    with ``flwr supernode register name.pub`` (or :func:`fastdp.flower.launcher.register_node`).
    """
    directory = Path(directory)
    key = ec.generate_private_key(_CURVE())
    out = NodeKey(private=directory / name, public=directory / f"{name}.pub")
    _write_private(
        out.private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(out.public, public + f" {name}\n".encode())
    return out
