"""The default update bound: no honest update reaches it, a scaled one is refused at any size,
and a run with a poisoned client ends where the fault-free run does."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.core.trust import MARGIN, UpdateBound, adam_ratio_bounds
from parablock.data.examples import round_indices
from parablock.errors import RoundFailedError
from parablock.model.blocks import block_state, model_blocks
from parablock.model.train import TrainSettings, lr_factor, train_block
from parablock.run.runner import run
from parablock.wire.compress import CODECS, ErrorFeedback


def test_adam_ratio_bound_is_one_at_the_first_step_and_grows_slowly():
    c = adam_ratio_bounds(50)
    assert c[0] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(c, c[1:], strict=False))
    assert c[3] < 1.05 and c[49] < 3.0


def test_the_bound_is_what_adam_can_reach_with_the_worst_gradients():
    """Gradients chosen to push as far as Adam can (a constant sign, then growing magnitudes):
    the step sizes stay within c_t, and the first step reaches it."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0)
    bounds = adam_ratio_bounds(8)
    for t, g in enumerate([1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]):
        before = p.detach().clone()
        p.grad = torch.tensor([g])
        opt.step()
        step = float((p.detach() - before).abs())
        assert step <= bounds[t] * (1 + 1e-6), (t, step, bounds[t])
    assert bounds[0] == pytest.approx(1.0)


SETTINGS = [
    TrainSettings(steps=1, batch_size=2, lr=1e-3),
    TrainSettings(steps=4, batch_size=2, lr=1e-3, grad_clip=1.0),
    TrainSettings(steps=6, batch_size=2, lr=1e-2, weight_decay=0.1),
    TrainSettings(steps=5, batch_size=2, lr=3e-3, warmup_steps=2, lr_schedule="cosine"),
]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"K{s.steps}-lr{s.lr:g}-wd{s.weight_decay:g}")
def test_no_honest_update_reaches_the_bound(s, tiny_examples, tiny_tokenizer):
    """Rounds of real training on every block of the tiny model, with int8 compression and its
    error feedback as well: every update stays within the bound (the wire form within the
    margin), and the plain one comes near it, so the bound is not loose."""
    model = make_model(len(tiny_tokenizer))
    blocks = model_blocks(model, "embed,norm")
    bound = UpdateBound.of([s.lr * lr_factor(k, s) for k in range(s.steps)], s.weight_decay)
    codec = CODECS.get("int8")
    feedback = ErrorFeedback(codec)
    worst, worst_wire = 0.0, 0.0
    for r in range(8):
        block = blocks[r % len(blocks)]
        batches = round_indices(len(tiny_examples), r, s.steps, s.batch_size, seed=3)
        result = train_block(model, block, tiny_examples, batches, s, tiny_tokenizer.pad_token_id)
        worst = max(worst, bound.excess(result.delta, result.before))
        shapes = {n: tuple(t.shape) for n, t in result.delta.items()}
        wire = codec.decode(feedback.encode(block.index, dict(result.delta)), shapes)
        worst_wire = max(worst_wire, bound.excess(wire, result.before))
    assert worst <= 1.0, worst
    assert worst_wire <= MARGIN, worst_wire
    assert worst > 0.5  # honest updates come close: the bound is not loose


def _loss(summary: dict) -> float:
    return summary["final_eval_loss"]


def test_a_poisoned_client_is_refused_and_the_run_ends_where_the_clean_one_does(
    tiny_model_dir, tmp_path
):
    """With the defaults, an update scaled by 1e6 is refused and the run keeps its progress
    (the refused update is simply missing); without the bound the same fault undoes it."""
    fed = {"clients": 3, "rounds": 8, "min_clients": 1, "lr": 1e-2}

    def cfg(name: str, faults: str, **extra):
        return tiny_config(
            tiny_model_dir,
            str(tmp_path / name),
            federation={**fed, **extra},
            run={"faults": faults, "checkpoint": False},
            eval={"accuracy_size": 0},
        )

    clean = run(cfg("clean", ""))
    gain = clean["initial_eval_loss"] - clean["final_eval_loss"]
    assert gain > 0.05
    poisoned = run(cfg("poisoned", "scale@1:5"))
    assert poisoned["updates_rejected"] == 1 and poisoned["updates_accepted"] == 3 * 8 - 1
    assert abs(poisoned["final_eval_loss"] - clean["final_eval_loss"]) < 0.1 * gain
    # the same fault with the bound off: the aggregate is no longer a model
    try:
        unbounded = run(cfg("unbounded", "scale@2:5", update_bound=False))
    except RoundFailedError:
        return  # its aggregate was not finite: refused, but only after the damage was done
    assert unbounded["updates_rejected"] == 0
    loss = unbounded["final_eval_loss"]
    assert not math.isfinite(loss) or loss > clean["final_eval_loss"] + 0.5 * gain


def test_the_server_refuses_a_scaled_update_and_keeps_the_block(tiny_model_dir, tmp_path):
    from parablock.run.runner import prepare
    from parablock.wire.messages import BlockUpdate

    f = prepare(tiny_config(tiny_model_dir, str(tmp_path / "x")))
    server = f.server
    block = server.blocks[server.plan[0]]
    before = block_state(server.model, block)
    lr, steps = server.settings.lr, server.settings.local_steps
    near = {n: torch.full_like(t, lr * steps * 0.99) for n, t in before.items()}
    far = {n: t * 1.5 for n, t in near.items()}
    ok, why = server.submit(BlockUpdate(0, 0, block.index, -1, 2, 1.0, near), 0)
    assert ok, why
    ok, why = server.submit(BlockUpdate(1, 0, block.index, -1, 2, 1.0, far), 1)
    assert not ok and "as far as the announced training can" in why
    assert server.stats.bound_ratio == pytest.approx(0.99 / adam_ratio_bounds(1)[0], rel=0.05)
