"""The networked federation: a `parablock server` and `parablock client` processes on 127.0.0.1.

Real processes, real sockets, TLS and per-client tokens. Every process a test starts is stopped
by PID in a ``finally``; every gRPC server started in this process is stopped too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from conftest import make_model, tiny_config
from parablock.core.server import Server
from parablock.errors import ConnectError
from parablock.model.blocks import block_state, model_blocks
from parablock.run.runner import run
from parablock.transport.auth import ClientsFile, read_token
from parablock.transport.certs import make_trial_credentials, read_pem
from parablock.transport.grpc_client import GrpcConnection
from parablock.transport.grpc_service import SERVICE, FederationService, start
from parablock.wire.messages import BlockUpdate, encode
from parablock.wire.protocol import PROTOCOL, JoinRequest

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- fixtures: credentials, per-client data, a server config -----------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    from parablock.data.sources import reasoning_gym_records

    root = tmp_path_factory.mktemp("federation")
    make_trial_credentials(root / "creds", 2)
    for i in range(3):
        with open(root / f"d{i}.jsonl", "w") as f:
            for r in reasoning_gym_records("gsm_symbolic", 12, seed=50 + i):
                f.write(json.dumps({"question": r.prompt, "answer": f"{r.response} #### 1"}))
                f.write("\n")
    return root


def _server_sets(root: Path, out: Path, **kw) -> list[str]:
    c = root / "creds"
    sets = {
        "server.address": "127.0.0.1:0",
        "server.tls_cert": c / "server.pem",
        "server.tls_key": c / "server.key",
        "server.clients_file": c / "clients.toml",
        "server.join_timeout_s": 60,
        "run.out": out,
        "data.partition": "iid",
        "eval.source": f"gsm8k:{root / 'd2.jsonl'}",
        "eval.accuracy_size": 0,
        **kw,
    }
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def _config_file(root: Path, model_dir: str, name: str, **sections) -> Path:
    cfg = tiny_config(model_dir, "", **sections)
    path = root / f"{name}.toml"
    path.write_text(cfg.to_toml())
    return path


def _start_server(config: Path, sets: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, "-m", "parablock.cli", "server", "--config", str(config), *sets]
    proc = subprocess.Popen(args, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = re.search(r"listening on \S+ \(port (\d+)", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        time.sleep(0.1)
    _stop(proc)
    raise AssertionError(f"server did not start listening:\n{log.read_text()}")


def _client_args(root: Path, port: int, i: int, model_dir: str, out: Path, *extra) -> list[str]:
    c = root / "creds"
    return [
        sys.executable,
        "-m",
        "parablock.cli",
        "client",
        "--server",
        f"localhost:{port}",
        "--ca",
        str(c / "ca.pem"),
        "--id",
        str(i),
        "--token-file",
        str(c / f"client-{i}.token"),
        "--data",
        f"gsm8k:{root / f'd{i}.jsonl'}",
        "--model",
        model_dir,
        "--out",
        str(out),
        "--threads",
        "1",
        *extra,
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"process still running after {timeout}s:\n{log.read_text()}"
        ) from None


def _fingerprint(summary: Path) -> str:
    return json.loads(summary.read_text())["final_model_fingerprint"]


def _federate(site, config: Path, model_dir: str, tmp_path: Path, extra=((), ())) -> None:
    """A server (run directory ``srv``) and two client processes (``site0``, ``site1``; client i
    with ``extra[i]`` on its command line) run to the end, each exiting 0; all stopped by PID."""
    procs = []
    try:
        server, port = _start_server(
            config, _server_sets(site, tmp_path / "srv"), tmp_path / "server.log"
        )
        procs.append(server)
        for i in range(2):
            args = _client_args(site, port, i, model_dir, tmp_path / f"site{i}", *extra[i])
            procs.append(_start(args, tmp_path / f"client{i}.log"))
        for p, name in zip(procs[1:] + procs[:1], ["client0", "client1", "server"], strict=True):
            assert _wait(p, tmp_path / f"{name}.log") == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        _stop(*procs)


# -- a real federation equals the simulator, bit for bit ---------------------------------------
RECORD_DP = {"mode": "record", "noise_multiplier": 0.8, "clip_norm": 0.5}
CLIENT_DP = {"mode": "client", "noise_multiplier": 0.8, "clip_norm": 0.05, "noise_at": "client"}
SECURE_DP = {**CLIENT_DP, "secure_aggregation": True}  # distributed DP: masked noise shares


@pytest.mark.parametrize(
    "algorithm,compression,privacy",
    [
        ("parablock", "none", {}),
        ("fedbcd", "none", {}),
        ("parablock", "int8", {}),
        ("fedit_lora", "none", {}),
        ("fedavg_full", "none", {}),
        ("cyclic", "none", {}),
        ("parablock", "none", RECORD_DP),
        ("fedbcd", "none", CLIENT_DP),
        ("parablock", "none", SECURE_DP),
    ],
)
def test_server_and_two_client_processes_end_equal_to_the_local_backend(
    site, tiny_model_dir, tmp_path, algorithm, compression, privacy
):
    fed = {"algorithm": algorithm, "rounds": 4, "round_timeout_s": 60.0}
    if privacy.get("mode") == "client":
        fed["aggregator"] = "mean"
    # secure aggregation: the local reference runs without masks (the same encoding), so the
    # networked run with masks must equal it bit for bit
    reference = {**privacy, "secagg_masks": False} if privacy.get("secure_aggregation") else privacy
    if reference is not privacy:
        fed["update_bound"] = False
    link = {"compression": compression}  # the clients take it from the server at join
    config = _config_file(
        tmp_path, tiny_model_dir, "fed", federation=fed, link=link, privacy=privacy
    )
    sources = ";".join(f"gsm8k:{site / f'd{i}.jsonl'}" for i in range(2))
    local = run(
        tiny_config(
            tiny_model_dir,
            str(tmp_path / "local"),
            federation=fed,
            link=link,
            data={"partition": "per_client", "client_sources": sources},
            eval={"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0},
            privacy=reference,
        )
    )
    _federate(site, config, tiny_model_dir, tmp_path)
    want = local["final_model_fingerprint"]
    assert _fingerprint(tmp_path / "srv" / "summary.json") == want
    for i in range(2):
        assert _fingerprint(tmp_path / f"site{i}" / "summary.json") == want
    summary = json.loads((tmp_path / "srv" / "summary.json").read_text())
    assert summary["backend"] == "remote" and summary["updates_rejected"] == 0
    # the server evaluates on the same held-out draw of eval.source as the simulator
    assert summary["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    assert summary["bytes_up"] > 0 and summary["mean_compute_s"] > 0
    # the same bytes cross as in the simulator (int8: compressed both ways)
    assert (summary["bytes_up"], summary["bytes_down"]) == (local["bytes_up"], local["bytes_down"])
    timeline = (tmp_path / "srv" / "timeline.jsonl").read_text().splitlines()
    assert {json.loads(x)["client"] for x in timeline} == {0, 1}  # from the clients' reports
    # four rounds and the drain; with cyclic, client 0's turns (rounds 0 and 2) and its catch-up
    barriers = 3 if algorithm == "cyclic" else 5
    assert (tmp_path / "site0" / "metrics.jsonl").read_text().count("client_round") == barriers
    if privacy:  # each site's noise and ledger, as the simulator's; epsilon reported to the server
        assert summary["privacy_epsilon"] == pytest.approx(local["privacy_epsilon"], rel=1e-9)
        assert summary["privacy_epsilon"] > 0


def test_a_site_that_holds_its_frozen_weights_in_bf16_still_ends_equal_on_the_trained_blocks(
    site, tiny_model_dir, tmp_path
):
    fed = {"rounds": 4, "round_timeout_s": 60.0}
    sections = dict(federation=fed, model={"blocks": "top:2"}, train={"precision": "bf16"})
    config = _config_file(tmp_path, tiny_model_dir, "fed", **sections)
    held = ("--frozen-dtype", "bf16", "--recompute", "--return-memory")
    _federate(site, config, tiny_model_dir, tmp_path, (held, ()))
    srv = json.loads((tmp_path / "srv" / "summary.json").read_text())
    held, plain = (json.loads((tmp_path / f"site{i}" / "summary.json").read_text()) for i in (0, 1))
    keys = ("frozen_dtype", "recompute", "return_memory")
    assert tuple(held[k] for k in keys) == ("bf16", True, True)
    assert tuple(plain[k] for k in keys) == ("fp32", False, False)
    # every client's trained blocks equal the server's; only the bf16 site's frozen rest differs
    assert held["trained_blocks_fingerprint"] == srv["trained_blocks_fingerprint"]
    assert plain["trained_blocks_fingerprint"] == srv["trained_blocks_fingerprint"]
    assert plain["final_model_fingerprint"] == srv["final_model_fingerprint"]
    assert held["final_model_fingerprint"] != srv["final_model_fingerprint"]
    assert srv["updates_rejected"] == 0 and held["peak_rss_mb"] > 0


# -- who may talk to the server ------------------------------------------------------------------
@pytest.fixture
def grpc_server(site):
    """A real ``Server`` behind gRPC with TLS, in this process; stopped at the end."""
    model = make_model(64, layers=2)
    blocks = model_blocks(model)
    server = Server(model, blocks, [0, 1, 0], clients=2, fingerprint="base")
    c = site / "creds"
    import grpc

    creds = grpc.ssl_server_credentials(
        [(read_pem(c / "server.key", "key"), read_pem(c / "server.pem", "cert"))]
    )
    service = FederationService(server, ClientsFile.load(c / "clients.toml"))
    g, port = start(service, "127.0.0.1:0", creds, workers=8)
    try:
        yield server, service, port
    finally:
        # wake handlers still waiting on an aggregate (gRPC's stop cancels the calls, not the
        # handler threads): else they hold this process at exit until the round's deadline
        server.stop()
        g.stop(None).wait()


def _conn(site, port, token, **kw):
    ca = None if kw.get("insecure") else read_pem(site / "creds" / "ca.pem", "ca")
    return GrpcConnection(f"localhost:{port}", token, ca=ca, **kw)


def test_bad_tokens_other_ids_and_plain_text_are_refused_and_change_nothing(site, grpc_server):
    server, service, port = grpc_server
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    token0 = read_token(site / "creds" / "client-0.token")
    join = JoinRequest(PROTOCOL, 0, "base")
    for token, match in [("not-a-token", "unknown token"), ("", "no token")]:
        with pytest.raises(ConnectError, match=match):
            _conn(site, port, token).join(join)
    with pytest.raises(ConnectError, match="belongs to client 0, not client 1"):
        _conn(site, port, token0).join(JoinRequest(PROTOCOL, 1, "base"))
    with pytest.raises(ConnectError, match="cannot reach"):
        _conn(site, port, token0, insecure=True).join(join)  # plain text against TLS
    with pytest.raises(ConnectError, match="base model differs"):
        _conn(site, port, token0).join(JoinRequest(PROTOCOL, 0, "other"))
    with pytest.raises(ConnectError, match="protocol mismatch"):
        _conn(site, port, token0).join(JoinRequest(PROTOCOL + 1, 0, "base"))
    # an upload with a bad token is refused before its payload is read
    delta = {n: torch.ones_like(t) for n, t in block_state(server.model, server.blocks[0]).items()}
    update = BlockUpdate(0, 0, 0, -1, 4, 1.0, delta)
    with pytest.raises(ConnectError, match="unknown token"):
        _conn(site, port, "stolen?").upload(update)
    # client 1 uploading client 0's round as client 0 is still client 1 to the server
    token1 = read_token(site / "creds" / "client-1.token")
    spoof = BlockUpdate(0, 0, 0, -1, 4, 1.0, delta)
    from parablock.errors import UpdateRejected

    with pytest.raises(UpdateRejected, match="claims to come from client 0"):
        _conn(site, port, token1).upload(spoof)
    assert len(service.stats.refused) == 3
    assert server.stats.accepted == 0 and server.versions == {0: -1, 1: -1}
    for n, p in server.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_secure_aggregation_calls_are_checked_counted_and_answered_why(site, grpc_server):
    from parablock.errors import MessageError
    from parablock.wire.protocol import SecAggCall

    server, service, port = grpc_server
    conn = _conn(site, port, read_token(site / "creds" / "client-0.token"))
    try:
        raw = conn._secagg
        meta = conn._metadata
        for payload, why in [
            (b"not json", "not JSON"),
            (b'{"kind": "steal", "round": 0, "sealed": {}, "shares": {}}', "is not one of"),
            (b'{"kind": "reveal", "round": 0, "sealed": {}, "shares": {"1": "zz"}}', "not hex"),
            (b'{"kind": "reveal", "round": 0, "sealed": {}, "shares": {"x": "00"}}', "integer"),
            (b'{"kind": "roster", "round": 0, "sealed": {}, "shares": {}, "x": 1}', "unknown"),
            (b'{"kind": "roster"}', "missing field"),
            (b"x" * (SecAggCall.MAX_BYTES + 1), "too large"),
        ]:
            with pytest.raises(grpc.RpcError, match=why):
                raw(payload, metadata=meta)
        # well formed, but this run has no secure aggregation: told so
        with pytest.raises(MessageError, match="does not use secure aggregation"):
            conn.secagg(SecAggCall("roster"))
    finally:
        conn.close()
    assert service.stats.ended.counts().get("secagg", 0) >= 4


def test_hostile_uploads_over_grpc_are_each_rejected_and_never_reach_the_model(site, grpc_server):
    """Raw chunk streams from an authenticated client, crafted as a hostile tester would."""
    server, _, port = grpc_server
    model, blocks = server.model, server.blocks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = site / "creds"
    channel = grpc.secure_channel(
        f"localhost:{port}", grpc.ssl_channel_credentials(read_pem(c / "ca.pem", "ca"))
    )
    upload = channel.stream_unary(
        f"/{SERVICE}/Upload", request_serializer=bytes, response_deserializer=bytes
    )
    auth = (("authorization", "Bearer " + read_token(c / "client-0.token")),)
    good = {n: torch.ones_like(t) for n, t in block_state(model, blocks[0]).items()}
    meta = {
        "client": 0,
        "round": 0,
        "block": 0,
        "base_version": -1,
        "num_examples": 4,
        "train_loss": 1.0,
    }

    def header(meta: dict, entries: dict) -> bytes:
        info = {
            "format": "parablock/1",
            "kind": "BlockUpdate",
            "meta": json.dumps(meta),
            "digest": "x",
        }
        raw = json.dumps({**entries, "__metadata__": info}).encode()
        return len(raw).to_bytes(8, "little") + raw

    def update(meta: dict, tensors: dict) -> list[bytes]:
        return list(encode("BlockUpdate", meta, tensors))

    block1 = {n: torch.ones_like(t) for n, t in block_state(model, blocks[1]).items()}
    f64 = {n: torch.full(t.shape, 1e300, dtype=torch.float64) for n, t in good.items()}
    last = bytearray(update(meta, good)[-1])
    last[-1] ^= 1
    flipped = bytes(last)
    hostile = {
        "garbage": ([b"\xff" * 100], "too large"),
        "1e12 elements": (
            [
                header(
                    meta,
                    {
                        "x": {
                            "dtype": "F32",
                            "shape": [10**6, 10**6],
                            "data_offsets": [0, 4 * 10**12],
                        }
                    },
                )
            ],
            "do not match",
        ),
        "NaN examples": ([header({**meta, "num_examples": float("nan")}, {})], "integer"),
        "round as float": ([header({**meta, "round": 0.0}, {})], "integer"),
        "float64 1e300": (update(meta, f64), "do not match"),
        "NaN delta": (update(meta, {n: t * float("nan") for n, t in good.items()}), "NaN"),
        "extra 0-dim": (update(meta, {**good, "bonus": torch.tensor(1.0)}), "do not match"),
        "future round": (update({**meta, "round": 1, "block": 1}, block1), "open round"),
        "as client 1": (update({**meta, "client": 1}, good), "claims to come from client 1"),
        "truncated": (update(meta, good)[:-1], "truncated"),
        "bad checksum": (update(meta, good)[:-1] + [flipped], "checksum"),
    }
    try:
        for name, (chunks, why) in hostile.items():
            reply = json.loads(upload(iter(chunks), metadata=auth))
            assert not reply["accepted"] and why in reply["reason"], (name, reply)
    finally:
        channel.close()
    assert server.stats.accepted == 0 and len(server.stats.rejected) == len(hostile)
    assert server.versions == {0: -1, 1: -1}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_one_client_cannot_hold_more_than_its_share_of_server_threads(site, grpc_server):
    """WaitAggregate calls held open: the fifth from one token is refused at once; another
    client is still served."""
    from parablock.transport.grpc_service import CALLS_PER_CLIENT

    _, service, port = grpc_server
    c = site / "creds"
    channel = grpc.secure_channel(
        f"localhost:{port}", grpc.ssl_channel_credentials(read_pem(c / "ca.pem", "ca"))
    )
    wait = channel.unary_unary(
        f"/{SERVICE}/WaitAggregate", request_serializer=bytes, response_deserializer=bytes
    )
    auth = (("authorization", "Bearer " + read_token(c / "client-0.token")),)
    held = [wait.future(b'{"round": 0}', metadata=auth) for _ in range(CALLS_PER_CLIENT)]
    try:
        deadline = time.monotonic() + 10
        while service.stats.busy.get(0, 0) < CALLS_PER_CLIENT and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as e:
            wait(b'{"round": 0}', metadata=auth, timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = (("authorization", "Bearer " + read_token(c / "client-1.token")),)
        report = channel.unary_unary(
            f"/{SERVICE}/Report", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as e:  # served (and refused for its payload only)
            report(b"{}", metadata=other, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for f in held:
            f.cancel()
        channel.close()


def _vm_hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


_UPLOADER = """
import json, sys, torch
from parablock.wire.messages import BlockUpdate, encode
from parablock.wire.protocol import PROTOCOL, JoinRequest
from parablock.transport.auth import read_token
from parablock.transport.certs import read_pem
from parablock.transport.grpc_client import GrpcConnection
port, creds, shapes = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
delta = {n: torch.randn(s) for n, s in shapes.items()}
conn = GrpcConnection(f"localhost:{port}", read_token(f"{creds}/client-0.token"),
                      ca=read_pem(f"{creds}/ca.pem", "ca"))
