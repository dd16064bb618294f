"""Credentials for the networked federation: tokens, the clients file, trial certificates, and a
real TLS handshake with gRPC (raw bytes, no protobuf) against the generated CA."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from parablock.errors import CredentialsError
from parablock.transport import auth
from parablock.transport.auth import (
    ClientEntry,
    ClientsFile,
    hash_token,
    new_token,
    read_token,
)
from parablock.transport.certs import make_client_cert, make_trial_credentials, read_pem

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("creds") / "trial"  # does not exist yet
    make_trial_credentials(directory, clients=3, hosts=["fl.example.org", "10.0.0.7"], days=30)
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other")
    make_trial_credentials(directory, clients=1)
    return directory


# -- tokens -------------------------------------------------------------------------------------
def test_new_token_is_256_bit_urlsafe_and_fresh():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) == 43  # 32 bytes, base64url without padding
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_hash_token_is_sha256_hex_of_utf8_like_sha256sum():
    assert hash_token("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert hash_token("ünï") == "sha256:" + hashlib.sha256("ünï".encode()).hexdigest()


def test_read_token_strips_and_reports_missing_empty_unreadable(tmp_path):
    good = tmp_path / "t.token"
    good.write_text("  secret-token\n")
    assert read_token(good) == "secret-token"

    with pytest.raises(CredentialsError, match=r"token file .*nope\.token does not exist"):
        read_token(tmp_path / "nope.token")
    empty = tmp_path / "empty.token"
    empty.write_text(" \n\t")
    with pytest.raises(CredentialsError, match=r"empty\.token is empty"):
        read_token(empty)
    with pytest.raises(CredentialsError, match="cannot read token file") as info:
        read_token(tmp_path)  # a directory
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_identify_valid_wrong_missing_revoked():
    good, gone = new_token(), new_token()
    clients = ClientsFile(
        [
            ClientEntry(id=4, token_hash=hash_token(good), name="site4"),
            ClientEntry(id=1, token_hash=hash_token(gone), revoked=True),
        ]
    )
    assert clients.ids == [1, 4]
    assert clients.identify(good) == (4, "")
    assert clients.identify(gone) == (None, "revoked token")
    wrong = new_token()
    assert clients.identify(wrong) == (None, "unknown token")
    assert clients.identify(None) == (None, "no token")
    assert clients.identify("") == (None, "no token")
    assert clients.identify("\ud800") == (None, "unknown token")  # not encodable: no crash


def test_identify_compares_every_entry(monkeypatch):
    token = new_token()
    entries = [ClientEntry(id=i, token_hash=hash_token(new_token())) for i in range(5)]
    clients = ClientsFile([ClientEntry(id=9, token_hash=hash_token(token)), *entries])
    calls: list[tuple[str, str]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert clients.identify(token) == (9, "")  # the match is the first entry ...
    assert len(calls) == 6  # ... and all the others were compared anyway


# -- the clients file ---------------------------------------------------------------------------
def _entry_toml(**fields: str) -> str:
    body = {"id": "0", "token_hash": f'"{HASH_A}"', **fields}
    return "[[client]]\n" + "".join(f"{k} = {v}\n" for k, v in body.items() if v is not None)


BAD_FILES = [
    pytest.param(
        _entry_toml(colour='"red"'), ["entry 0", "'colour'", "allowed keys"], id="unknown-key"
    ),
    pytest.param(
        _entry_toml(id="-1"), ["entry 0", "'id'", "non-negative integer"], id="negative-id"
    ),
    pytest.param(_entry_toml(id="true"), ["'id'", "non-negative integer"], id="bool-id"),
    pytest.param(_entry_toml(id='"0"'), ["'id'", "non-negative integer"], id="string-id"),
    pytest.param(_entry_toml(id="1.0"), ["'id'", "non-negative integer"], id="float-id"),
    pytest.param(_entry_toml(id=None), ["entry 0", "missing", "'id'"], id="missing-id"),
    pytest.param(_entry_toml(token_hash=None), ["missing", "'token_hash'"], id="missing-hash"),
    pytest.param(
        _entry_toml() + _entry_toml(token_hash=f'"{HASH_B}"'),
        ["entry 1", "'id'", "unique"],
        id="duplicate-id",
    ),
    pytest.param(
        _entry_toml() + _entry_toml(id="1"), ["entry 1", "'token_hash'", "own token"], id="dup-hash"
    ),
    pytest.param(
        _entry_toml(token_hash='"sha256:' + "A" * 64 + '"'),
        ["'token_hash'", "64 lowercase hex"],
        id="uppercase-hash",
    ),
    pytest.param(
        _entry_toml(token_hash='"' + "a" * 64 + '"'), ["'token_hash'", "'sha256:'"], id="no-prefix"
    ),
    pytest.param(
        _entry_toml(token_hash='"sha256:abc"'), ["'token_hash'", "64 lowercase hex"], id="short"
    ),
    pytest.param(_entry_toml(token_hash="7"), ["'token_hash'", "'sha256:'"], id="hash-not-str"),
    pytest.param(
        _entry_toml(revoked='"no"'), ["entry 0", "'revoked'", "true or false"], id="revoked"
    ),
    pytest.param(_entry_toml(revoked="0"), ["'revoked'", "true or false"], id="revoked-int"),
    pytest.param(_entry_toml(name="3"), ["'name'", "string"], id="name-not-str"),
    pytest.param("# nobody\n", ["no [[client]] entries"], id="no-entries"),
    pytest.param("client = []\n", ["no [[client]] entries"], id="empty-array"),
    pytest.param("client = 5\n", ["array of tables"], id="client-not-tables"),
    pytest.param("server = 1\n" + _entry_toml(), ["'server'", "top-level"], id="top-level-key"),
    pytest.param("[[client]\nid = 0\n", ["not valid TOML"], id="bad-toml"),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_clients_file_rejects(tmp_path, text, fragments):
    path = tmp_path / "clients.toml"
    path.write_text(text)
    with pytest.raises(CredentialsError) as info:
        ClientsFile.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_clients_file_never_echoes_a_pasted_token(tmp_path):
    token = new_token()
    path = tmp_path / "clients.toml"
    path.write_text(_entry_toml(token_hash=f'"{token}"'))
    with pytest.raises(CredentialsError, match="token_hash") as info:
        ClientsFile.load(path)
    assert token not in str(info.value)


def test_clients_file_missing(tmp_path):
    with pytest.raises(CredentialsError, match=r"clients file .*absent\.toml does not exist"):
        ClientsFile.load(tmp_path / "absent.toml")


def test_clients_file_defaults_and_comments(tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text("# hi\n" + _entry_toml(id="7", name='"lab"  # a comment'))
    loaded = ClientsFile.load(path)
    assert loaded.entries == (ClientEntry(id=7, token_hash=HASH_A, revoked=False, name="lab"),)


def test_dump_load_round_trip(tmp_path):
    entries = [
        ClientEntry(id=0, token_hash=hash_token("t0"), name="site0"),
        ClientEntry(id=12, token_hash=hash_token("t1"), revoked=True, name='odd "name"\\ é\x7f'),
        ClientEntry(id=3, token_hash=hash_token("t2")),
    ]
    text = ClientsFile.dump(entries)
    assert text.startswith("# ParaBlock server: who may join (token hashes only, never tokens)\n")
    assert text.count("[[client]]") == 3
    path = tmp_path / "clients.toml"
    path.write_text(text, encoding="utf-8")
    loaded = ClientsFile.load(path)
    assert loaded.entries == tuple(entries)
    assert loaded == ClientsFile(entries)
    assert loaded.ids == [0, 3, 12]


def test_dump_refuses_what_load_would_reject():
    with pytest.raises(CredentialsError, match="'id'"):
        ClientsFile.dump(
            [ClientEntry(id=0, token_hash=HASH_A), ClientEntry(id=0, token_hash=HASH_B)]
        )
    with pytest.raises(CredentialsError, match="no \\[\\[client\\]\\] entries"):
        ClientsFile.dump([])


# -- trial credentials --------------------------------------------------------------------------
def test_trial_files_and_modes(trial):
    names = sorted(p.name for p in trial.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "clients.toml"]
        + [f"client-{i}.token" for i in range(3)]
    )
    for secret in ["ca.key", "server.key", "client-0.token", "client-1.token", "client-2.token"]:
        assert _mode(trial / secret) == 0o600, secret
    for key in ["ca.key", "server.key"]:
        assert (trial / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted


def test_trial_clients_file_holds_the_token_hashes(trial):
    clients = ClientsFile.load(trial / "clients.toml")
    assert clients.ids == [0, 1, 2]
    assert [e.name for e in clients.entries] == ["site0", "site1", "site2"]
    for i in range(3):
        token = read_token(trial / f"client-{i}.token")
        assert clients.identify(token) == (i, "")
        assert token not in (trial / "clients.toml").read_text()


def test_trial_returns_written_files_and_refuses_to_overwrite(tmp_path):
    written = make_trial_credentials(tmp_path, clients=1)
    assert {p.name for p in written} == {p.name for p in tmp_path.iterdir()}
    assert all(p.parent == tmp_path for p in written)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(CredentialsError, match="already holds ca.key; choose another directory"):
        make_trial_credentials(tmp_path, clients=1)
    assert (tmp_path / "ca.key").read_bytes() == before
    for name in ["server.key", "clients.toml"]:
        other = tmp_path / name.replace(".", "_")
        other.mkdir()
        (other / name).write_text("x")
        with pytest.raises(CredentialsError, match=f"already holds {name}"):
            make_trial_credentials(other, clients=1)


@pytest.mark.parametrize("clients", [0, -1, True, 1.5])
def test_trial_needs_at_least_one_client(tmp_path, clients):
    with pytest.raises(CredentialsError, match="clients must be an integer >= 1"):
        make_trial_credentials(tmp_path / "x", clients=clients)
    assert not (tmp_path / "x").exists()


def test_ca_certificate(trial):
    ca = _cert(trial / "ca.pem")
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.public_key().curve.name == "secp256r1"


def test_server_certificate_verifies_and_has_sans(trial):
    ca, server = _cert(trial / "ca.pem"), _cert(trial / "server.pem")
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cn = server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "fl.example.org"
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 <= lifetime.days <= 31
    # a full web-PKI style path check (SAN, EKU, key usage, validity) for each name
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier
    for subject in [
        x509.DNSName("fl.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]:
        verifier(subject).verify(server, [])
    with pytest.raises(x509.verification.VerificationError):
        verifier(x509.DNSName("evil.example.org")).verify(server, [])


def test_default_hosts_are_localhost(other_ca):
    server = _cert(other_ca / "server.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"


def test_client_certificate(tmp_path):
    make_trial_credentials(tmp_path, clients=1)
    pem, key = make_client_cert(tmp_path, 5)
    assert (pem.name, key.name) == ("client-5.pem", "client-5.key")
    assert _mode(key) == 0o600
    cert = _cert(pem)
    cert.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "parablock-client-5"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(CredentialsError, match="already holds client-5.key"):
        make_client_cert(tmp_path, 5)
    with pytest.raises(CredentialsError, match="CA certificate: file .*ca.pem does not exist"):
        make_client_cert(tmp_path / "nowhere", 0)


def test_read_pem(tmp_path, trial):
    assert read_pem(trial / "ca.pem", "client.ca_cert").startswith(b"-----BEGIN CERTIFICATE")
    with pytest.raises(CredentialsError, match=r"server\.tls_cert: file .*missing\.pem"):
        read_pem(tmp_path / "missing.pem", "server.tls_cert")
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x00")
    with pytest.raises(CredentialsError, match=r"server\.tls_key: .*cert\.der is not a PEM file"):
        read_pem(der, "server.tls_key")
    with pytest.raises(CredentialsError, match=r"server\.tls_cert: cannot read"):
        read_pem(tmp_path, "server.tls_cert")


# -- a real TLS handshake -----------------------------------------------------------------------
METHOD = "/parablock.Test/Echo"


@contextmanager
def _tls_server(directory: Path, client_ca: Path | None = None) -> Iterator[int]:
    """A gRPC server with the trial server certificate and one raw-bytes echo method."""
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"echo:" + request)
    generic = grpc.method_handlers_generic_handler("parablock.Test", {"Echo": handler})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        server.add_generic_rpc_handlers((generic,))
        creds = grpc.ssl_server_credentials(
            [
                (
                    read_pem(directory / "server.key", "key"),
                    read_pem(directory / "server.pem", "cert"),
                )
            ],
            root_certificates=client_ca.read_bytes() if client_ca else None,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        assert port > 0
        server.start()
        yield port
    finally:
        server.stop(None)


def _call(port: int, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        echo = channel.unary_unary(METHOD)  # no (de)serializers: raw bytes both ways
        return echo(b"hello", timeout=5)


def test_tls_handshake_with_trial_ca(trial, other_ca):
    with _tls_server(trial) as port:
        good = grpc.ssl_channel_credentials(root_certificates=(trial / "ca.pem").read_bytes())
        assert _call(port, good) == b"echo:hello"

        wrong = grpc.ssl_channel_credentials(root_certificates=(other_ca / "ca.pem").read_bytes())
        with pytest.raises(grpc.RpcError) as info:
            _call(port, wrong)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_with_client_certificate(tmp_path):
    make_trial_credentials(tmp_path, clients=1)
    pem, key = make_client_cert(tmp_path, 0)
    ca = (tmp_path / "ca.pem").read_bytes()
    with _tls_server(tmp_path, client_ca=tmp_path / "ca.pem") as port:
        creds = grpc.ssl_channel_credentials(ca, key.read_bytes(), pem.read_bytes())
        assert _call(port, creds) == b"echo:hello"
        with pytest.raises(grpc.RpcError):  # no client certificate: refused
            _call(port, grpc.ssl_channel_credentials(ca))
