"""Local block training: K AdamW steps on one block with everything else frozen.

Only the block's parameters require grad, and nothing below it does (the embeddings are frozen), so
autograd records no graph below the block: backward stops there and the layers underneath run as
plain inference. A fresh optimizer per call matches BAdam-style state reset at block switches
(``federation.optimizer_state=reset``); with ``per_block`` the caller passes the block's AdamW
moments and step count from its last visit (``Moments``, held on the host in between) and gets
them back after the steps.
The loss of each batch comes from ``forward.BlockForward`` (precision, prefix cache, response-only
logits); the parameters, their gradients, the optimizer state and the delta stay fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from parablock.data.examples import Example
from parablock.model.blocks import Block, block_state, freeze_all_but
from parablock.model.devices import to_host
from parablock.model.forward import BlockForward


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine"
    grad_clip: float = 0.0
    precision: str = "fp32"  # fp32, bf16 or auto (``forward.resolve_precision``)
    prefix_cache_mb: float = 0.0  # 0 = every forward starts at the embeddings
    response_logits: bool = True  # the LM head only where the loss is
    loss_chunk: int = 0  # > 0: positions per recomputed piece of the LM head and loss
    recompute: bool = False  # keep only each layer's input; recompute the rest in backward
    # round: warm-up and schedule restart every round; run: over the client's rounds x steps
    lr_schedule_scope: str = "round"
    rounds: int = 1  # the run's rounds (lr_schedule_scope=run spans rounds x steps)
    optimizer_state: str = "reset"  # or "per_block": AdamW moments kept per block across visits

    def forward(self, model: nn.Module, start: int = 0) -> BlockForward:
        """The loss computation these settings ask for, for blocks at or above layer ``start``."""
        return BlockForward(
            model,
            start,
            precision=self.precision,
            prefix_cache_mb=self.prefix_cache_mb,
            response_logits=self.response_logits,
            loss_chunk=self.loss_chunk,
            recompute=self.recompute,
        )


@dataclass(frozen=True)
class DPStep:
    """DP-SGD on the trained block (``privacy.mode=record``): each step's batch is Poisson
    sampled (expected size ``expected_batch``), every example's gradient of the block clipped to
    ``clip_norm`` (per-example gradients by Opacus's ``GradSampleModule``), Gaussian noise of
    ``noise_multiplier x clip_norm`` added to their sum, divided by ``expected_batch`` (Opacus's
    ``DPOptimizer`` around the round's AdamW). ``physical_batch`` bounds the examples per
    forward/backward pass; the noise comes from a generator seeded with ``seed``."""

    clip_norm: float
    noise_multiplier: float
    expected_batch: int
    physical_batch: int
    seed: int


@dataclass(frozen=True)
class Moments:
    """A block's AdamW state between visits (``optimizer_state=per_block``): the steps taken on
    it so far and each parameter's first and second moments, on the host."""

    step: int
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    before: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]  # after - before
    num_examples: int
    loss: float  # mean training loss over the K steps
    moments: Moments | None = None  # optimizer_state=per_block: the block's state after it


def lr_factor(step: int, s: TrainSettings, round: int = 0) -> float:
    """The learning rate's factor at step ``step`` of round ``round``: linear warm-up, then
    constant or cosine, over the round's K steps or (``lr_schedule_scope=run``) over the
    client's whole run of rounds x K steps."""
    total = s.steps
    if s.lr_schedule_scope == "run":
        step, total = round * s.steps + step, s.steps * max(1, s.rounds)
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    if s.lr_schedule == "cosine":
        span = max(1, total - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(step - s.warmup_steps, span) / span))
    return 1.0


