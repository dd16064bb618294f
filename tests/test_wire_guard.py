"""No stranger can stall the networked server, and no insider can hold or grow it.

A real ``Server`` behind gRPC with TLS on 127.0.0.1, in this process, with the worker pool a
``parablock server`` gives two clients; attackers open calls that never send their request,
uploads that go quiet, oversized and deeply nested messages, and floods of reports. Every call
and channel a test opens is closed, and the server is stopped, in a ``finally``.
"""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
import torch

from conftest import make_model
from parablock.core.server import Server
from parablock.model.blocks import block_state, model_blocks
from parablock.transport.auth import ClientsFile, read_token
from parablock.transport.certs import make_trial_credentials, read_pem
from parablock.transport.grpc_service import CALLS_PER_CLIENT, SERVICE, FederationService, start
from parablock.wire.messages import BlockUpdate, MessageError, encode
from parablock.wire.protocol import (
    MAX_REPORT_SPANS,
    PROTOCOL,
    JoinRequest,
    RecordReport,
    RoundReport,
    SpanReport,
)

REQUEST_S = 1.0  # server.request_timeout_s in these tests


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    make_trial_credentials(root, 2)
    return root


@pytest.fixture
def guarded(creds):
    model = make_model(64, layers=2)
    server = Server(model, model_blocks(model), [0, 1, 0], clients=2, fingerprint="base")
    service = FederationService(
        server, ClientsFile.load(creds / "clients.toml"), request_timeout_s=REQUEST_S
    )
    key, cert = read_pem(creds / "server.key", "key"), read_pem(creds / "server.pem", "cert")
    workers = CALLS_PER_CLIENT * server.clients + 8  # as parablock server sizes its pool
    g, port = start(service, "127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]), workers)
    try:
        yield server, service, port
    finally:
        server.stop()
        g.stop(None).wait()
        service.stop()


class Caller:
    """Channels to the server; each call's method by name; closes everything it opened."""

    def __init__(self, creds, port: int) -> None:
        self.creds, self.port = creds, port
        self.channels: list[grpc.Channel] = []
        self.release = threading.Event()  # ends every silent request stream

    def channel(self) -> grpc.Channel:
        ca = grpc.ssl_channel_credentials(read_pem(self.creds / "ca.pem", "ca"))
        ch = grpc.secure_channel(f"localhost:{self.port}", ca)
        self.channels.append(ch)
        return ch

    def method(self, ch: grpc.Channel, name: str, streaming: bool = True):
        kind = ch.stream_unary if streaming else ch.unary_unary
        return kind(f"/{SERVICE}/{name}", request_serializer=bytes, response_deserializer=bytes)

    def auth(self, client: int):
        token = read_token(self.creds / f"client-{client}.token")
        return (("authorization", f"Bearer {token}"),)

    def silent(self, *first: bytes):
        """A request stream that sends ``first`` and then nothing until the test ends."""
        yield from first
        self.release.wait()

    def close(self) -> None:
        self.release.set()
        for ch in self.channels:
            ch.close()


@pytest.fixture
def caller(creds, guarded):
    c = Caller(creds, guarded[2])
    try:
        yield c
    finally:
        c.close()


def _code(future, timeout: float = 10.0):
    e = future.exception(timeout=timeout)
    return None if e is None else e.code()


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _report(round: int, spans: int = 1) -> RoundReport:
    record = RecordReport(round, 0, 1.0, 0.1, 0.1, 0.1, 0.0, 1.3, 10, 10, 1.0, 4, 0.0, 1.3, False)
    return RoundReport(record, [SpanReport(round, "compute", 0.0, 1.0)] * spans)


def test_callers_without_a_token_cannot_hold_the_server(guarded, caller):
    """60 calls without a token that never send their request, on 30 connections, and an
    insider holding every one of its slots with silent requests: an honest client's call is
    answered at once, the strangers are refused at once, the insider's calls end at the request
    deadline, and every worker and slot is free afterwards."""
    server, service, port = guarded
    strangers = []
    for _ in range(30):
        ch = caller.channel()
        for name in ("Join", "WaitAggregate"):
            strangers.append(caller.method(ch, name).future(caller.silent()))
    insider = caller.channel()
    held = [
        caller.method(insider, "WaitAggregate").future(caller.silent(), metadata=caller.auth(0))
        for _ in range(CALLS_PER_CLIENT)
    ]
    assert _until(lambda: service.stats.busy.get(0, 0) == CALLS_PER_CLIENT, 5.0)
    started = time.monotonic()
    honest = caller.method(caller.channel(), "Report", streaming=False)
    assert honest(_report(0).to_bytes(), metadata=caller.auth(1), timeout=5.0) == b"{}"
    assert time.monotonic() - started < 2.0
    assert all(_code(f) == grpc.StatusCode.UNAUTHENTICATED for f in strangers)
    assert len(service.stats.refused) == len(strangers)
    assert service.stats.refused.by_kind["no token"] == len(strangers)
    # the insider's silent requests end at the deadline, and its slots come back
    assert all(_code(f) == grpc.StatusCode.CANCELLED for f in held)
    assert _until(lambda: service.stats.busy.get(0, 0) == 0, 5.0)
    assert service.stats.ended.by_kind["idle"] == CALLS_PER_CLIENT
    assert server.reports[1].rounds[0].round == 0


def test_a_flood_of_silent_calls_from_one_token_is_bounded(guarded, caller):
    """Twenty silent calls from one valid token: four hold a slot until the deadline, the rest
    are refused at once; meanwhile another client joins."""
    _, service, _ = guarded
    ch = caller.channel()
    calls = [
        caller.method(ch if i < 8 else caller.channel(), "Join").future(
            caller.silent(), metadata=caller.auth(0)
        )
        for i in range(20)
    ]
    join = caller.method(caller.channel(), "Join", streaming=False)
    reply = join(JoinRequest(PROTOCOL, 1, "base").to_bytes(), metadata=caller.auth(1), timeout=5)
    assert json.loads(reply)["start_round"] == 0
    codes = [_code(f) for f in calls]
    assert codes.count(grpc.StatusCode.CANCELLED) == CALLS_PER_CLIENT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20 - CALLS_PER_CLIENT
    assert _until(lambda: service.stats.busy.get(0, 0) == 0, 5.0)


def test_a_silent_upload_is_ended_counted_and_rejected(guarded, caller):
    server, service, _ = guarded
    delta = {
        n: torch.ones_like(t) * 1e-3 for n, t in block_state(server.model, server.blocks[0]).items()
    }
    chunks = list(BlockUpdate(0, 0, 0, -1, 4, 1.0, delta).chunks(chunk_bytes=4096))
    assert len(chunks) > 2
    upload = caller.method(caller.channel(), "Upload")
    started = time.monotonic()
    call = upload.future(caller.silent(*chunks[:2]), metadata=caller.auth(0))
    assert _code(call) == grpc.StatusCode.CANCELLED
    assert REQUEST_S <= time.monotonic() - started < REQUEST_S + 3.0
    assert _until(lambda: len(server.stats.rejected) == 1, 5.0)  # its handler sees it end
    assert "no chunk for" in server.stats.rejected.recent[-1]
    assert service.stats.ended.by_kind["idle"] == 1
    assert _until(lambda: service.stats.busy.get(0, 0) == 0, 5.0)
    assert server.stats.accepted == 0 and server.versions == {0: -1, 1: -1}


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_reports_cannot_grow_the_server(guarded, caller):
    """Eight 3.75 MB reports (what one Report of 65,536 spans takes) are refused before they are parsed (quickly, without memory growth);
    spans beyond the per-round bound are refused; a refused report is counted."""
    server, service, _ = guarded
    report = caller.method(caller.channel(), "Report", streaming=False)
    spans = [{"round": 0, "phase": "compute", "start": 0.0, "end": 1.0}] * 65536
    big = json.dumps({"record": json.loads(_report(0).to_bytes())["record"], "spans": spans})
    big = big.encode()
    assert len(big) > 3 << 20
    before = _rss_mb()
    for _ in range(8):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            report(big, metadata=caller.auth(0), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too large" in e.value.details()
        assert time.monotonic() - started < 1.0
    assert _rss_mb() - before < 40
    assert service.stats.ended.by_kind["too large"] == 8
    # within the size, spans are bounded per client and round over every report
    ok = _report(1, spans=MAX_REPORT_SPANS)
    assert report(ok.to_bytes(), metadata=caller.auth(0), timeout=5) == b"{}"
    with pytest.raises(grpc.RpcError) as e:
        report(_report(1, spans=1).to_bytes(), metadata=caller.auth(0), timeout=5)
    assert "more than 64 spans for round 1" in e.value.details()
    assert len(server.reports[0].spans) == MAX_REPORT_SPANS


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_counted_rejection_with_its_reason(guarded, caller):
    server, service, _ = guarded
    deep = _nested(100_000)
    with pytest.raises(MessageError, match="nested too deeply"):
        JoinRequest.from_bytes(deep.encode())
    ch = caller.channel()
    for name in ("Join", "WaitAggregate", "Report"):
        with pytest.raises(grpc.RpcError) as e:
            caller.method(ch, name, streaming=False)(
                _nested(2000).encode(), metadata=caller.auth(0), timeout=5
            )
        assert e.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), (name, e.value)
    # an upload whose header, or whose metadata, nests deeply: a rejected update, with why
    meta = {"client": 0, "round": 0, "block": 0, "base_version": -1, "num_examples": 4}
    meta["train_loss"] = 1.0
    tensors = {"x": torch.zeros(2)}
    deep_meta = list(encode("BlockUpdate", meta, tensors))
    header = json.loads(deep_meta[0][8:])
    header["__metadata__"]["meta"] = _nested(50_000)
    raw = json.dumps(header).encode()
    deep_meta[0] = len(raw).to_bytes(8, "little") + raw
    raw = ("[" * 200_000).encode()
    deep_header = [len(raw).to_bytes(8, "little") + raw]
    upload = caller.method(ch, "Upload")
    for chunks in (deep_meta, deep_header):
        reply = json.loads(upload(iter(chunks), metadata=caller.auth(0), timeout=5))
        assert not reply["accepted"] and "nested too deeply" in reply["reason"], reply
    assert len(server.stats.rejected) == 2
    assert all("nested too deeply" in r for r in server.stats.rejected.recent)
