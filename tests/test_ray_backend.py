"""The Ray backend against the local one (same final global model) and clients killed mid-run
(restarted from their checkpoints, or dropped once out of restarts) or hung (dropped).

One small local Ray instance serves the whole module and is shut down at its end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray  # installed by scripts/install.sh: CI runs these tests, never skips them
import torch

from conftest import tiny_config
from parablock.backends import BACKENDS
from parablock.backends.local import run_local
from parablock.backends.ray import ray_init
from parablock.config import ConfigError
from parablock.run.runner import prepare

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def ray_session():
    ray_init(num_cpus=4, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


# Slow enough that a kill at an early barrier (seen by the driver up to POLL_S later) lands
# before the client has finished: every transfer takes at least 0.3 s.
_SLOW = {"latency_ms": 300.0}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "algorithm,compression,privacy",
    [
        ("parablock", "none", "none"),
        ("fedbcd", "none", "none"),
        ("parablock", "int8", "none"),
        ("fedit_lora", "none", "none"),
        ("parablock", "none", "record"),
    ],
)
def test_ray_and_local_end_with_the_same_global_model(
    ray_session, tiny_model_dir, tmp_path, algorithm, compression, privacy
):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"algorithm": algorithm},
        link={"compression": compression},
        privacy={"mode": privacy, "noise_multiplier": 0.8, "clip_norm": 0.5},
    )
    local = prepare(cfg)
    logs_local = {
        lg.client: lg.rounds for lg in run_local(local.placements, local.server, threads=1)
    }
    remote = prepare(cfg)
    seen, phases = [], []
    logs = BACKENDS.get("ray")(
        remote.placements,
        remote.server,
        threads=1,
        on_barrier=lambda c, t: seen.append((c.id, t)),
        on_phase=lambda *event: phases.append(event),
    )
    want, got = _params(local.model), _params(remote.model)
    # Bit for bit: the same code on the same bytes, with one torch thread per client on both sides.
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert remote.server.versions == local.server.versions
    assert remote.server.next_round == cfg.federation.rounds  # the drain was aggregated too
    rounds = cfg.federation.rounds + 1  # drain included
    assert sorted(seen) == sorted((c, t) for c in (0, 1) for t in range(rounds))
    assert [len(lg.rounds) for lg in logs] == [rounds, rounds]
    local_bytes = [(r.bytes_up, r.bytes_down) for c in sorted(logs_local) for r in logs_local[c]]
    assert [(r.bytes_up, r.bytes_down) for lg in logs for r in lg.rounds] == local_bytes
    assert all({s.phase for s in lg.spans} >= {"compute", "upload", "download"} for lg in logs)
    # Phases inside the actors reach the driver's display: a start and an end for every span
    # (idle is recorded after the fact, never announced).
    for lg in logs:
        spans = sorted((s.round, s.phase) for s in lg.spans if s.phase != "idle")
        mine = [(r, ph, started) for c, r, ph, started in phases if c == lg.client]
        assert sorted((r, ph) for r, ph, started in mine if started) == spans
        assert sorted((r, ph) for r, ph, started in mine if not started) == spans


def test_secure_aggregation_on_ray_equals_the_local_run_without_masks(
    ray_session, tiny_model_dir, tmp_path
):
    def cfg(masks: bool):
        return tiny_config(
            tiny_model_dir,
            str(tmp_path),
            federation={"clients": 3, "aggregator": "mean", "update_bound": False},
            privacy={
                "mode": "client",
                "noise_multiplier": 0.5,
                "noise_at": "client",
                "secure_aggregation": True,
                "secagg_masks": masks,
            },
        )

    local = prepare(cfg(False))
    run_local(local.placements, local.server, threads=1)
    remote = prepare(cfg(True))
    BACKENDS.get("ray")(remote.placements, remote.server, threads=1)
    want, got = _params(local.model), _params(remote.model)
    assert remote.server.next_round == 4 and remote.server.stats.participants[3] == [0, 1, 2]
    for n in want:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("algorithm", ["fedavg_full", "cyclic"])
def test_baselines_on_ray_end_with_the_local_backends_model(
    ray_session, tiny_model_dir, tmp_path, algorithm
):
    cfg = tiny_config(
        tiny_model_dir, str(tmp_path), federation={"algorithm": algorithm, "rounds": 3}
    )
    local = prepare(cfg)
    run_local(local.placements, local.server, threads=1)
    remote = prepare(cfg)
    seen = []
    BACKENDS.get("ray")(
        remote.placements, remote.server, threads=1, on_barrier=lambda c, t: seen.append((c.id, t))
    )
    want, got = _params(local.model), _params(remote.model)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert remote.server.stats.participants == local.server.stats.participants
    if algorithm == "cyclic":  # each client's turns, then everyone's final catch-up
        assert sorted(seen) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 3)]


class _KillAndWatch:
    """``on_barrier``: SIGKILLs client ``victim``'s actor process at its barrier ``at`` (once: a
    process that dies, not one that keeps dying), and asks every client's actor for its model's
    fingerprint at its drain barrier (replayed while the actor is still alive)."""

    def __init__(self, victim: int, at: int, drain: int) -> None:
        self.victim, self.at, self.drain = victim, at, drain
        self.killed: list[int] = []
        self.fingerprints: dict[int, str] = {}

    def __call__(self, client, t: int) -> None:
        from parablock.model.load import model_fingerprint

        if client.id == self.victim and t == self.at and not self.killed:
            pid = ray.get(client.actor.__ray_call__.remote(lambda actor: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        if t == self.drain:
            self.fingerprints[client.id] = ray.get(
                client.actor.__ray_call__.remote(
                    lambda actor: model_fingerprint(actor.client.model)
                )
            )


def test_killed_client_restarts_afresh_rejoins_and_ends_with_the_servers_model(
    ray_session, tiny_model_dir, tmp_path, caplog
):
    """Without a checkpoint the new actor starts from the base model and catches up at its join."""
    from parablock.model.load import model_fingerprint

    cfg = tiny_config(
        tiny_model_dir, str(tmp_path), federation={"clients": 3, "rounds": 5}, link=_SLOW
    )
    fed = prepare(cfg)
    assert all(s.checkpoint_dir is None for s in fed.placements)
    watch = _KillAndWatch(victim=2, at=1, drain=5)
    caplog.set_level(logging.WARNING, logger="parablock")
    logs = BACKENDS.get("ray")(fed.placements, fed.server, threads=1, on_barrier=watch)
    stats = fed.server.stats
    assert watch.killed
    assert any(
        "client 2: its actor died" in r.message
        and "restarts it afresh (no checkpoint)" in r.message
        for r in caplog.records
    )
    assert stats.dropped == [] and fed.server.next_round == 5
    assert [c for c, _ in stats.joins].count(2) == 2  # its first join and its rejoin
    assert all(stats.participants[t] == [0, 1, 2] for t in range(5))  # it missed no round
    # one record per round in the driver's log of each client, the restarted one too
    assert [[r.round for r in lg.rounds] for lg in logs] == [list(range(6))] * 3
    assert all(len(set(lg.spans)) == len(lg.spans) for lg in logs)
    want = model_fingerprint(fed.model)
    assert watch.fingerprints == {0: want, 1: want, 2: want}  # bit for bit


def test_killed_client_restarts_from_its_checkpoint_and_the_run_files_stay_whole(
    ray_session, tiny_model_dir, tmp_path, caplog
):
    """A whole run (checkpoints on): the new actor continues from the client's checkpoint, the
    summary counts every update and no drop, and metrics.jsonl holds every client's every round."""
    from parablock.run.runner import run
    from parablock.tools.report import latest_rows

    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"clients": 3, "rounds": 5},
        link=_SLOW,
        eval={"accuracy_size": 0},  # no generation: seconds per evaluation on a small machine
        run={"backend": "ray"},
    )
    watch = _KillAndWatch(victim=2, at=1, drain=5)
    caplog.set_level(logging.WARNING, logger="parablock")
    summary = run(cfg, on_barrier=watch)
    assert watch.killed
    assert any(
        "client 2: its actor died" in r.message and "restarts it after round " in r.message
        for r in caplog.records
    )
    assert summary["clients_dropped"] == [] and summary["updates_accepted"] == 3 * 5
    assert watch.fingerprints == {c: summary["final_model_fingerprint"] for c in range(3)}
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    latest = latest_rows(rows)
    got = sorted((r["client"], r["round"]) for r in latest if r["kind"] == "client_round")
    assert got == [(c, t) for c in range(3) for t in range(6)]
    assert {r["round"]: r["participants"] for r in latest if r["kind"] == "round"} == {
        t: [0, 1, 2] for t in range(5)
    }


