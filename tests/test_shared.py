"""Clients of the local backend share the weights no one trains and, copy on write, the trained
blocks that equal the global model; they train exactly as before, and at most
``run.compute_slots`` of them step at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import tiny_config
from parablock.backends import local as local_backend
from parablock.backends.local import ComputeGate, run_local
from parablock.backends.shared import BlockStore, FrozenShare
from parablock.errors import SharedBlockError
from parablock.model.blocks import model_blocks
from parablock.model.cow import BlockWriter
from parablock.model.load import load_model
from parablock.run.runner import prepare, run


def test_only_the_trained_blocks_are_a_clients_own(tiny_model_dir):
    share = FrozenShare()
    a = share.model(tiny_model_dir, "", (2, 3))
    b = share.model(tiny_model_dir, "", (2, 3))
    blocks = model_blocks(a)
    own = set(blocks[2].param_names + blocks[3].param_names)
    pb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert (p.data_ptr() == pb[n].data_ptr()) == (n not in own), n
        assert torch.equal(p, pb[n])
    assert a.lm_head.weight is a.model.embed_tokens.weight  # ties survive the copy


def test_with_a_store_trained_blocks_start_on_the_base_and_are_pinned_as_version_minus_1(
    tiny_model_dir,
):
    share, store = FrozenShare(), BlockStore()
    a = share.model(tiny_model_dir, "", (2, 3), store=store)
    b = share.model(tiny_model_dir, "", (2, 3), store=store)
    (base,) = share._bases.values()
    blocks = model_blocks(a)
    own = set(blocks[2].param_names + blocks[3].param_names)
    pa, pb, pbase = (dict(m.named_parameters()) for m in (a, b, base))
    for n in pa:
        assert pa[n].data_ptr() == pb[n].data_ptr() == pbase[n].data_ptr(), n  # nothing copied
        assert (pa[n] is pbase[n]) == (n not in own), n  # but the trained ones are new objects
    n = blocks[3].param_names[0]
    torch.autograd.graph.increment_version(pa[n])  # a write moves this client's counter only
    assert pa[n]._version == 1 and pb[n]._version == 0 and pbase[n]._version == 0
    assert set(store.holders()) == {(2, -1), (3, -1)}
    assert store.tensors(3, -1)[n].data_ptr() == pbase[n].data_ptr()


def test_the_store_shares_one_copy_per_block_version_and_drops_what_nobody_holds():
    store = BlockStore()
    v1 = {"w": torch.arange(4.0)}
    got = store.hold(0, 5, 1, v1)
    again = store.hold(1, 5, 1, {"w": torch.arange(4.0)})  # a second download, same bits
    assert again["w"] is got["w"]
    store.hold(0, 5, 2, {"w": torch.ones(4)})  # client 0 moves on: (5, 1) is client 1's alone
    assert store.holders() == {(5, 1): {1}, (5, 2): {0}}
    store.release(1, 5)
    assert store.holders() == {(5, 2): {0}}
    with pytest.raises(SharedBlockError, match="block 5 v2"):
        store.hold(1, 5, 2, {"w": torch.zeros(4)})  # a different value for the same version
    with pytest.raises(SharedBlockError):
        store.hold(1, 5, 2, {"w": -torch.zeros(4) + 1.0, "x": torch.ones(1)})
    store.hold(3, 6, 0, {"w": torch.zeros(1)})
    store.release_all(0)
    store.release_all(3)
    assert store.holders() == {}
    store.pin(7, {"w": torch.zeros(1)})
    store.hold(0, 7, -1, {"w": torch.zeros(1)})
    store.release(0, 7)
    assert store.holders() == {(7, -1): frozenset()}  # the base stays


def test_a_writer_copies_before_writing_and_rebinds_global_values(tiny_model_dir):
    store = BlockStore()
    share = FrozenShare()
    models = [share.model(tiny_model_dir, "", (3,), store=store) for _ in range(2)]
    blocks = model_blocks(models[0])
    writers = [BlockWriter(m, blocks, i, store) for i, m in enumerate(models)]
    names = blocks[3].param_names
    params = [dict(m.named_parameters()) for m in models]
    value = {n: torch.randn_like(params[0][n]) for n in names}
    for w in writers:
        w.write_global(3, 0, {n: t.clone() for n, t in value.items()})
    for n in names:
        assert params[0][n].data_ptr() == params[1][n].data_ptr()
        assert torch.equal(params[0][n], value[n])
    version = params[0][names[0]]._version
    shared = writers[0].own(3)
    assert all(shared[n].data_ptr() == params[1][n].data_ptr() for n in names)  # let go of
    assert writers[0].own(3) is None  # already its own
    with torch.no_grad():
        for n in names:
            params[0][n].add_(1.0)  # training, in place: on client 0's own copy only
    assert all(torch.equal(params[1][n], value[n]) for n in names)
    assert all(torch.equal(store.tensors(3, 0)[n], value[n]) for n in names)
    assert store.holders() == {(3, -1): frozenset(), (3, 0): {1}}
    writers[0].write_global(3, 0, value)  # back to the global value: shared again
    assert params[0][names[0]].data_ptr() == params[1][names[0]].data_ptr()
    assert params[0][names[0]]._version > version  # the prefix cache would see the write


# -- whole runs --------------------------------------------------------------------------------


class _Recording(BlockStore):
    """A store that remembers every tensor it ever hands out, with a copy of its first value."""

    made: list[_Recording] = []

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept: set[tuple[int, int]] = set()  # every (block, version) it ever held
        self._mine = threading.Lock()
        _Recording.made.append(self)

    def _remember(self, key: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        with self._mine:
            self.kept.add(key)
            for t in tensors.values():
                self.first.setdefault(id(t), (t, t.clone()))

    def pin(self, block, tensors):
        super().pin(block, tensors)
        self._remember((block, -1), self.tensors(block, -1))

    def hold(self, holder, block, version, tensors):
        got = super().hold(holder, block, version, tensors)
        self._remember((block, version), got)
        return got


def _check_barrier(store: BlockStore, client) -> None:
    """At a barrier a client owns exactly the blocks where it differs from the global model,
    and holds the store's tensors for every other trained block."""
    w = client.writer
    assert w.private == client.dirty, (client.id, w.private, client.dirty)
    params = dict(client.model.named_parameters())
    holders = store.holders()
    for b in {b for b in client.plan} - w.private:
        v = client.versions[b]
        assert v == -1 or client.id in holders[(b, v)], (client.id, b, v)
        shared = store.tensors(b, v)
        for n, t in shared.items():
            assert params[n].data_ptr() == t.data_ptr(), (client.id, n)


