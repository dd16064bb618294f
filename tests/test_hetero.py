"""Clients that differ: per-client ``link.*`` and ``federation.compute_slowdown`` (parsing,
bounds, counts, TOML and --resume round trips, the CLI), each local client really on its own link,
the slow-down inside the compute span, and the estimate's slowest client."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

import parablock.core.client as client_module
from conftest import build_client, tiny_config
from parablock.cli import main
from parablock.config import ConfigError, from_dict, load
from parablock.core.metrics import RoundRecord
from parablock.run.runner import RunInterrupted, prepare, run
from parablock.run.site import SiteOptions, _links
from parablock.tools.estimate import EstimateSettings, estimate
from parablock.transport.link import LinkSpec

LAYER_PARAMS = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64  # one tiny-Llama layer


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- config ------------------------------------------------------------------------------------


def test_one_value_is_every_clients_and_a_list_is_one_per_client():
    cfg = load(None, ["federation.clients=3", "link.down_mbps=inf"])
    assert [cfg.link.client(i) for i in range(3)] == [(20.0, math.inf, 20.0)] * 3
    assert cfg.link.uniform() and cfg.federation.compute_slowdown == (1.0,)
    cfg = load(
        None,
        [
            "federation.clients=3",
            "link.up_mbps=20,20,5",
            "link.latency_ms= 0, 10 ,250",
            "link.down_mbps=inf,50,1e3",
            "federation.compute_slowdown=1,1,2.5",
        ],
    )
    assert cfg.link.up_mbps == (20.0, 20.0, 5.0) and not cfg.link.uniform()
    assert cfg.link.client(0) == (20.0, math.inf, 0.0)
    assert cfg.link.client(2) == (5.0, 1000.0, 250.0)
    assert cfg.federation.compute_slowdown == (1.0, 1.0, 2.5)


@pytest.mark.parametrize("key", ["link.up_mbps", "link.down_mbps", "link.latency_ms"])
def test_a_list_needs_exactly_one_entry_per_client(key):
    with pytest.raises(ConfigError) as e:
        load(None, ["federation.clients=3", f"{key}=20,5"])
    msg = str(e.value)
    assert msg == (
        f"{key}='20,5' has 2 values but federation.clients=3; give one value for every "
        "client or exactly 3, one per client"
    )
    with pytest.raises(ConfigError, match="has 4 values but federation.clients=3"):
        load(None, ["federation.clients=3", "federation.compute_slowdown=1,1,1,2"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "link.up_mbps=20,0,5",
            "link.up_mbps: client 1's value 0.0 is out of range; it must be > 0",
        ),
        (
            "link.down_mbps=20,5,-1",
            "link.down_mbps: client 2's value -1.0 is out of range; it must be > 0",
        ),
        (
            "link.latency_ms=0,60001,0",
            "link.latency_ms: client 1's value 60001.0 is out of range; it must be <= 60000",
        ),
        ("link.latency_ms=0,0,inf", "link.latency_ms: client 2's value must be a finite number"),
        ("link.up_mbps=1,nan,1", "link.up_mbps: client 1's value must be a number, got nan"),
        ("link.up_mbps=1,,2", "link.up_mbps expects a number or a comma list of numbers"),
        ("link.down_mbps=1,fast,2", "link.down_mbps expects a number or a comma list"),
        (
            "federation.compute_slowdown=1,0.5,1",
            "federation.compute_slowdown: client 1's value 0.5 is out of range; it must be >= 1",
        ),
        ("federation.compute_slowdown=1,inf,1", "must be a finite number"),
        ("link.up_mbps=0", "link.up_mbps=0.0 is out of range; it must be > 0"),  # as before
    ],
)
def test_each_entry_is_checked_like_a_single_value(override, message, capsys):
    with pytest.raises(ConfigError) as e:
        load(None, ["federation.clients=3", override])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["run", "--set", "federation.clients=3", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_infinite_bandwidth_entries_are_allowed():
    cfg = load(None, ["link.up_mbps=inf,5", "link.down_mbps=inf,inf"])
    assert cfg.link.client(0)[:2] == (math.inf, math.inf) and cfg.link.client(1)[0] == 5.0


def test_per_client_settings_round_trip_through_toml(tmp_path):
    cfg = load(
        None,
        [
            "federation.clients=3",
            "link.up_mbps=20,inf,0.1",
            "link.latency_ms=1.5,0,3",
            "federation.compute_slowdown=1,4,1.25",
        ],
    )
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load(p) == cfg
    text = p.read_text()
    assert 'up_mbps = "20.0,inf,0.1"' in text and "down_mbps = 50.0" in text  # one: a number
    # what a user may write: a string list, a TOML array, a plain number (old config.toml files)
    p.write_text(
        "[federation]\nclients = 3\ncompute_slowdown = [1, 2, 3]\n"
        '[link]\nup_mbps = "20,20,5"\ndown_mbps = [50, 50.5, inf]\nlatency_ms = 20\n'
    )
    cfg = load(p)
    assert cfg.link.up_mbps == (20.0, 20.0, 5.0) and cfg.link.down_mbps == (50.0, 50.5, math.inf)
    assert cfg.link.latency_ms == (20.0,) and cfg.federation.compute_slowdown == (1.0, 2.0, 3.0)
    assert load(p) == from_dict(cfg.to_dict())
    p.write_text("[link]\nup_mbps = [true, 2]\n")
    with pytest.raises(ConfigError, match="link.up_mbps expects a number or a comma list"):
        load(p)


# -- every backend hands each client its own -----------------------------------------------------


def test_each_local_client_gets_its_own_link_and_slowdown(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"clients": 3, "compute_slowdown": "1,1,3"},
        link={"up_mbps": "200,200,5", "down_mbps": "inf,100,100", "latency_ms": "5,0,40"},
    )
    f = prepare(cfg)
    chunk = cfg.link.chunk_kb * 1024
    assert [(s.uplink, s.downlink, s.slowdown) for s in f.placements] == [
        (LinkSpec(200.0, 5.0, chunk), LinkSpec(math.inf, 5.0, chunk), 1.0),
        (LinkSpec(200.0, 0.0, chunk), LinkSpec(100.0, 0.0, chunk), 1.0),
        (LinkSpec(5.0, 40.0, chunk), LinkSpec(100.0, 40.0, chunk), 3.0),
    ]
    # the client the backends build (local threads and Ray actors alike) paces with its own
    built = build_client(f.placements[2], f.server)
    assert built.connection.uplink.spec == LinkSpec(5.0, 40.0, chunk)
    assert built.connection.downlink.spec == LinkSpec(100.0, 40.0, chunk)
    assert built.slowdown == 3.0
    # a Ray client actor (its class, here without a cluster) builds the same client from its spec
    import parablock.backends.ray_actors as ray_actors

    monkeypatch.setattr(ray_actors, "RemoteServer", lambda handle: handle)  # no cluster here
    actor = ray_actors.ClientActor(f.placements[1], server=f.server, threads=1)
    threads = torch.get_num_threads()
    try:
        actor.setup()
    finally:
        torch.set_num_threads(threads)  # setup sets this process's torch threads
    assert actor.client.connection.uplink.spec == LinkSpec(200.0, 0.0, chunk)
    assert actor.client.connection.downlink.spec == LinkSpec(100.0, 0.0, chunk)
    assert actor.client.slowdown == 1.0 and actor.client.id == 1


def test_a_slow_client_is_slow_on_its_own_link_and_compute_and_the_run_resumes(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model_dir,
        str(out),
        federation={"rounds": 5, "algorithm": "fedbcd", "compute_slowdown": "1,4"},
        link={"up_mbps": "inf", "down_mbps": "inf", "latency_ms": "0,250"},
    )
    stop = threading.Event()

    def hook(client, t: int) -> None:
        if client.id == 0 and t == 2:
            stop.set()

    with pytest.raises(RunInterrupted, match="resume with"):
        run(cfg, on_barrier=hook, stop=stop)
    spans = _rows(out / "timeline.jsonl")

    def secs(client: int, phase: str) -> list[float]:
        return [
            s["end"] - s["start"] for s in spans if s["client"] == client and s["phase"] == phase
        ]

    # client 1 waits 250 ms before the first byte of every transfer; client 0 does not
    assert min(secs(1, "upload")) >= 0.25 and min(secs(1, "download")) >= 0.25
    assert statistics.median(secs(0, "upload")) < 0.25
    assert statistics.median(secs(0, "download")) < 0.25
    assert statistics.mean(secs(1, "compute")) > 2 * statistics.mean(secs(0, "compute"))
    # the run's config.toml holds the lists and --resume takes it back (and may change links)
    assert 'latency_ms = "0.0,250.0"' in (out / "config.toml").read_text()
    assert main(["run", "--resume", str(out), "--set", "link.latency_ms=0,100"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 5
    assert 'latency_ms = "0.0,100.0"' in (out / "config.toml").read_text()


def test_compute_slowdown_stretches_the_compute_span(tiny_model_dir, tmp_path, monkeypatch):
    train_s: list[float] = []
    real = client_module.train_block

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            train_s.append(time.perf_counter() - started)

    monkeypatch.setattr(client_module, "train_block", timed)
    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"compute_slowdown": "1,3"})
    f = prepare(cfg)
    for spec, factor in zip(f.placements, (1.0, 3.0), strict=True):
        c = build_client(spec, f.server)
        c.plan = list(f.server.plan)
        c.compute(0, RoundRecord(spec.client_id, 0, c.plan[0]))  # a warm-up, then measured
        record = RoundRecord(spec.client_id, 1, c.plan[1])
        c.compute(1, record)
        span = c.log.spans[-1]
        assert span.phase == "compute" and span.end - span.start == pytest.approx(record.compute_s)
        if factor == 1.0:  # no sleep: the span is the training (and setting the block)
            assert record.compute_s < 1.5 * train_s[-1] + 0.05
        else:  # the sleep is inside the span: at least f x the training time
            assert record.compute_s >= factor * train_s[-1]


# -- networked clients: their own options, checked like the config ------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"up_mbps": 0.0}, "--emulate-up-mbps must be > 0 Mbit/s or inf, got 0"),
        ({"down_mbps": math.nan}, "--emulate-down-mbps must be > 0 Mbit/s or inf, got nan"),
        ({"latency_ms": 70000.0}, "--emulate-latency-ms must be in 0..60000, got 70000"),
        ({"latency_ms": -1.0}, "--emulate-latency-ms must be in 0..60000, got -1"),
    ],
)
def test_a_networked_clients_emulation_is_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        _links(SiteOptions("localhost:1", 0, "t", "d", **options))
    up, down = _links(SiteOptions("localhost:1", 0, "t", "d", up_mbps=5.0, latency_ms=30.0))
    assert up == LinkSpec(5.0, 30.0) and down == LinkSpec(math.inf, 30.0)


def test_client_compute_slowdown_option_is_checked_before_connecting(tmp_path, capsys):
    token = tmp_path / "t.token"
    token.write_text("secret\n")
    base = ["client", "--server", "127.0.0.1:1", "--id", "0", "--token-file", str(token)]
    base += ["--data", "reasoning_gym:basic_arithmetic", "--insecure", "--out", str(tmp_path)]
    assert main([*base, "--compute-slowdown", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--compute-slowdown must be a finite factor >= 1, got 0.5" in err
    assert err.count("\n") == 1


# -- the estimate: the round waits for the slowest client ----------------------------------------


def test_estimate_takes_the_slowest_clients_links(tiny_model_dir):
    fed = {"clients": 3}
    equal = tiny_config(tiny_model_dir, "", federation=fed, link={"up_mbps": 20.0})
    slow = tiny_config(tiny_model_dir, "", federation=fed, link={"up_mbps": "20,20,5"})
    settings = EstimateSettings(compute_s=0.5)
    a, b = estimate(equal, settings), estimate(slow, settings)
    assert b["mean_round_s"]["fedbcd"] > a["mean_round_s"]["fedbcd"]  # every round waits for it
    assert b["mean_round_s"]["parablock"] >= a["mean_round_s"]["parablock"]  # or hides it
    assert b["up_mbps"] == 5.0