def test_killed_client_with_no_restarts_left_is_dropped_and_the_run_finishes(
    ray_session, tiny_model_dir, tmp_path, caplog, monkeypatch
):
    import parablock.backends.ray_driver as ray_backend

    monkeypatch.setattr(ray_backend, "MAX_RESTARTS", 0)
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"clients": 3, "min_clients": 2, "rounds": 5, "round_timeout_s": 3.0},
        link=_SLOW,
    )
    fed = prepare(cfg)
    before = _params(fed.model)

    def kill_client_2(client, t):
        if client.id == 2 and t == 1:
            ray.kill(client.actor, no_restart=True)

    caplog.set_level(logging.WARNING, logger="parablock")
    logs = BACKENDS.get("ray")(fed.placements, fed.server, threads=1, on_barrier=kill_client_2)
    stats = fed.server.stats
    assert stats.dropped == [2]
    assert fed.server.next_round == 5  # every round and the drain aggregated
    assert stats.participants[4] == [0, 1]
    assert stats.participants[0] == [0, 1, 2]  # uploaded before client 2's round-1 barrier
    assert any("client 2 dropped: its actor died" in r.message for r in caplog.records)
    assert len(logs[0].rounds) == len(logs[1].rounds) == 6
    assert 2 <= len(logs[2].rounds) < 6
    assert any(not torch.equal(p, before[n]) for n, p in _params(fed.model).items())


