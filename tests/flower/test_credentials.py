"""The federation's credentials: a CA, a SuperLink certificate a TLS client accepts, SuperNode keys Flower reads."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

pytest.importorskip("flwr", reason="the Flower adapter needs the extra: pip install 'fastdp[flower]'")

from fastdp.flower.credentials import make_ca, make_node_key, make_server_certificate  # noqa: E402


def _handshake(server_cert, client_ca, server_name: str = "localhost") -> None:
    """One TLS handshake on loopback: a server with ``server_cert``, a client trusting only ``client_ca``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert.cert, server_cert.key)
    client_ctx = ssl.create_default_context(cafile=str(client_ca))  # verifies the chain and the host name
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"x")
    finally:
        t.join(timeout=10)
        listener.close()


def test_server_certificate_is_trusted_through_the_ca_only(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = make_server_certificate(ca, tmp_path / "ca", hosts=["localhost", "127.0.0.1", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Private keys are readable by their owner only; certificates by anyone.
    for key in (ca.key, server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    _handshake(server, ca.cert)
    # A client trusting another CA refuses the server; so does one that reached it under another name.
    other = make_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, other.cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, ca.cert, server_name="superlink.example.org")


def test_node_keys_are_what_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    key = make_node_key(tmp_path, "hospital-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)  # how flower-supernode reads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_ssh_public_key(key.public.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(key.public)  # how `flwr supernode register` reads it
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    # Every call makes a new key pair.
    assert make_node_key(tmp_path, "hospital-1").public.read_text().split()[1] != key.public.read_text().split()[1]


def test_server_certificate_needs_a_host(tmp_path):
    with pytest.raises(ValueError, match="at least one host"):
        make_server_certificate(make_ca(tmp_path), tmp_path, hosts=[])
