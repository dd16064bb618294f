"""The Flower relay without Flower: the ServerApp's relay and two ``flower-worker``s (in threads,
reached over their real local gRPC sockets, as the ClientApp reaches them) end with the local
backend's global model, bit for bit; each round takes one message each way."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import tiny_config
from parablock.core.metrics import ClientLog
from parablock.flower.bundle import Bundle, Item, Manifest
from parablock.flower.relay import relay
from parablock.flower.worker import METHOD, OPTIONS
from parablock.run.runner import run
from parablock.wire.compress import CODECS
from test_network import _start, _stop, _wait, site  # noqa: F401  (site: per-client data)


class SocketWire:
    """Flower's part played in-process: each message is one hand-over on a worker's socket."""

    def __init__(self, sockets: dict[int, str]) -> None:
        self.sockets = sockets
        self.pool = ThreadPoolExecutor(len(sockets))
        self.futures = {}
        self.sent: list[tuple[int, int]] = []
        self.failing: dict[int, range] = {}  # node -> its messages (from 1) that come back errors
        # node -> set while its messages may go (a test clears it to hold them back)
        self.gates = {node: threading.Event() for node in sockets}
        for gate in self.gates.values():
            gate.set()

    def nodes(self) -> list[int]:
        return sorted(self.sockets)

    def count(self, node: int) -> int:
        return sum(1 for n, _ in list(self.sent) if n == node)

    def send(self, node: int, frames: list[bytes], round: int) -> str:
        mid = f"m{len(self.sent)}"
        self.sent.append((node, round))
        failed = self.count(node) in self.failing.get(node, ())
        address = "unix:/nonexistent/worker.sock" if failed else self.sockets[node]
        self.futures[mid] = self.pool.submit(self._hand_over, address, frames, self.gates[node])
        return mid

    @staticmethod
    def _hand_over(address: str, frames: list[bytes], gate: threading.Event) -> list[bytes]:
        gate.wait(timeout=180)
        with grpc.insecure_channel(address, options=OPTIONS) as ch:
            return list(ch.stream_stream(METHOD)(iter(frames), timeout=120))

    def replies(self, ids):
        out = []
        for mid in ids:
            f = self.futures[mid]
            if f.done():
                del self.futures[mid]
                try:
                    out.append((mid, f.result(), ""))
                except grpc.RpcError as e:
                    out.append((mid, None, str(e.code())))
        return out


def _worker_args(i: int, root, model_dir: str, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "parablock.cli",
        "flower-worker",
        "--id",
        str(i),
        "--data",
        f"gsm8k:{root / f'd{i}.jsonl'}",
        "--model",
        model_dir,
        "--out",
        str(out),
        "--threads",
        "1",
        "--handover-timeout-s",
        "60",
    ]


def _wait_for(path, procs, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        assert all(p.poll() is None for p in procs), "a worker exited early"
        time.sleep(0.1)


def _serving(wire: SocketWire, cfg, join_timeout_s: float = 60.0):
    def serve(server, stop):
        relay(
            server,
            wire,
            lossy=CODECS.get(cfg.link.compression).lossy,
            join_timeout_s=join_timeout_s,
            stop=stop,
        )
        server.stop()
        wire.pool.shutdown(wait=True, cancel_futures=True)
        return [server.reports.get(c, ClientLog(c)) for c in range(server.clients)]

    serve.name = "flower"
    return serve


@pytest.mark.parametrize("algorithm,compression", [("parablock", "none"), ("fedbcd", "int8")])
def test_relay_and_workers_end_equal_to_the_local_backend(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
    algorithm,
    compression,
):
    fed = {"algorithm": algorithm, "rounds": 4}
    link = {"compression": compression}
    sources = ";".join(f"gsm8k:{site / f'd{i}.jsonl'}" for i in range(2))
    ev = {"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0}
    local = run(
        tiny_config(
            tiny_model_dir,
            str(tmp_path / "local"),
            federation=fed,
            link=link,
            data={"partition": "per_client", "client_sources": sources},
            eval=ev,
        )
    )
    outs = [tmp_path / f"site{i}" for i in range(2)]
    sockets = {7 + 100 * i: f"unix:{outs[i]}/worker.sock" for i in range(2)}
    procs = [
        _start(_worker_args(i, site, tiny_model_dir, outs[i]), tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    wire = SocketWire(sockets)
    cfg = tiny_config(
        tiny_model_dir, str(tmp_path / "srv"), federation=fed, link=link, data={}, eval=ev
    )
    try:
        for o in outs:  # the workers listen once their model is loaded
            _wait_for(o / "worker.sock", procs)
        summary = run(cfg, serve_with=_serving(wire, cfg))
        for i, p in enumerate(procs):
            log = tmp_path / f"worker{i}.log"
            assert _wait(p, log) == 0, log.read_text()
    finally:
        _stop(*procs)
    results = [json.loads((o / "summary.json").read_text()) for o in outs]
    want = local["final_model_fingerprint"]
    assert summary["final_model_fingerprint"] == want
    assert all(r["final_model_fingerprint"] == want for r in results)
    assert summary["backend"] == "flower" and summary["updates_rejected"] == 0
    assert (summary["bytes_up"], summary["bytes_down"]) == (local["bytes_up"], local["bytes_down"])
    # one message per node per round: the join, 4 rounds, the drain's aggregate, the end
    per_node = {n: sum(1 for m, _ in wire.sent if m == n) for n in sockets}
    assert all(v <= 4 + 3 for v in per_node.values()), per_node
    rows = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if r["kind"] == "round"} == set(range(4))


def test_a_bundle_is_parsed_strictly():
    b = Bundle()
    b.add(Item("upload", round=3), b"xyz")
    again = Bundle.from_frames(b.frames())
    assert again.items[0].round == 3 and again.payload(again.items[0]) == b"xyz"
    from parablock.errors import MessageError

    bad = [
        [],  # no manifest
        [b"not json"],
        [Manifest([Item("upload", payload=0)]).to_bytes()],  # points at a missing payload
        [Manifest([Item("report")]).to_bytes(), b"stray"],  # a payload nothing points at
        [
            b'{"items":[{"kind":"shutdown","round":-1,"block":-1,"version":-1,"base":null,'
            b'"payload":-1,"error":""}]}'
        ],
        [Manifest([Item("wait")] * 65).to_bytes()],
    ]
    for frames in bad:
        with pytest.raises(MessageError):
            Bundle.from_frames(frames)


def test_a_node_whose_messages_fail_mid_run_is_dropped_and_min_clients_decides(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    """From its third message on, node 2's messages come back as errors (as a SuperNode that
    vanished comes back from Flower): client 1 is dropped and, with min_clients=1, client 0
    finishes the run alone, equal to the server."""
    outs = [tmp_path / f"site{i}" for i in range(2)]
    procs = [
        _start(_worker_args(i, site, tiny_model_dir, outs[i]), tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    wire = SocketWire({1: f"unix:{outs[0]}/worker.sock", 2: f"unix:{outs[1]}/worker.sock"})
    wire.failing = {2: range(3, 1 << 30)}
    ev = {"source": f"gsm8k:{site / 'd2.jsonl'}", "accuracy_size": 0}
    fed = {"rounds": 4, "min_clients": 1, "round_timeout_s": 5.0}
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "srv"), federation=fed, eval=ev)
    try:
        for o in outs:
            _wait_for(o / "worker.sock", procs)
        summary = run(cfg, serve_with=_serving(wire, cfg))
        assert _wait(procs[0], tmp_path / "worker0.log") == 0
    finally:
        _stop(*procs)
    assert summary["clients_dropped"] and summary["updates_rejected"] == 0
    assert 4 <= summary["updates_accepted"] < 8  # client 1's updates stop coming
    site0 = json.loads((outs[0] / "summary.json").read_text())
    assert site0["final_model_fingerprint"] == summary["final_model_fingerprint"]


def _until(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["killed", "messages fail"])
def test_a_lost_worker_rejoins_through_a_fresh_session_and_ends_equal_to_the_server(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
    how,
):
    """After two rounds node 2 is lost: its worker is killed (SIGKILL) and started again with
    the same command, or three of its messages fail (the worker lives on, its session lost).
    Client 1 is dropped, the relay asks node 2 back, and its worker rejoins from its checkpoint
    through a fresh session, catches up and takes part in the rounds after; every model ends
    equal to the server's. Node 1's messages are held while node 2 is lost, so the run cannot
    end before it is back (a round waits 2 x round_timeout_s without updates)."""
    outs = [tmp_path / f"site{i}" for i in range(2)]
    args = [_worker_args(i, site, tiny_model_dir, outs[i]) for i in range(2)]
    procs = [_start(args[0], tmp_path / "worker0.log"), _start(args[1], tmp_path / "worker1a.log")]
    wire = SocketWire({1: f"unix:{outs[0]}/worker.sock", 2: f"unix:{outs[1]}/worker.sock"})
    fed = {"rounds": 6, "min_clients": 1, "round_timeout_s": 45.0}
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "srv"), federation=fed, eval={"source": ""})
    again = tmp_path / ("worker1b.log" if how == "killed" else "worker1a.log")
    errors: list[BaseException] = []

    def lose_node_2() -> None:
        try:
            rounds = outs[1] / "metrics.jsonl"
            _until(lambda: rounds.exists() and rounds.read_text().count("\n") >= 2, 120, "rounds")
            wire.gates[1].clear()
            if how == "killed":
                os.kill(procs[1].pid, signal.SIGKILL)
                procs[1].wait(10)
                procs.append(_start(args[1], again))
            else:
                n = wire.count(2)
                wire.failing[2] = range(n + 1, n + 4)
            joins = 1 if how == "killed" else 2
            _until(lambda: again.read_text().count("client 1 joined") >= joins, 80, "no rejoin")
        except BaseException as e:
            errors.append(e)
        finally:
            wire.gates[1].set()

    killer = threading.Thread(target=lose_node_2)
    try:
        for o in outs:
            _wait_for(o / "worker.sock", procs)
        killer.start()
        summary = run(cfg, serve_with=_serving(wire, cfg))
        killer.join(30)
        assert not errors, f"{errors[0]}\n{again.read_text()}"
        for p, log in ((procs[0], tmp_path / "worker0.log"), (procs[-1], again)):
            assert _wait(p, log) == 0, log.read_text()
    finally:
        for gate in wire.gates.values():
            gate.set()
        if killer.is_alive():
            killer.join(30)
        _stop(*procs)
    assert "rejoining from its checkpoint" in again.read_text()
    assert summary["clients_dropped"] == [1] and summary["updates_rejected"] == 0
    rows = [json.loads(x) for x in (tmp_path / "srv" / "metrics.jsonl").read_text().splitlines()]
    who = {r["round"]: r["participants"] for r in rows if r["kind"] == "round"}
    assert who[5] == [0, 1], who  # back in the rounds after it was lost
    want = summary["final_model_fingerprint"]
    for o in outs:
        assert json.loads((o / "summary.json").read_text())["final_model_fingerprint"] == want