def test_frozen_client_stops_answering_and_is_dropped(
    ray_session, tiny_model_dir, tmp_path, caplog, monkeypatch
):
    import parablock.backends.ray_driver as ray_backend

    monkeypatch.setattr(ray_backend, "MIN_ANSWER_S", 1.0)  # answer within the round timeout, 2 s
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"clients": 2, "min_clients": 1, "rounds": 4, "round_timeout_s": 2.0},
        link=_SLOW,
    )
    fed = prepare(cfg)
    frozen: list[int] = []

    def freeze_client_1(client, t):  # SIGSTOP: alive, but answers nothing
        if client.id == 1 and t == 1:
            pid = ray.get(client.actor.__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    caplog.set_level(logging.WARNING, logger="parablock")
    try:
        BACKENDS.get("ray")(fed.placements, fed.server, threads=1, on_barrier=freeze_client_1)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert frozen and fed.server.stats.dropped == [1]
    assert fed.server.next_round == 4 and fed.server.stats.participants[3] == [0]
    assert any("client 1 dropped: it did not answer for 2s" in r.message for r in caplog.records)


def test_a_client_that_keeps_dying_is_dropped_and_too_few_left_fails_clearly(
    ray_session, tiny_model_dir, tmp_path, monkeypatch
):
    import parablock.backends.ray_driver as ray_backend
    from parablock.core.server import RoundFailedError

    monkeypatch.setattr(ray_backend, "MAX_RESTARTS", 1)
    cfg = tiny_config(tiny_model_dir, str(tmp_path), link=_SLOW)  # min_clients: all
    fed = prepare(cfg)
    killed: list = []

    def kill_client_1(client, t):  # each of its actors, at the first barrier it passes
        if client.id == 1 and all(a is not client.actor for a in killed):
            killed.append(client.actor)
            ray.kill(client.actor, no_restart=True)

    with pytest.raises(RoundFailedError, match=r"only 1 of 2 clients remain .*after 1 restart"):
        BACKENDS.get("ray")(fed.placements, fed.server, threads=1, on_barrier=kill_client_1)
    assert len(killed) == 2  # the first actor and the one that replaced it


def test_more_cpus_than_the_cluster_has_is_a_clear_error(ray_session, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path), run={"client_cpus": 3.0})
    fed = prepare(cfg)
    with pytest.raises(ConfigError, match="run.client_cpus=3 for 2 clients needs 6 CPUs"):
        BACKENDS.get("ray")(fed.placements, fed.server, threads=1)


def test_client_device_is_the_cpu_unless_the_client_has_a_gpu(tiny_model_dir, tmp_path):
    specs = prepare(tiny_config(tiny_model_dir, str(tmp_path), run={"client_gpus": 0.5})).placements
    assert specs[0].gpus == 0.5
    cpu_spec = prepare(tiny_config(tiny_model_dir, str(tmp_path))).placements[0]
    assert cpu_spec.train_device() == torch.device("cpu")
    if torch.cuda.is_available():
        assert specs[0].train_device().type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            specs[0].train_device()