def train_block(
    model: nn.Module,
    block: Block,
    data: list[Example],
    batches: Iterable[list[int]],
    settings: TrainSettings,
    pad_id: int,
    forward: BlockForward | None = None,
    gate: AbstractContextManager | None = None,
    before: dict[str, torch.Tensor] | None = None,
    dp: DPStep | None = None,
    round: int = 0,
    moments: Moments | None = None,
) -> TrainResult:
    """Train ``block`` of ``model`` in place on ``batches`` (indices into ``data``), read once
    and in order: a lazy stream may decide while training how many steps there are.

    ``forward``: the client's loss computation (it holds the prefix cache across rounds); by
    default one built from ``settings`` that starts at the embeddings. ``gate``: held around
    each step (forward, backward, optimizer step), e.g. to bound how many clients of one
    process step at once; the batches are drawn outside it. ``before``: the block's current
    value on tensors that nobody writes, when the caller has one (else it is copied here).
    ``dp``: DP-SGD instead of plain steps (``DPStep``); the loss it reports is the mean of the
    examples' own losses (nan for a step whose Poisson batch came out empty). ``round``: where
    the steps fall in a run-long schedule. ``moments``: the block's AdamW state from its last
    visit (``optimizer_state=per_block``; None: a fresh one); the result then holds the new."""
    if forward is None:
        forward = settings.forward(model)
    if before is None:
        before = block_state(model, block)
    params = freeze_all_but(model, block)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    names = _names(model, params)
    if moments is not None:
        _load(opt, params, names, moments)
    private = _Private(model, params, opt, dp) if dp is not None else None
    model.train()
    losses = []
    num_examples = 0
    step_gate = gate if gate is not None else nullcontext()
    try:
        for step, idx in enumerate(batches):
            with step_gate:
                for g in opt.param_groups:
                    g["lr"] = settings.lr * lr_factor(step, settings, round)
                if private is not None:
                    losses.append(private.step(forward, data, idx, pad_id))
                else:
                    loss = forward.loss(data, idx, pad_id)
                    loss.backward()
                    if settings.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
            num_examples += len(idx)
    finally:
        if private is not None:
            private.close()
        for p in params:
            p.requires_grad_(False)
    after = block_state(model, block)
    delta = {n: after[n] - before[n] for n in before}
    seen = [x for x in losses if x == x]  # a DP step on an empty batch has no loss
    kept = (
        _moments(opt, params, names, moments) if settings.optimizer_state == "per_block" else None
    )
    mean = sum(seen) / len(seen) if seen else float("nan")
    return TrainResult(before, delta, num_examples, mean, kept)


def _names(model: nn.Module, params: list) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


def _load(opt, params: list, names: list[str], m: Moments) -> None:
    """Give ``opt`` the block's state from its last visit, on the parameters' device."""
    for p, n in zip(params, names, strict=True):
        opt.state[p] = {
            "step": torch.tensor(float(m.step)),  # AdamW's own form: a CPU float tensor
            "exp_avg": m.exp_avg[n].to(p.device, copy=True),
            "exp_avg_sq": m.exp_avg_sq[n].to(p.device, copy=True),
        }


def _moments(opt, params: list, names: list[str], last: Moments | None) -> Moments | None:
    """The block's AdamW state after this visit, copied to the host (GPU memory holds only the
    block being trained); ``last`` when no step ran (an empty stream)."""
    states = [opt.state.get(p) for p in params]
    if not all(states):
        return last
    return Moments(
        int(states[0]["step"]),
        to_host({n: s["exp_avg"].detach() for n, s in zip(names, states, strict=True)}),
        to_host({n: s["exp_avg_sq"].detach() for n, s in zip(names, states, strict=True)}),
    )


class _Private:
    """The round's DP-SGD: hooks for per-example gradients of the block, and the optimizer that
    clips them, adds the noise and steps."""

    def __init__(self, model: nn.Module, params: list, opt, dp: DPStep) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.dp, self.params = dp, params
        self.hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        self.opt = DPOptimizer(
            opt,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            expected_batch_size=dp.expected_batch,
            loss_reduction="mean",
            generator=torch.Generator(device=params[0].device).manual_seed(dp.seed),
        )

    def step(self, forward: BlockForward, data: list[Example], idx: list[int], pad_id) -> float:
        """One DP-SGD step on the Poisson batch ``idx``, in physical pieces; its mean loss."""
        pieces = [
            idx[i : i + self.dp.physical_batch] for i in range(0, len(idx), self.dp.physical_batch)
        ]
        total = 0.0
        if not pieces:  # an empty batch: the step is noise alone, as the accountant assumes
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            pieces = [[]]
        for k, piece in enumerate(pieces):
            if piece:
                loss = forward.loss(data, piece, pad_id, per_example=True)
                with warnings.catch_warnings():  # Opacus's hooks on a block whose input needs
                    warnings.filterwarnings("ignore", "Full backward hook")  # no gradient
                    loss.backward()
                total += float(loss.detach())
            if k < len(pieces) - 1:
                self.opt.signal_skip_step(do_skip=True)  # clip and keep; noise at the last
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return total / len(idx) if idx else float("nan")

    def close(self) -> None:
        self.hooks._close()
        for p in self.params:
            for name in ("grad_sample", "summed_grad"):
                if hasattr(p, name):
                    delattr(p, name)
