"""ParaBlock and FedBCD against their specification: invariant, drain, correction, equivalences."""

from __future__ import annotations

import torch

from conftest import tiny_config
from parablock.backends.local import run_local
from parablock.core.metrics import overlap_seconds
from parablock.model.blocks import block_state, set_block
from parablock.model.load import load_model
from parablock.model.train import TrainSettings, train_block
from parablock.run.runner import prepare


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _federate(cfg, on_barrier=None):
    fed = prepare(cfg)
    clients = []

    def hook(client, t):
        if client not in clients:
            clients.append(client)
        if on_barrier:
            on_barrier(fed.server, client, t)

    logs = run_local(fed.placements, fed.server, threads=1, on_barrier=hook)
    return fed, sorted(clients, key=lambda c: c.id), logs


def test_parablock_invariant_after_every_barrier_and_exact_after_drain(tiny_model_dir, tmp_path):
    checked = []

    def check(server, client, t):
        glob = _params(server.model)
        mine = _params(client.model)
        if t == len(server.plan):  # the drain: equal to the server everywhere, bit for bit
            for n in glob:
                assert torch.equal(mine[n], glob[n]), n
            checked.append(("drain", client.id))
            return
        block = client.blocks[server.plan[t]]
        delta = client.pending.tensors
        for n in glob:
            if n in block.param_names:
                assert torch.equal(mine[n], glob[n] + delta[n]), (t, n)
                assert not torch.equal(mine[n], glob[n])
            else:
                assert torch.equal(mine[n], glob[n]), (t, n)
        checked.append((t, client.id))

    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"rounds": 6})
    fed, clients, _ = _federate(cfg, check)
    assert len(checked) == 2 * 7  # every barrier of both clients, drain included
    for c in clients:
        for n, p in c.model.named_parameters():
            assert torch.equal(p, dict(fed.model.named_parameters())[n])


def test_correction_none_drifts_from_server(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"correction": "none"})
    fed, clients, _ = _federate(cfg)
    glob = _params(fed.model)
    drift = max(
        (p - glob[n]).abs().max().item() for c in clients for n, p in c.model.named_parameters()
    )
    assert drift > 1e-5
    # and the server never received the last round (no drain under 'none')
    assert fed.server.next_round == cfg.federation.rounds - 1


def test_identical_data_parablock_equals_fedbcd(tiny_model_dir, tmp_path):
    """With every client holding the same data, the stale block equals the average: staleness
    changes nothing, so both algorithms end with the same global model, bit for bit."""
    finals = {}
    for alg in ("parablock", "fedbcd"):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / alg),
            data={"partition": "replicate"},
            federation={"algorithm": alg, "rounds": 6},
        )
        fed, _, _ = _federate(cfg)
        finals[alg] = _params(fed.model)
    initial = _params(load_model(tiny_model_dir))
    for n in finals["parablock"]:
        assert torch.equal(finals["parablock"][n], finals["fedbcd"][n]), n
    assert any(not torch.equal(finals["fedbcd"][n], initial[n]) for n in initial)


def test_fedbcd_with_one_client_equals_local_block_training(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"algorithm": "fedbcd", "clients": 1, "rounds": 5},
        link={"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0},
    )
    fed, _, _ = _federate(cfg)

    spec = fed.placements[0]
    model = load_model(tiny_model_dir)
    from parablock.data.examples import round_indices
    from parablock.model.blocks import model_blocks

    blocks = model_blocks(model)
    s: TrainSettings = fed.server.settings.train_settings()
    for t, b in enumerate(fed.server.plan):
        batches = round_indices(len(spec.data), t, s.steps, s.batch_size, fed.server.settings.seed)
        r = train_block(model, blocks[b], list(spec.data), batches, s, spec.pad_id)
        # x_after expressed as base + delta, the one formula client and server both use
        set_block(model, blocks[b], {n: r.before[n] + r.delta[n] for n in r.before})
    glob = _params(fed.model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), glob[n]), n
    assert any(not torch.equal(glob[n], p) for n, p in _params(load_model(tiny_model_dir)).items())


def test_spans_overlap_in_parablock_and_never_in_fedbcd(tiny_model_dir, tmp_path):
    for alg in ("parablock", "fedbcd"):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / alg),
            federation={"algorithm": alg},
            link={"latency_ms": 20.0},
        )
        _, _, logs = _federate(cfg)
        for lg in logs:
            compute = [s for s in lg.spans if s.phase == "compute"]
            comm = [s for s in lg.spans if s.phase in ("upload", "wait", "download")]
            assert compute and comm
            overlap = overlap_seconds(compute, comm)
            if alg == "parablock":
                assert overlap > 0.02, overlap  # at least one round's latency was hidden
            else:
                assert overlap == 0.0, overlap


def test_only_the_scheduled_block_changes_per_round(tiny_model_dir, tmp_path):
    seen = {}

    def check(server, client, t):
        if client.id == 0 and t < len(server.plan):
            seen[t] = block_state(server.model, client.blocks[server.plan[t]])

    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"rounds": 4})
    fed, _, _ = _federate(cfg, check)
    assert fed.server.versions == {0: 0, 1: 1, 2: 2, 3: 3}