def test_ray_is_imported_only_when_the_ray_backend_runs():
    code = (
        "import sys, parablock.cli, parablock.run.runner, parablock.backends.local;"
        "from parablock.config import help_text; help_text();"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": SRC})


def test_cli_run_on_ray_saves_the_same_model_as_a_local_run(ray_session, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from parablock.cli import main

    sets = [
        f"model.name_or_path={tiny_model_dir}",
        "model.blocks=all",
        "data.train_size=16",
        "federation.rounds=3",
        "federation.local_steps=1",
        "federation.batch_size=2",
        "eval.size=4",
        "run.threads=1",
    ]
    saved = {}
    for backend in ("local", "ray"):
        out = tmp_path / backend
        extra = [f"run.out={out}", f"run.backend={backend}"]
        assert main(["run"] + [a for s in sets + extra for a in ("--set", s)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["clients_dropped"] == [] and summary["updates_accepted"] == 2 * 3
        saved[backend] = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for n, t in saved["local"].items():
        assert torch.equal(saved["ray"][n], t), n


def test_ray_run_stops_resumes_and_matches_an_uninterrupted_local_run(
    ray_session, tiny_model_dir, tmp_path
):
    """Checkpoints and per-round evaluation are fed from the server actor through the driver."""
    import threading

    from transformers import AutoModelForCausalLM

    from parablock.run.runner import RunInterrupted, run

    ev = {"every": 1, "accuracy_size": 0}
    full = run(
        tiny_config(tiny_model_dir, str(tmp_path / "local"), federation={"rounds": 6}, eval=ev)
    )
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "ray"),
        federation={"rounds": 6},
        eval=ev,
        link=_SLOW,
        run={"backend": "ray"},
    )
    stop = threading.Event()
    with pytest.raises(RunInterrupted):
        run(cfg, stop=stop, on_barrier=lambda c, t: stop.set() if t == 1 else None)
    resumed = run(cfg, resume=True)
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    a = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "local" / "model").named_parameters())
    b = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ray" / "model").named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    rows = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["round"] for r in rows if r["kind"] == "eval"}
    assert {-1, 4, 5} <= evals  # rounds after the resume point were evaluated by replay


def test_long_polls_answer_on_news_and_the_last_relay_ends_a_waiting_one():
    """The driver's asks wait for news instead of polling; these are the plain actor classes."""
    import threading
    import time
    from types import SimpleNamespace

    from parablock.backends.ray import ClientActor, ServerActor

    server = SimpleNamespace(aggregate_listeners=[])
    actor = ServerActor(server)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(actor.take_events(wait_s=30)))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    server.aggregate_listeners[0](3, 7)  # the Server announcing an aggregation
    waiter.join(10)
    assert got == [[(3, 7)]] and time.monotonic() - start < 10  # woke on news, not at 30 s
    assert actor.take_events() == []  # taken once, never twice

    waiter = threading.Thread(target=lambda: got.append(actor.take_events(wait_s=30)))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.2)  # waiting, with nothing to take
    assert actor.take_events(0, last=True) == []
    waiter.join(10)
    assert got[1] == [] and time.monotonic() - start < 10  # the run is over: it returned at once
    server.aggregate_listeners[0](4, 8)
    assert actor.take_events(wait_s=30) == [(4, 8)]  # later news is still handed over

    client = ClientActor(SimpleNamespace(client_id=5), server=None, threads=1)
    asked = threading.Thread(target=lambda: got.append(client.progress((0, 0, 0, 0), wait_s=30)))
    asked.start()
    time.sleep(0.2)
    client._on_phase(5, 0, "compute", True)
    asked.join(10)
    assert not asked.is_alive()
    assert got[-1] == ((0, 0, 0, 0), [(5, 0, "compute", True)], [], [])
    assert client.progress((0, 1, 0, 0)) == ((0, 1, 0, 0), [], [], [])  # no news, no wait: empty

    # A client that restarted in the actor brings a new log (its checkpoint's records first): a
    # poll that counted in the old one gets the new one whole, and the reply says so.
    from parablock.core.metrics import ClientLog, RoundRecord, Span

    restored = ClientLog(5, [Span(5, 0, "compute", 1.0, 2.0)], [RoundRecord(5, 0, 0)])
    client._log = (1, restored)
    assert client.progress((0, 1, 3, 2)) == ((1, 1, 0, 0), [], restored.spans, restored.rounds)
    assert client.progress((1, 1, 1, 1)) == ((1, 1, 1, 1), [], [], [])