conn.join(JoinRequest(PROTOCOL, 0, ""))
print(conn.upload(BlockUpdate(0, 0, 0, -1, 4, 1.0, delta)))
conn.close()
"""


def test_a_large_block_crosses_in_chunks_with_bounded_memory(site, tmp_path):
    """A 73 MB block goes up from a client process through gRPC+TLS as 1 MiB chunks; the server
    writes them straight into tensors, so it never holds the block twice."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=1024,
        intermediate_size=5120,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    blocks = model_blocks(model)
    server = Server(model, blocks, [0, 1], clients=2)  # two clients: one upload, no aggregation
    params = dict(model.named_parameters())
    shapes = {n: list(params[n].shape) for n in blocks[0].param_names}
    nbytes = sum(params[n].numel() * 4 for n in shapes)
    assert nbytes >= 64e6
    import grpc

    c = site / "creds"
    creds = grpc.ssl_server_credentials(
        [(read_pem(c / "server.key", "key"), read_pem(c / "server.pem", "cert"))]
    )
    service = FederationService(server, ClientsFile.load(c / "clients.toml"))
    g, port = start(service, "127.0.0.1:0", creds, 8)
    uploader = None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak memory
        base = _vm_hwm_kb()
        args = [sys.executable, "-c", _UPLOADER, str(port), str(c), json.dumps(shapes)]
        uploader = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = uploader.communicate(timeout=120)
        assert uploader.returncode == 0, err.decode()
        extra = (_vm_hwm_kb() - base) * 1024
    finally:
        if uploader is not None and uploader.poll() is None:
            uploader.kill()
            uploader.wait()
        server.stop()
        g.stop(None).wait()
    assert int(out) > nbytes  # the bytes that crossed: the block and its header
    torch.manual_seed(0)
    stored = server._pending[0][0].tensors
    assert all(torch.equal(stored[n], torch.randn(s)) for n, s in shapes.items())
    # one copy of the block (the decoded tensors) plus gRPC's buffers; a whole-payload buffer
    # before decoding would make it at least two
    print(f"peak extra {extra / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB block")
    assert extra < 1.6 * nbytes, f"peak extra {extra / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB"


