"""The delta pipelines: ordered stages that get the round, the block and a seeded generator, and
one stage of them, the client's norm clipping, at work in a federation."""

from __future__ import annotations

import torch

from conftest import tiny_config
from parablock.core.aggregate import delta_norm
from parablock.core.pipeline import SERVER, At, ClipNorm, Pipeline, generator
from parablock.run.build import prepare
from parablock.run.runner import run


class Draw:
    """A stage that records where it ran and one draw of its generator."""

    name = "draw"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def __call__(self, delta, at: At):
        self.seen.append((at.round, at.block, float(torch.rand(1, generator=at.rng))))
        return {n: t + 1 for n, t in delta.items()}


def test_stages_run_in_order_with_their_round_block_and_a_seeded_generator():
    delta = {"w": torch.ones(3)}
    first, second = Draw(), Draw()
    pipeline = Pipeline([first, second], seed=7, who=2)
    out = pipeline(delta, round=4, block=1)
    assert torch.equal(out["w"], torch.full((3,), 3.0)) and torch.equal(delta["w"], torch.ones(3))
    assert [s[:2] for s in first.seen + second.seen] == [(4, 1), (4, 1)]
    assert first.seen[0][2] != second.seen[0][2]  # each stage its own stream
    again = Draw()
    Pipeline([again, Draw()], seed=7, who=2)(delta, round=4, block=1)
    assert again.seen == first.seen  # reproducible: a resumed run draws the same
    draws = {
        float(torch.rand(1, generator=generator(7, who, r, b, 0)))
        for who, r, b in [(2, 4, 1), (3, 4, 1), (2, 5, 1), (2, 4, 0), (SERVER, 4, 1)]
    }
    assert len(draws) == 5  # another client, round, block or the server: another stream


def test_clip_norm_keeps_the_direction_and_bounds_the_norm():
    clip = ClipNorm(1.0)
    big = {"a": torch.full((4,), 3.0), "b": torch.full((2, 2), -4.0)}
    out = clip(big, At(0, 0, torch.Generator()))
    assert abs(delta_norm(out) - 1.0) < 1e-6
    assert torch.allclose(out["a"] / out["a"].norm(), big["a"] / big["a"].norm())
    small = {"a": torch.full((4,), 1e-3)}
    assert clip(small, At(0, 0, torch.Generator())) is small


def test_the_pipelines_order(tiny_model_dir, tmp_path):
    fed = prepare(
        tiny_config(
            tiny_model_dir,
            str(tmp_path),
            federation={"client_clip_norm": 0.5},
            link={"compression": "int8"},
        )
    )
    assert fed.server.pipeline.names() == ["aggregator", "codec"]
    from conftest import build_client

    client = build_client(fed.placements[0], fed.server)
    assert client.pipeline.names() == ["clip", "codec"]
    client.close()


def test_clipped_clients_send_bounded_deltas_and_still_end_equal_to_the_server(
    tiny_model_dir, tmp_path, monkeypatch
):
    """federation.client_clip_norm: every update the server takes is within the bound, and the
    block-level correction still leaves every client equal to the server."""
    from parablock.core.aggregation import Aggregation

    norms: list[float] = []
    submit = Aggregation.submit

    def watched(self, update, client):
        norms.append(delta_norm(update.tensors))
        return submit(self, update, client)

    monkeypatch.setattr(Aggregation, "submit", watched)
    finished = []
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"client_clip_norm": 0.05, "rounds": 6},
        run={"checkpoint": False},
        eval={"accuracy_size": 0},
    )
    summary = run(cfg, on_barrier=lambda c, t: finished.append(c))
    assert norms and max(norms) <= 0.05 * (1 + 1e-5)
    assert summary["updates_rejected"] == 0
    from parablock.model.load import load_model

    saved = load_model(summary["run_dir"] + "/model")
    theirs = dict(saved.named_parameters())
    for c in {c.id: c for c in finished}.values():
        for n, p in c.model.named_parameters():
            assert torch.equal(p.detach(), theirs[n].detach()), (c.id, n)
