"""ParaBlock's extra overlap: extra local steps while the link is busy (federation.local_steps_max)
and full duplex (federation.duplex), against the half-duplex, fixed-step reference."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from conftest import build_client, tiny_config
from parablock.backends.local import run_local
from parablock.config import ConfigError
from parablock.core.metrics import overlap_seconds
from parablock.core.overlap import ElasticBatches
from parablock.data.examples import round_batches, round_indices
from parablock.errors import MessageError
from parablock.run.runner import prepare, run
from parablock.wire.protocol import Overlap, RunSettings

# Links slow enough that communication (about 0.33 s each way for a tiny block) is far longer
# than a tiny training step (milliseconds): the computation thread would otherwise sit idle.
SLOW = {"up_mbps": 4.0, "down_mbps": 4.0, "latency_ms": 5.0}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the batch stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,steps,batch", [(10, 2, 3), (5, 3, 4), (100, 1, 1), (7, 4, 7)])
def test_round_batches_begin_with_round_indices_and_continue_one_seeded_stream(n, steps, batch):
    stream = list(itertools.islice(round_batches(n, 3, steps, batch, 5), steps + 6))
    assert stream[:steps] == round_indices(n, 3, steps, batch, 5)
    # a pure function of (seed, round): the same again, and another round differs
    assert stream == list(itertools.islice(round_batches(n, 3, steps, batch, 5), steps + 6))
    assert stream != list(itertools.islice(round_batches(n, 4, steps, batch, 5), steps + 6))
    for b in stream[steps:]:
        assert len(b) == batch and all(0 <= i < n for i in b)
        assert len(set(b)) == batch or batch > n  # without replacement within a batch


def test_elastic_batches_take_at_least_least_and_at_most_most():
    def taken(busy) -> int:
        batches = ElasticBatches(iter(range(100)), 2, 5, busy)
        got = list(batches)
        assert got == list(range(len(got))) and batches.taken == len(got)
        return len(got)

    assert taken(lambda: False) == 2
    assert taken(lambda: True) == 5
    answers = iter([True, False])  # busy for one more step, then free
    assert taken(lambda: next(answers)) == 3


def test_client_extra_steps_extend_the_usual_ones(tiny_model_dir, tmp_path):
    """Not busy: the very same update as without local_steps_max; busy: local_steps_max steps,
    and the update carries their examples."""
    cfg = tiny_config(tiny_model_dir, str(tmp_path))
    fed = prepare(cfg)
    spec = fed.placements[0]
    k, bs = fed.server.settings.local_steps, fed.server.settings.batch_size

    def update(overlap: Overlap, busy):
        client = build_client(
            spec, fed.server, local_steps_max=overlap.local_steps_max, duplex=overlap.duplex
        )
        client.plan = list(fed.server.plan)
        record = client.new_record(0)
        try:
            return client.compute(0, record, busy), record
        finally:
            client.close()

    plain, r0 = update(Overlap(), None)
    idle, r1 = update(Overlap(local_steps_max=6), lambda: False)
    busy, r2 = update(Overlap(local_steps_max=6), lambda: True)
    assert r0.steps == r1.steps == k and r2.steps == 6
    assert plain.num_examples == idle.num_examples == k * bs and busy.num_examples == 6 * bs
    for n in plain.tensors:
        assert torch.equal(plain.tensors[n], idle.tensors[n]), n
    assert any(not torch.equal(plain.tensors[n], busy.tensors[n]) for n in plain.tensors)


# -- local_steps_max end to end ----------------------------------------------------------------


# Half duplex: the steps go on until round t-1's aggregate is down. Full duplex: until round t's
# delta can start up (round t-1's is up and aggregated), so a slow uplink is what leaves room.
@pytest.mark.parametrize(
    "duplex,link",
    [
        (False, {"up_mbps": 2.0, "down_mbps": 2.0, "latency_ms": 5.0}),
        (True, {"up_mbps": 1.0, "down_mbps": 100.0, "latency_ms": 5.0}),
    ],
)
def test_a_busy_link_gets_extra_steps_within_the_bound(tiny_model_dir, tmp_path, duplex, link):
    most = 4
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"local_steps": 1, "local_steps_max": most, "rounds": 4, "duplex": duplex},
        link=link,
        eval={"accuracy_size": 0},
    )
    summary = run(cfg)
    fed_records = _client_rounds(tmp_path)
    bs = cfg.federation.batch_size
    for r in fed_records:
        assert 1 <= r["steps"] <= most, r
        assert r["examples"] == r["steps"] * bs, r
        if r["round"] == 0:  # nothing in flight yet: exactly local_steps
            assert r["steps"] == 1
    later = [r["steps"] for r in fed_records if r["round"] > 0]
    assert later and all(s > 1 for s in later), later
    # every update (examples up to local_steps_max x batch_size) was accepted
    assert summary["updates_accepted"] == cfg.federation.clients * cfg.federation.rounds
    assert summary["updates_rejected"] == 0
    assert summary["mean_steps"] > 1 and summary["local_steps_max"] == most


def _client_rounds(out) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "client_round" and not r["drain"]]


def test_local_steps_max_zero_and_fedbcd_are_unchanged(tiny_model_dir, tmp_path):
    """local_steps_max=0 trains exactly local_steps steps; FedBCD ignores local_steps_max (it
    has no link busy beside its computation): both bit for bit the same model."""
    finals = {}
    for name, fed in {
        "zero": {"algorithm": "fedbcd"},
        "fedbcd_max": {"algorithm": "fedbcd", "local_steps_max": 8},
    }.items():
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / name),
            federation=fed,
            link=SLOW,
            eval={"accuracy_size": 0},
        )
        run(cfg)
        finals[name] = _params(_load(tmp_path / name))
        assert {r["steps"] for r in _client_rounds(tmp_path / name)} == {2}
    for n in finals["zero"]:
        assert torch.equal(finals["zero"][n], finals["fedbcd_max"][n]), n


def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "model")


def test_the_server_bounds_examples_by_local_steps_max():
    from test_server import _delta, _send, _server, _settings

    settings = replace(_settings(steps=2, batch=4), local_steps_max=5)
    server, blocks = _server(settings=settings, min_clients=1)
    ok, reason = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), n=21)
    assert not ok and "(local_steps_max x batch_size = 20)" in reason
    assert _send(server, 1, 0, 1, _delta(blocks, 1, 1e-3), n=20)[0]


def test_config_and_settings_refuse_local_steps_max_below_local_steps():
    with pytest.raises(ConfigError, match=r"local_steps_max=1 is below federation.local_steps=2"):
        tiny_config("m", "o", federation={"local_steps": 2, "local_steps_max": 1})
    with pytest.raises(ConfigError, match="needs federation.lr_schedule=constant"):
        tiny_config("m", "o", federation={"local_steps_max": 4, "lr_schedule": "cosine"})
    tiny_config("m", "o", federation={"local_steps": 2, "local_steps_max": 2})  # = is fine
    from test_server import _settings

    text = (
        _settings(steps=2, batch=4)
        .to_bytes()
        .replace(b'"local_steps_max":0', b'"local_steps_max":1')
    )
    with pytest.raises(MessageError, match="local_steps_max"):
        RunSettings.from_bytes(text)


# -- full duplex -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_runs(tiny_model_dir, tmp_path_factory):
    """The same federation over slow links, half and full duplex."""
    out = {}
    for duplex in (False, True):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path_factory.mktemp(f"duplex-{duplex}")),
            federation={"local_steps": 1, "rounds": 5, "duplex": duplex},
            link=SLOW,
        )
        fed = prepare(cfg)
        logs = run_local(fed.placements, fed.server, threads=1)
        out[duplex] = (fed, logs)
    return out


def test_duplex_ends_with_the_half_duplex_model(slow_runs):
    (half, _), (full, _) = slow_runs[False], slow_runs[True]
    assert half.server.stats.participants == full.server.stats.participants
    assert full.server.stats.rejected.count == 0
    a, b = _params(half.model), _params(full.model)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_duplex_uploads_round_t_while_round_t_minus_1_downloads(slow_runs):
    for duplex, (_, logs) in slow_runs.items():
        for lg in logs:
            up = {s.round: s for s in lg.spans if s.phase == "upload"}  # round t+1: delta t
            down = {s.round: s for s in lg.spans if s.phase == "download"}  # round t: agg t-1
            both = [overlap_seconds([up[t + 1]], [down[t]]) for t in down if t + 1 in up and t > 0]
            if duplex:
                assert max(both) > 0.1, both  # a good part of a 0.33 s transfer
            else:
                ups = [s for s in lg.spans if s.phase == "upload"]
                downs = [s for s in lg.spans if s.phase == "download"]
                assert overlap_seconds(ups, downs) == 0.0


def test_duplex_rounds_are_shorter_on_slow_links(slow_runs):
    from parablock.core.metrics import round_times

    means = {}
    for duplex, (_, logs) in slow_runs.items():
        rt = round_times([r for lg in logs for r in lg.rounds])
        means[duplex] = sum(v for t, v in rt.items() if t >= 2) / sum(1 for t in rt if t >= 2)
    # half duplex: T_up + T_down (~0.67 s); full: about max(T_up, T_down) + T_comp / 2
    assert means[True] < 0.85 * means[False], means


@pytest.mark.parametrize("overlap", [{"duplex": False}, {"duplex": True, "local_steps_max": 3}])
def test_invariant_against_the_global_model_of_each_round(tiny_model_dir, tmp_path, overlap):
    """After barrier t a client equals x^t (the global model after round t-1) on every block but
    b_t, where it holds x^t + its own delta; after the drain it equals the final model. x^t is
    rebuilt from the aggregates, because in full duplex the live server may be a round ahead."""
    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"rounds": 6, **overlap})
    fed = prepare(cfg)
    initial = _params(fed.model)
    history: dict[int, dict[str, torch.Tensor]] = {}
    fed.server.aggregate_listeners.append(
        lambda r, b, value, secs, who, *_: history.__setitem__(
            r, {n: t.clone() for n, t in value.items()}
        )
    )
    problems, checked = [], []

    def check(client, t):  # never raises: a failed client would stall the other one
        glob = dict(initial)
        for r in sorted(history):
            if r < t:
                glob.update(history[r])
        mine = _params(client.model)
        own = set() if t == len(client.plan) else set(client.blocks[client.plan[t]].param_names)
        for n in glob:
            want = glob[n] + client.pending.tensors[n] if n in own else glob[n]
            if not torch.equal(mine[n], want):
                problems.append((client.id, t, n))
        checked.append((client.id, t))

    run_local(fed.placements, fed.server, threads=1, on_barrier=check)
    assert not problems, problems[:5]
    assert len(checked) == 2 * 7  # every barrier of both clients, drain included
    assert set(history) == set(range(6))


def test_resume_in_full_duplex_ends_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from test_checkpoint import _interrupt, _metrics, _model

    fed, ev = {"rounds": 6, "duplex": True}, {"accuracy_size": 0}
    run(tiny_config(tiny_model_dir, str(tmp_path / "full"), federation=fed, eval=ev))
    cfg = tiny_config(tiny_model_dir, str(tmp_path / "cut"), federation=fed, eval=ev)
    _interrupt(cfg, after_round=2)
    run(cfg, resume=True)
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


def test_run_settings_carry_the_overlap_to_networked_clients():
    from test_server import _settings

    s = replace(_settings(steps=2, batch=4), local_steps_max=6, duplex=True)
    back = RunSettings.from_bytes(s.to_bytes())
    assert back == s and back.overlap() == Overlap(6, True)
    assert Overlap(6, True).most_steps(2) == 6 and Overlap().most_steps(2) == 2