def _run_recorded(cfg, monkeypatch):
    """A local run through ``prepare``; returns the federation, its clients and the store."""
    _Recording.made.clear()
    monkeypatch.setattr(local_backend, "BlockStore", _Recording)
    fed = prepare(cfg)
    clients = {}

    def hook(client, t):
        clients[client.id] = client
        _check_barrier(_Recording.made[0], client)

    run_local(fed.placements, fed.server, threads=1, on_barrier=hook)
    return fed, [clients[i] for i in sorted(clients)], _Recording.made[0]


@pytest.mark.parametrize("algorithm", ["parablock", "fedbcd"])
def test_clients_share_every_global_block_and_never_write_a_shared_tensor(
    tiny_model_dir, tmp_path, monkeypatch, algorithm
):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        model={"blocks": "top:3"},
        federation={"algorithm": algorithm, "clients": 3, "rounds": 5},
    )
    fed, clients, store = _run_recorded(cfg, monkeypatch)
    trained = sorted(set(fed.server.plan))
    # after the drain every client holds the global value: one storage per trained block
    storages = {
        b: {
            dict(c.model.named_parameters())[fed.server.blocks[b].param_names[0]].data_ptr()
            for c in clients
        }
        for b in trained
    }
    assert all(len(s) == 1 for s in storages.values()), storages
    final = {(b, fed.server.versions[b]) for b in trained}
    held = store.holders()
    assert {k for k in held if k[1] >= 0} == final  # entries nobody holds are gone
    assert all(held[k] == {0, 1, 2} for k in final)
    # every round's aggregate was shared, and every tensor the store ever handed out still
    # holds its first value
    assert store.kept >= {(b, t) for t, b in enumerate(fed.server.plan)}
    for t, first in store.first.values():
        assert torch.equal(t, first)


