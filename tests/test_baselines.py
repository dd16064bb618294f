"""The baselines: full-parameter FedAvg against local full training, cyclic block training's turns,
and what the server and the config ask of them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.backends.local import run_local
from parablock.config import ConfigError, load
from parablock.core.aggregate import apply
from parablock.core.client import Client
from parablock.core.schedule import WHOLE_MODEL, protocol_blocks, round_turns
from parablock.core.server import Server
from parablock.data.examples import round_indices
from parablock.model.blocks import block_nbytes, block_state, model_blocks, set_block
from parablock.model.forward import first_trained_layer
from parablock.model.load import load_model
from parablock.model.train import TrainSettings, train_block
from parablock.run.runner import prepare, run
from parablock.wire.messages import BlockUpdate
from parablock.wire.protocol import RunSettings

FAST = {"up_mbps": float("inf"), "down_mbps": float("inf"), "latency_ms": 0.0}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _federate(cfg, on_barrier=None, **backend):
    fed = prepare(cfg)
    clients: dict[int, Client] = {}

    def hook(client, t):
        clients[client.id] = client
        if on_barrier:
            on_barrier(client, t)

    logs = run_local(fed.placements, fed.server, threads=1, on_barrier=hook, **backend)
    return fed, [clients[i] for i in sorted(clients)], logs


# -- fedavg_full ------------------------------------------------------------------------------


def test_whole_model_block_holds_every_parameter_once(tiny_model_dir):
    model = load_model(tiny_model_dir)
    (block,) = protocol_blocks(model, "fedavg_full", "embed")  # extra blocks do not apply
    assert block.index == 0 and block.name == WHOLE_MODEL
    assert block.param_names == tuple(n for n, _ in model.named_parameters())
    assert "model.embed_tokens.weight" in block.param_names  # the tied head appears once
    assert block_nbytes(model, block) == sum(p.numel() * 4 for p in model.parameters())
    # the other algorithms keep one block per layer
    assert len(protocol_blocks(model, "cyclic")) == len(model_blocks(model)) == 4


def test_training_every_parameter_starts_at_the_embeddings(tiny_model_dir):
    """The prefix cache begins below the lowest trained layer; with the whole model training
    there is no frozen prefix, so there must be no cache even with one configured."""
    model = load_model(tiny_model_dir)
    whole = protocol_blocks(model, "fedavg_full")
    assert first_trained_layer(model, whole, {0}) == 0
    settings = TrainSettings(1, 2, 1e-3, prefix_cache_mb=64.0)
    assert settings.forward(model, first_trained_layer(model, whole, {0})).cache is None
    layers = model_blocks(model, "norm")
    assert first_trained_layer(model, layers, {2, 3}) == 2  # unchanged for layer blocks
    assert first_trained_layer(model, layers, {4}) == 4  # only the final norm
    assert settings.forward(model, 2).cache is not None


def test_fedavg_full_with_one_client_equals_local_full_training(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        model={"blocks": "top:1"},  # does not apply: every parameter trains
        federation={"algorithm": "fedavg_full", "clients": 1, "rounds": 3},
        train={"prefix_cache_mb": 64.0},
        link=FAST,
    )
    fed, (client,), logs = _federate(cfg)
    assert fed.server.plan == [0, 0, 0] and fed.selected == [0]
    assert client.forward().cache is None

    spec = fed.placements[0]
    model = load_model(tiny_model_dir)
    (block,) = protocol_blocks(model, "fedavg_full")
    s = fed.server.settings.train_settings()
    for t in range(3):
        batches = round_indices(len(spec.data), t, s.steps, s.batch_size, fed.server.settings.seed)
        r = train_block(model, block, list(spec.data), batches, s, spec.pad_id)
        set_block(model, block, apply(r.before, r.delta, 1.0))  # the formula both sides use
    glob = _params(fed.model)
    initial = _params(load_model(tiny_model_dir))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), glob[n]), n
        assert not torch.equal(glob[n], initial[n]), n  # every parameter moved
    # the whole model travels up every round and down after each aggregate
    whole = block_nbytes(model, block)
    rounds = [r for r in logs[0].rounds if not r.drain]
    assert all(whole < r.bytes_up < 1.01 * whole for r in logs[0].rounds if r.bytes_up)
    assert sum(r.bytes_up > 0 for r in logs[0].rounds) == 3 and len(rounds) == 3


@pytest.mark.parametrize("share", [True, False])
def test_fedavg_full_clients_copy_every_parameter_to_train_and_end_equal_to_the_server(
    tiny_model_dir, tmp_path, share
):
    """The local backend shares the weights no block trains; here every parameter trains, so a
    client copies the whole model before it trains (two clients writing one tensor would corrupt
    both). After the drain the clients share the one global model (copy on write), or without
    ``share_blocks`` each keeps its own copy."""
    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"algorithm": "fedavg_full"})
    fed, clients, _ = _federate(cfg, share_blocks=share)
    a, b = (dict(c.model.named_parameters()) for c in clients)
    assert all((a[n].data_ptr() == b[n].data_ptr()) == share for n in a)
    glob = _params(fed.model)
    for c in clients:
        for n, p in c.model.named_parameters():
            assert torch.equal(p.detach(), glob[n]), (c.id, n)


# -- cyclic ------------------------------------------------------------------------------------


def test_cyclic_turn_trains_from_the_previous_turns_model(tiny_model_dir, tmp_path, monkeypatch):
    """Round t is client t mod N's, and the model it trains from is the global model after round
    t-1, which holds the block the previous client just trained; every client ends equal to the
    server, and the server took exactly one update per round."""
    clients, rounds = 3, 7
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"algorithm": "cyclic", "clients": clients, "rounds": rounds},
    )
    fed = prepare(cfg)
    initial = _params(fed.model)
    aggregates: dict[int, tuple[int, dict]] = {}
    fed.server.aggregate_listeners.append(lambda r, b, v, *_: aggregates.__setitem__(r, (b, v)))
    starts: dict[int, tuple[int, dict]] = {}
    compute = Client.compute

    def spy(self, round, record):
        starts[round] = (self.id, _params(self.model))
        return compute(self, round, record)

    monkeypatch.setattr(Client, "compute", spy)
    finished: dict[int, Client] = {}
    logs = run_local(
        fed.placements, fed.server, threads=1, on_barrier=lambda c, t: finished.__setitem__(c.id, c)
    )

    assert sorted(starts) == list(range(rounds))
    blocks = fed.server.blocks
    glob = dict(initial)  # the global model after round t-1, rebuilt from the aggregates
    for t in range(rounds):
        who, start = starts[t]
        assert who == t % clients
        for n in glob:
            assert torch.equal(start[n], glob[n]), (t, n)
        if t > 0:  # the previous client's block is there
            prev = blocks[fed.server.plan[t - 1]].param_names
            assert any(not torch.equal(start[n], initial[n]) for n in prev), t
        b, value = aggregates[t]
        glob.update(value)
    assert fed.server.stats.participants == {t: [t % clients] for t in range(rounds)}
    final = _params(fed.model)
    assert all(torch.equal(final[n], glob[n]) for n in glob)
    for c in finished.values():  # every client ends equal to the server, bit for bit
        for n, p in c.model.named_parameters():
            assert torch.equal(p.detach(), final[n]), (c.id, n)
    # only the round's client uploads; everyone passes one final barrier
    for lg in logs:
        trained = [r.round for r in lg.rounds if not r.drain]
        assert trained == [t for t in range(rounds) if t % clients == lg.client]
        assert all(r.bytes_up > 0 for r in lg.rounds if not r.drain)
        assert [r.drain for r in lg.rounds].count(True) == 1


def test_server_expects_only_the_rounds_turn():
    model = make_model(vocab=64, layers=3)
    blocks = model_blocks(model)
    plan = [0, 1, 2]
    settings = RunSettings(
        "cyclic", "replace", plan, "", 1, 1, 1e-3, 0.0, 0, "constant", 0.0, 0, 16, 1, "",
        turns=round_turns("cyclic", 3, 2),
    )  # fmt: skip
    server = Server(model, blocks, plan, clients=2, settings=settings)

    def send(client, round, block, base=-1):
        delta = {n: torch.full_like(t, 5e-4) for n, t in block_state(model, blocks[block]).items()}
        update = BlockUpdate(client, round, block, base, 1, 0.1, delta)
        return server.receive_update(update.serialize(), client)

    ok, reason = send(1, 0, 0)
    assert not ok and "round 0 is client 0's turn" in reason
    assert server.next_round == 0  # an off-turn update forfeits nothing and closes nothing
    assert send(0, 0, 0) == (True, "accepted")
    assert server.next_round == 1  # one update is the whole round, min_clients or not
    assert send(1, 1, 1) == (True, "accepted") and server.next_round == 2
    assert not send(1, 2, 2)[0] and send(0, 2, 2)[0]
    assert server.stats.participants == {0: [0], 1: [1], 2: [0]}


def test_config_says_what_each_baseline_needs(tiny_model_dir, tmp_path):
    for alg in ("fedavg_full", "cyclic"):
        with pytest.raises(ConfigError, match=f"algorithm={alg} always applies the aggregate"):
            load(None, [f"federation.algorithm={alg}", "federation.correction=none"])
        assert load(None, [f"federation.algorithm={alg}", "model.blocks=3"])  # one block is fine
    with pytest.raises(ConfigError, match="clients 2..3 never train"):
        load(None, ["federation.algorithm=cyclic", "federation.clients=4", "federation.rounds=2"])
    cfg = tiny_config(
        tiny_model_dir, str(tmp_path / "r"), federation={"algorithm": "cyclic", "rounds": 2}
    )
    with pytest.raises(ConfigError, match="cyclic runs cannot be resumed"):
        run(cfg, resume=True)