# -- a client killed mid-run rejoins ---------------------------------------------------------------
def test_a_killed_client_restarts_rejoins_catches_up_and_ends_equal_to_the_server(
    site, tiny_model_dir, tmp_path
):
    # long enough that a restarted client (a new process: imports, model load) finds the run
    # still going on a loaded machine
    fed = {"algorithm": "parablock", "rounds": 48, "min_clients": 1, "round_timeout_s": 3.0}
    config = _config_file(tmp_path, tiny_model_dir, "fed", federation=fed)
    slow = ("--emulate-latency-ms", "120")
    no_eval = _server_sets(site, tmp_path / "srv", **{"eval.source": ""})  # no held-out data
    procs = []
    try:
        server, port = _start_server(config, no_eval, tmp_path / "server.log")
        procs.append(server)
        args = [
            _client_args(site, port, i, tiny_model_dir, tmp_path / f"site{i}", *slow)
            for i in range(2)
        ]
        procs.append(_start(args[0], tmp_path / "client0.log"))
        victim = _start(args[1], tmp_path / "client1a.log")
        procs.append(victim)
        metrics = tmp_path / "site1" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert time.monotonic() < deadline and victim.poll() is None, (
                tmp_path / "client1a.log"
            ).read_text()
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        again = _start(args[1], tmp_path / "client1b.log")
        procs.append(again)
        for p, log in [(procs[1], "client0"), (again, "client1b"), (server, "server")]:
            assert _wait(p, tmp_path / f"{log}.log") == 0, (tmp_path / f"{log}.log").read_text()
    finally:
        _stop(*procs)
    rejoin_log = (tmp_path / "client1b.log").read_text()
    assert "rejoining from its checkpoint" in rejoin_log
    want = _fingerprint(tmp_path / "srv" / "summary.json")
    assert _fingerprint(tmp_path / "site0" / "summary.json") == want
    assert _fingerprint(tmp_path / "site1" / "summary.json") == want