def test_the_drivers_log_of_a_client_goes_on_across_its_actors():
    """A new actor's log starts over, its checkpoint's records first: the driver skips what it
    holds, adds what it never saw, and a round run again replaces its record, so the log (and
    the metrics written from it) keeps one record per round; ``on_barrier`` hears each new or
    replaced record once. The fleet's merge alone, without Ray."""
    from parablock.backends.ray_driver import ClientView, _Fleet
    from parablock.core.metrics import ClientLog, RoundRecord, Span

    heard: list[tuple[int, int]] = []
    fleet = object.__new__(_Fleet)  # no actors: only what _merge uses
    fleet.on_phase, fleet.last_progress = None, {}
    fleet.on_barrier = lambda view, t: heard.append((view.id, t))
    fleet.views = {c: ClientView(c, ClientLog(c), actor=None) for c in (1, 2)}

    def rec(c: int, t: int, loss: float) -> RoundRecord:
        return RoundRecord(c, t, t % 2, train_loss=loss)

    def span(c: int, t: int, start: float) -> Span:
        return Span(c, t, "compute", start, start + 0.5)

    def restarted(c: int) -> None:  # what _restart does to the cursors
        fleet.views[c].phases, fleet.views[c].generation = 0, -1

    # Client 2's first actor passed barriers 0..2; it died before its checkpoint of round 2 was
    # written, so its new actor restored round 1 and ran round 2 again, then round 3.
    old = [span(2, t, t) for t in range(3)]
    fleet._merge(2, ((0, 0, 0, 0), [], old, [rec(2, t, t) for t in range(3)]))
    restarted(2)
    new = old[:2] + [span(2, 2, 9.0), span(2, 3, 10.0)]
    fleet._merge(2, ((0, 0, 0, 0), [], new, [rec(2, 0, 0), rec(2, 1, 1), rec(2, 2, 2.5)]))
    fleet._merge(2, ((0, 0, 4, 3), [], [], [rec(2, 3, 3)]))  # the next poll, same log
    lg = fleet.views[2].log
    assert [(r.round, r.train_loss) for r in lg.rounds] == [(0, 0), (1, 1), (2, 2.5), (3, 3)]
    assert lg.spans == old + new[2:]  # both runs of round 2 took time: both spans stay
    assert [t for c, t in heard if c == 2] == [0, 1, 2, 2, 3]

    # Client 1's driver had seen barrier 0 only; its checkpoint (round 1) brings round 1 back.
    fleet._merge(1, ((0, 0, 0, 0), [], [], [rec(1, 0, 0)]))
    restarted(1)
    fleet._merge(1, ((0, 0, 0, 0), [], [], [rec(1, 0, 0), rec(1, 1, 1)]))
    assert [r.round for r in fleet.views[1].log.rounds] == [0, 1]
    assert [t for c, t in heard if c == 1] == [0, 1]


def test_faults_on_ray_end_with_the_local_backends_model(ray_session, tiny_model_dir, tmp_path):
    """The same injected faults (a NaN delta, forged metadata, a crash restarted from the
    checkpoint inside the actor) on both backends: the same updates are refused, the same model."""
    from dataclasses import replace

    models = []
    for name in ("local", "ray"):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / name),
            federation={"min_clients": 1, "round_timeout_s": 30.0},
            run={"faults": "nan@1:0,crash@0:1,forge@1:2"},
        )
        f = prepare(cfg)
        ckpt = str(tmp_path / name / "checkpoint")
        specs = [replace(s, checkpoint_dir=ckpt) for s in f.placements]
        BACKENDS.get(name)(specs, f.server, threads=1)
        assert f.server.next_round == cfg.federation.rounds
        assert f.server.stats.participants[0] == [0] and f.server.stats.participants[2] == [0]
        models.append(_params(f.model))
    for n in models[0]:
        assert torch.equal(models[0][n], models[1][n]), n
