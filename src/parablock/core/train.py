"""Local block training: K AdamW steps on one block with everything else frozen.

Only the block's parameters require grad, and nothing below it does (the embeddings are frozen), so
autograd records no graph below the block: backward stops there and the layers underneath run as
plain inference. A fresh optimizer per call matches BAdam-style state reset at block switches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from parablock.core.blocks import Block, block_state, freeze_all_but
from parablock.data.examples import Example, collate


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine"
    grad_clip: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    before: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]  # after - before
    num_examples: int
    loss: float  # mean training loss over the K steps


def _to(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The batch on the model's device (a client on a GPU trains there)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def lr_factor(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    if s.lr_schedule == "cosine":
        span = max(1, s.steps - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup_steps) / span))
    return 1.0


def train_block(
    model: nn.Module,
    block: Block,
    data: list[Example],
    batches: Iterable[list[int]],
    settings: TrainSettings,
    pad_id: int,
) -> TrainResult:
    """Train ``block`` of ``model`` in place on ``batches`` (indices into ``data``), read once
    and in order: a lazy stream may decide while training how many steps there are."""
    before = block_state(model, block)
    params = freeze_all_but(model, block)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses = []
    num_examples = 0
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor(step, settings)
        batch = _to(collate([data[i] for i in idx], pad_id), model)
        loss = model(**batch).loss
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        num_examples += len(idx)
    for p in params:
        p.requires_grad_(False)
    after = block_state(model, block)
    delta = {n: after[n] - before[n] for n in before}
    return TrainResult(before, delta, num_examples, sum(losses) / len(losses))