# -- what a user sees when something is wrong ------------------------------------------------------
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parablock.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(p: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("parablock: error:"), p.stderr
    for w in words:
        assert w in last, last


def test_user_errors_are_one_line_with_exit_code_2(site, tiny_model_dir, tmp_path):
    c = site / "creds"
    base = [
        "client",
        "--id",
        "0",
        "--data",
        f"gsm8k:{site / 'd0.jsonl'}",
        "--model",
        tiny_model_dir,
        "--out",
        str(tmp_path / "site0"),  # not site-0/ in the working directory
    ]
    # nothing listens on that port
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    p = _cli(
        *base,
        "--server",
        f"127.0.0.1:{free}",
        "--ca",
        str(c / "ca.pem"),
        "--token-file",
        str(c / "client-0.token"),
        "--out",
        str(tmp_path / "s"),
    )
    _one_line_error(p, 2, "cannot reach", f"127.0.0.1:{free}")
    p = _cli(
        *base,
        "--server",
        "localhost:1",
        "--ca",
        str(c / "ca.pem"),
        "--token-file",
        str(tmp_path / "missing.token"),
    )
    _one_line_error(p, 2, "missing.token")
    p = _cli(*base, "--server", "localhost:1", "--token-file", str(c / "client-0.token"))
    _one_line_error(p, 2, "--ca")
    p = _cli(
        "server", "--set", f"model.name_or_path={tiny_model_dir}", "--set", "server.insecure=true"
    )
    _one_line_error(p, 2, "server.clients_file")
    p = _cli("server", "--set", f"server.clients_file={c / 'clients.toml'}")
    _one_line_error(p, 2, "server.tls_cert")


def test_a_server_that_goes_away_mid_round_is_a_one_line_run_failure(
    site, tiny_model_dir, tmp_path
):
    fed = {"clients": 1, "rounds": 40, "round_timeout_s": 30.0}
    config = _config_file(tmp_path, tiny_model_dir, "fed", federation=fed)
    procs = []
    try:
        server, port = _start_server(
            config, _server_sets(site, tmp_path / "srv"), tmp_path / "server.log"
        )
        procs.append(server)
        args = _client_args(site, port, 0, tiny_model_dir, tmp_path / "site0")
        extra = ["--emulate-latency-ms", "100", "--reconnect-s", "0"]
        client = _start([*args, *extra], tmp_path / "client.log")
        procs.append(client)
        metrics = tmp_path / "site0" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        assert _wait(client, tmp_path / "client.log", timeout=60) == 1
    finally:
        _stop(*procs)
    log = (tmp_path / "client.log").read_text()
    assert "Traceback" not in log, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("parablock: error: lost the ParaBlock server"), last
    assert "run the same command again to rejoin" in last
    # what the client had finished is in its own checkpoint
    assert list((tmp_path / "site0" / "checkpoint").glob("client0.r*.st"))


def test_a_crashed_server_resumes_and_its_clients_rejoin_by_themselves(
    site, tiny_model_dir, tmp_path
):
    """Nothing aggregated is lost: the server restarts from its checkpoint on the same port,
    the clients reconnect from theirs, and all three end with the same model."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fed = {"rounds": 30, "round_timeout_s": 20.0}
    config = _config_file(tmp_path, tiny_model_dir, "fed", federation=fed)
    sets = _server_sets(site, tmp_path / "srv", **{"server.address": f"127.0.0.1:{port}"})
    procs = []
    try:
        server, _ = _start_server(config, sets, tmp_path / "server1.log")
        procs.append(server)
        for i in range(2):
            args = _client_args(site, port, i, tiny_model_dir, tmp_path / f"site{i}")
            procs.append(_start([*args, "--emulate-latency-ms", "100"], tmp_path / f"c{i}.log"))
        ckpt = tmp_path / "srv" / "checkpoint"
        deadline = time.monotonic() + 120
        while len(list(ckpt.glob("block*.st"))) < 5:
            assert time.monotonic() < deadline, (tmp_path / "server1.log").read_text()
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        resume = ["server", "--resume", str(tmp_path / "srv")]
        again = _start([sys.executable, "-m", "parablock.cli", *resume], tmp_path / "server2.log")
        procs.append(again)
        for p, log in [(procs[1], "c0"), (procs[2], "c1"), (again, "server2")]:
            assert _wait(p, tmp_path / f"{log}.log") == 0, (tmp_path / f"{log}.log").read_text()
    finally:
        _stop(*procs)
    assert "srv after round" in (tmp_path / "server2.log").read_text()
    assert "rejoining in" in (tmp_path / "c0.log").read_text()
    want = _fingerprint(tmp_path / "srv" / "summary.json")
    for i in range(2):
        assert _fingerprint(tmp_path / f"site{i}" / "summary.json") == want


def test_faulty_client_processes_are_ridden_out_and_end_equal_to_the_server(
    site, tiny_model_dir, tmp_path
):
    """Client 0 crashes (restarts from its checkpoint) and sends an upload with a wrong token;
    client 1 sends a NaN delta, a replay and forged metadata: every bad message is refused, the
    run completes, and both clients end with the server's model."""
    fed = {"rounds": 5, "round_timeout_s": 30.0, "min_clients": 1}
    config = _config_file(tmp_path, tiny_model_dir, "fed", federation=fed)
    faults = ["crash@0:1,token@0:2", "nan@1:1,replay@1:2,forge@1:3"]
    _federate(site, config, tiny_model_dir, tmp_path, tuple(("--faults", f) for f in faults))
    summary = json.loads((tmp_path / "srv" / "summary.json").read_text())
    assert summary["updates_rejected"] >= 3  # NaN, replay, forged (the token never got in)
    want = summary["final_model_fingerprint"]
    for i in range(2):
        assert _fingerprint(tmp_path / f"site{i}" / "summary.json") == want
    log0 = (tmp_path / "client0.log").read_text()
    assert "restarting from its checkpoint" in log0 and "wrong token was refused" in log0
    assert "unknown token" in (tmp_path / "server.log").read_text()
