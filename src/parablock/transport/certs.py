"""Trial credentials for the networked federation: a test CA, a server certificate, client tokens.

``make_trial_credentials(DIR, clients=N, hosts=[...])`` writes everything a trial across machines
needs, with the ``cryptography`` package::

    ca.pem, ca.key            a self-signed test CA (EC P-256)
    server.pem, server.key    the server certificate, signed by that CA, valid for every host
    client-<id>.token         one bearer token per client (mode 0600), handed to that client
    clients.toml              the server's list of clients: token hashes only

Clients need ``ca.pem`` and their own token; the server needs ``server.pem``, ``server.key`` and
``clients.toml``. ``make_client_cert`` adds a client certificate for mutual TLS. Private keys are
written unencrypted (mode 0600): these are trial credentials; bring your own CA for anything else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from parablock.errors import CredentialsError
from parablock.transport.auth import ClientEntry, ClientsFile, hash_token, new_token

ALWAYS_HOSTS = ("localhost", "127.0.0.1", "::1")
_SECRET = 0o600
_PUBLIC = 0o644
_SKEW = dt.timedelta(minutes=5)  # backdate certificates a little for clocks that disagree


# -- public API -------------------------------------------------------------------------------
def make_trial_credentials(
    directory: str | Path, clients: int, hosts: list[str] | None = None, days: int = 365
) -> list[Path]:
    """Write a test CA, a server certificate for ``hosts`` and ``clients`` tokens into directory.

    The server certificate's SubjectAlternativeName holds every host in ``hosts`` plus always
    localhost, 127.0.0.1 and ::1; its CN is the first host. Refuses to overwrite an existing
    ``ca.key``, ``server.key`` or ``clients.toml``. Returns the files written.
    """
    if type(clients) is not int or clients < 1:
        raise CredentialsError(f"clients must be an integer >= 1, got {clients!r}")
    _check_days(days)
    names = _san_hosts(hosts or [])
    directory = Path(directory)
    _refuse_existing(
        directory, ("ca.key", "server.key", "clients.toml"), "choose another directory"
    )

    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, days)
    server_key = _new_key()
    server_cert = _server_certificate(server_key, ca_cert, ca_key, names, days)
    tokens = [new_token() for _ in range(clients)]
    entries = [
        ClientEntry(id=i, token_hash=hash_token(t), name=f"site{i}") for i, t in enumerate(tokens)
    ]

    _make_dir(directory)
    files = [
        _write(directory / "ca.pem", _cert_pem(ca_cert), _PUBLIC),
        _write(directory / "ca.key", _key_pem(ca_key), _SECRET),
        _write(directory / "server.pem", _cert_pem(server_cert), _PUBLIC),
        _write(directory / "server.key", _key_pem(server_key), _SECRET),
    ]
    for i, token in enumerate(tokens):
        files.append(_write(directory / f"client-{i}.token", (token + "\n").encode(), _SECRET))
    files.append(_write(directory / "clients.toml", ClientsFile.dump(entries).encode(), _PUBLIC))
    return files


def make_client_cert(ca_dir: str | Path, client_id: int, days: int = 365) -> tuple[Path, Path]:
    """Write ``client-<id>.pem``/``.key`` into ``ca_dir``, signed by its ``ca.pem``/``ca.key``.

    The certificate has ExtendedKeyUsage clientAuth and CN ``parablock-client-<id>``, for mutual
    TLS. Refuses to overwrite an existing ``client-<id>.key``.
    """
    if type(client_id) is not int or client_id < 0:
        raise CredentialsError(f"client id must be a non-negative integer, got {client_id!r}")
    _check_days(days)
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_dir)
    _refuse_existing(ca_dir, (f"client-{client_id}.key",), "delete it first to make a new one")
    key = _new_key()
    subject = _name(f"parablock-client-{client_id}")
    builder = _leaf_builder(subject, key, ca_cert, days).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    cert = _sign(builder, ca_key)
    pem = _write(ca_dir / f"client-{client_id}.pem", _cert_pem(cert), _PUBLIC)
    key_path = _write(ca_dir / f"client-{client_id}.key", _key_pem(key), _SECRET)
    return pem, key_path


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of PEM file ``path``; ``what`` names its role in errors (e.g. server.tls_cert)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{what}: file {path} does not exist; check the path") from None
    except OSError as e:
        raise CredentialsError(
            f"{what}: cannot read {path} ({e.strerror or type(e).__name__}); check that this "
            "user may read it"
        ) from None
    if b"-----BEGIN" not in data:
        raise CredentialsError(
            f"{what}: {path} is not a PEM file (no '-----BEGIN' line); check that it is the "
            "right file, in PEM rather than DER form"
        )
    return data


# -- certificates -------------------------------------------------------------------------------
def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ParaBlock trial"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    subject = _name("ParaBlock trial CA")
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return _sign(_validity(builder, days), key)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a leaf (server or client) only signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_builder(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, days: int
) -> x509.CertificateBuilder:
    """An end-entity certificate for ``key``, issued by ``ca_cert`` (not yet signed)."""
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    return _validity(builder, days)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Point at the CA's own SubjectKeyIdentifier when it has one (verifiers match on it)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    common_name = hosts[0] if len(hosts[0]) <= 64 else "parablock-server"  # CN is at most 64
    builder = (
        _leaf_builder(_name(common_name), key, ca_cert, days)
        .add_extension(x509.SubjectAlternativeName(_general_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return _sign(builder, ca_key)


def _sign(builder: x509.CertificateBuilder, key: object) -> x509.Certificate:
    """Sign with SHA-256, or with no separate digest for Ed25519/Ed448 CA keys."""
    plain = isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
    try:
        return builder.sign(key, None if plain else hashes.SHA256())  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise CredentialsError(f"cannot sign a certificate with this CA key: {e}") from None


# -- hosts ----------------------------------------------------------------------------------------
def _san_hosts(hosts: list[str]) -> list[str]:
    """``hosts`` then localhost, 127.0.0.1, ::1; without duplicates, order kept."""
    if isinstance(hosts, str):
        hosts = [hosts]
    out: list[str] = []
    for host in [*hosts, *ALWAYS_HOSTS]:
        if not isinstance(host, str) or not host.strip():
            raise CredentialsError(
                f"hosts: each host must be a DNS name or IP address, got {host!r}"
            )
        host = host.strip()
        if host not in out:
            out.append(host)
    return out


def _general_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        try:
            names.append(x509.DNSName(host))
        except ValueError as e:  # e.g. a non-ASCII name: cryptography wants the A-label form
            raise CredentialsError(f"hosts: {host!r} is not a usable DNS name ({e})") from None
    return names


# -- files --------------------------------------------------------------------------------------
def _check_days(days: int) -> None:
    if type(days) is not int or days < 1:
        raise CredentialsError(f"days must be an integer >= 1, got {days!r}")


def _refuse_existing(directory: Path, names: tuple[str, ...], advice: str) -> None:
    for name in names:
        if (directory / name).exists():
            raise CredentialsError(f"{directory} already holds {name}; {advice}")


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CredentialsError(
            f"cannot create credentials directory {directory} ({e.strerror or type(e).__name__})"
        ) from None


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to ``path`` with permissions ``mode`` (set at creation, never wider)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # an existing file keeps its old mode otherwise
            f.write(data)
    except OSError as e:
        raise CredentialsError(f"cannot write {path} ({e.strerror or type(e).__name__})") from None
    return path


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, object]:
    """The CA certificate and private key in ``ca_dir`` (ca.pem, ca.key), checked to match."""
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(read_pem(cert_path, "CA certificate"))
    except ValueError as e:
        raise CredentialsError(f"CA certificate: {cert_path} is not a certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(read_pem(key_path, "CA key"), password=None)
    except (TypeError, ValueError) as e:  # TypeError: the key is encrypted
        raise CredentialsError(
            f"CA key: cannot load {key_path} ({e}); it must be an unencrypted PEM private key"
        ) from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise CredentialsError(f"CA key: {key_path} does not belong to the certificate {cert_path}")
    return cert, key