def test_the_base_model_is_never_written(tiny_model_dir, tmp_path, monkeypatch):
    shares: list[FrozenShare] = []

    class Keeping(FrozenShare):
        def __init__(self) -> None:
            super().__init__()
            shares.append(self)

    monkeypatch.setattr(local_backend, "FrozenShare", Keeping)
    cfg = tiny_config(tiny_model_dir, str(tmp_path), model={"blocks": "top:2"})
    fed = prepare(cfg)
    run_local(fed.placements, fed.server, threads=1)
    (base,) = shares[0]._bases.values()
    fresh = dict(load_model(tiny_model_dir).named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in base.named_parameters())
    assert not torch.equal(
        dict(fed.server.model.named_parameters())["model.layers.3.mlp.up_proj.weight"],
        fresh["model.layers.3.mlp.up_proj.weight"],
    )


def _fingerprint(tiny_model_dir, out, **sections) -> str:
    summary = run(tiny_config(tiny_model_dir, out, **sections))
    return summary["final_model_fingerprint"]


@pytest.mark.parametrize(
    "case",
    [
        {"federation": {"algorithm": "parablock"}},
        {"federation": {"algorithm": "fedbcd"}},
        {"federation": {"algorithm": "parablock"}, "link": {"compression": "int8"}},
        {"federation": {"algorithm": "cyclic", "clients": 3}},
        {
            "federation": {"clients": 3, "min_clients": 1, "round_timeout_s": 3.0},
            "run": {"faults": "crash@1:1"},
        },
    ],
    ids=["parablock", "fedbcd", "int8", "cyclic", "crash"],
)
def test_a_run_with_shared_blocks_equals_one_without_bit_for_bit(tiny_model_dir, tmp_path, case):
    case = {"model": {"blocks": "top:3"}, "train": {"precision": "fp32"}, **case}
    run_opts = case.pop("run", {})
    shared = _fingerprint(
        tiny_model_dir, str(tmp_path / "shared"), run={**run_opts, "share_blocks": True}, **case
    )
    alone = _fingerprint(
        tiny_model_dir, str(tmp_path / "alone"), run={**run_opts, "share_blocks": False}, **case
    )
    assert shared == alone


def test_a_run_with_shared_frozen_weights_equals_one_without(tiny_model_dir, tmp_path, monkeypatch):
    cfg = dict(model={"blocks": "top:2"}, train={"precision": "fp32"})
    shared = run(tiny_config(tiny_model_dir, str(tmp_path / "shared"), **cfg))
    monkeypatch.setattr(FrozenShare, "model", lambda self, *a, **k: None)  # each loads its own
    alone = run(tiny_config(tiny_model_dir, str(tmp_path / "alone"), **cfg))
    assert shared["final_model_fingerprint"] == alone["final_model_fingerprint"]
    assert shared["final_eval_loss"] < shared["initial_eval_loss"]


# -- the compute gate --------------------------------------------------------------------------


def test_one_compute_slot_lets_no_two_steps_overlap_and_changes_nothing(
    tiny_model_dir, tmp_path, monkeypatch
):
    spans: list[tuple[str, float, float]] = []
    gates: list[ComputeGate] = []

    class Recording(ComputeGate):
        def __init__(self, slots: int) -> None:
            super().__init__(slots)
            self._start: dict[int, float] = {}
            gates.append(self)

        def __enter__(self):
            super().__enter__()
            self._start[threading.get_ident()] = time.perf_counter()
            time.sleep(0.002)  # widen each step, so an overlap could not hide
            return self

        def __exit__(self, *exc):
            start = self._start.pop(threading.get_ident())
            spans.append((threading.current_thread().name, start, time.perf_counter()))
            super().__exit__(*exc)

    monkeypatch.setattr(local_backend, "ComputeGate", Recording)
    fed = {"clients": 3, "rounds": 3, "local_steps": 2}
    one = _fingerprint(
        tiny_model_dir, str(tmp_path / "one"), federation=fed, run={"compute_slots": 1}
    )
    assert [g.slots for g in gates] == [1]
    assert len(spans) == 3 * 3 * 2  # every step of every client went through the gate
    assert len({name for name, _, _ in spans}) == 3
    spans.sort(key=lambda s: s[1])
    assert all(a[2] <= b[1] for a, b in zip(spans, spans[1:], strict=False)), spans
    auto = _fingerprint(
        tiny_model_dir, str(tmp_path / "auto"), federation=fed, run={"compute_slots": 0}
    )
    assert one == auto


def test_auto_slots_are_the_cores_over_threads_per_client(monkeypatch):
    monkeypatch.setattr(local_backend.os, "cpu_count", lambda: 2)
    assert local_backend.step_slots(1) == 2  # 2 clients on 2 cores: never waits
    assert local_backend.step_slots(4) == 1
    assert local_backend.step_slots(1, 5) == 5
