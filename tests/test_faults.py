"""Fault injection (``run.faults``): every kind is survived, a rejected update never reaches the
global model (bitwise against a replay in which the server simply never took it), and every client,
the faulty ones included, ends equal to the server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from parablock.backends import local as local_backend
from parablock.backends.local import run_local
from parablock.config import ConfigError
from parablock.model.blocks import block_state
from parablock.run.runner import prepare
from parablock.transport.faults import KINDS, parse, withhold


def _cfg(model_dir, out, faults, rounds=8, **fed):
    federation = {"clients": 3, "rounds": rounds, "min_clients": 1, "round_timeout_s": 3.0}
    federation.update(fed)
    return tiny_config(model_dir, out, federation=federation, run={"faults": faults})


def _run(cfg, monkeypatch, participants=None):
    """A local run; returns the federation and the clients that finished."""
    f = prepare(cfg)
    ckpt = str(Path(cfg.run.out) / "checkpoint")  # a crashed client restarts from it
    f.placements = [replace(s, checkpoint_dir=ckpt) for s in f.placements]
    if participants is not None:
        withhold(f.server, participants)
    finished = []
    real = local_backend.run_placed

    def run_placed(*args, **kwargs):
        finished.append(real(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(local_backend, "run_placed", run_placed)
    run_local(f.placements, f.server, threads=1)
    return f, finished


def _check(tiny_model_dir, tmp_path, monkeypatch, faults, reasons, replayed=True, **fed):
    cfg = _cfg(tiny_model_dir, str(tmp_path / "faulty"), faults, **fed)
    faulty, clients = _run(cfg, monkeypatch)
    server = faulty.server
    assert server.next_round == cfg.federation.rounds  # every round, the drain included, done
    recent = " | ".join(server.stats.rejected.recent)
    for why in reasons:
        assert why in recent, (why, recent)
    # every client, faulty or not, ends equal to the server
    assert sorted(c.id for c in clients) == [0, 1, 2]
    for c in clients:
        for b in server.blocks:
            got, want = block_state(c.model, b), block_state(server.model, b)
            assert all(torch.equal(got[n], want[n]) for n in want), (c.id, b.index)
    if not replayed:
        return server
    # the replay without faults, in which the server took exactly the updates the faulty run
    # aggregated: the same global model, bit for bit
    participants = dict(server.stats.participants)
    replay, _ = _run(
        _cfg(tiny_model_dir, str(tmp_path / "replay"), "", **fed), monkeypatch, participants
    )
    assert replay.server.stats.participants == participants
    for n, p in faulty.model.named_parameters():
        assert torch.equal(p, dict(replay.model.named_parameters())[n]), n
    return server


def test_corrupted_updates_are_rejected_and_never_reach_the_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    faults = "nan@1:0,shape@2:1,block@1:2,stale@2:3,future@1:4,truncate@2:5,forge@1:6,cut@2:7"
    server = _check(
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        faults,
        ["NaN", "do not match", "trained from version", "truncated", "claims to come from"],
    )
    assert len(server.stats.rejected) >= 8
    assert server.stats.dropped == []  # a rejected client forfeits its round, nothing more
    for r, who in server.stats.participants.items():
        bad = {c for (c, t), _ in parse(faults).fixed.items() if t == r}
        assert set(who) == {0, 1, 2} - bad, r


def test_crash_replay_and_token_are_ridden_out(tiny_model_dir, tmp_path, monkeypatch):
    server = _check(
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        "crash@0:1,replay@1:2,token@2:2,crash@1:5",
        [],
        rounds=7,
    )
    assert server.stats.dropped == []
    assert 0 in server.stats.participants[1] and 1 in server.stats.participants[5]  # rejoined


def test_a_stalled_client_is_dropped_rejoins_behind_and_ends_equal(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A stall past the deadline: the round goes on without the client; its late update is
    refused and it rejoins at the open round from its checkpoint (a new trajectory, so no
    replay), and it still ends equal to the server."""
    server = _check(
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        "stall@2:2",
        ["late"],
        replayed=False,
        rounds=7,
        round_timeout_s=1.0,
    )
    assert server.stats.dropped == [2] and 2 not in server.stats.participants[2]


def test_fault_specs_are_checked_and_deterministic():
    plan = parse("nan~0.2,crash~0.1,stale@1:3", seed=5)
    draws = [plan.at(c, r) for c in range(4) for r in range(200)]
    assert draws == [
        parse("nan~0.2,crash~0.1,stale@1:3", seed=5).at(c, r) for c in range(4) for r in range(200)
    ]
    assert 0.15 < draws.count("nan") / len(draws) < 0.25  # nan~0.2
    assert plan.at(1, 3) == "stale"
    assert plan.fire(1, 3) == "stale" and plan.fire(1, 3) is None  # once, across restarts
    assert set(KINDS) >= {"crash", "stall", "cut", "nan", "forge", "token", "replay"}
    for bad in ("boom@0:1", "nan@x:1", "nan~2", "nan~0.6,crash~0.6"):
        with pytest.raises(ConfigError, match="run.faults"):
            parse(bad)
