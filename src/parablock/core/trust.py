"""How far an honest update can move a block: the bound the server holds every update to.

A client trains with the settings the server handed it: a fresh AdamW, ``local_steps`` steps
(``local_steps_max`` at most) at ``lr`` times its schedule, weight decay ``wd``. AdamW moves each
coordinate by ``lr_t * m_t / (sqrt(v_t) + eps)`` plus ``lr_t * wd * p`` per step, and whatever
the gradients, the bias-corrected ``|m_t| / sqrt(v_t)`` is at most

    c_t = sqrt( sum_{i<=t} a_i^2 / b_i ),  a_i = (1-b1) b1^(t-i) / (1-b1^t),
                                            b_i = (1-b2) b2^(t-i) / (1-b2^t)

(Cauchy-Schwarz; c_1 = 1: the first step moves every coordinate by exactly lr at most, and
c_t stays near 1 for the few steps of a round). Over a round each coordinate therefore moves by
at most ``A + B * wd * |p|``, with ``A = sum_t lr_t c_t (+ the decay of what earlier steps
added)`` and ``B = sum_t lr_t``. No honest update goes past it, whatever the data; an update
that does was not made by the announced training: a poisoned, scaled or buggy one.

With ``federation.optimizer_state=per_block`` a client's AdamW carries its moments and step count
across a block's visits, so step t of a round is step t' >= t of that block's one long AdamW run;
``c_t`` grows with t (to about 7.27 for the default betas), and the bound uses ``c_T`` for the
most steps T any block can take in the run. With ``lr_schedule_scope=run`` each step's lr is the
largest its position in any round can have.

The server checks every coordinate against ``MARGIN`` times the bound (the margin covers float32
rounding and what lossy link compression and its error feedback add, under 1% in practice).
``benchmarks/update_bound.py`` reports the largest ratio honest SmolLM2 updates reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which core.train uses
MARGIN = 1.1


def adam_ratio_bounds(steps: int, betas: tuple[float, float] = BETAS) -> list[float]:
    """``c_t`` for t = 1..steps: the largest ``|m_t| / sqrt(v_t)`` (bias-corrected) any gradient
    sequence can give at step t."""
    b1, b2 = betas
    out = []
    for t in range(1, steps + 1):
        total = 0.0
        for i in range(1, t + 1):
            a = (1 - b1) * b1 ** (t - i) / (1 - b1**t)
            b = (1 - b2) * b2 ** (t - i) / (1 - b2**t)
            total += a * a / b
        out.append(math.sqrt(total))
    return out


def adam_ratio(t: int, betas: tuple[float, float] = BETAS) -> float:
    """``c_t`` in closed form (the sum is geometric in ``b1**2 / b2``); it grows with t, so
    ``c_T`` bounds every step of an AdamW run of T steps."""
    b1, b2 = betas
    r = b1 * b1 / b2
    scale = (1 - b1) ** 2 * (1 - b2**t) / ((1 - b2) * (1 - b1**t) ** 2)
    return math.sqrt(scale * (1 - r**t) / (1 - r))


@dataclass(frozen=True)
class UpdateBound:
    """Per coordinate, ``|delta| <= reach + decay * |p|`` for a block whose value is ``p``."""

    reach: float  # A: what the steps themselves can move a coordinate by
    decay: float  # B * wd: the share of |p| weight decay can take off it
    noise: float = 0.0  # what noise added to the delta (a DP noise share) may add to it

    @classmethod
    def of(cls, lrs: list[float], weight_decay: float, carried: int = 0) -> UpdateBound:
        """The bound of a round whose optimizer steps use learning rates ``lrs``; ``carried``
        > 0: the AdamW state may have taken up to that many steps in all (per_block)."""
        ratios = adam_ratio_bounds(len(lrs))
        if carried:
            ratios = [adam_ratio(max(carried, len(lrs)))] * len(lrs)
        reach, moved = 0.0, 0.0  # moved: how far earlier steps can have taken p from its start
        for lr, c in zip(lrs, ratios, strict=True):
            reach += lr * c + lr * weight_decay * moved
            moved += lr * c
        return cls(reach, weight_decay * sum(lrs))

    def excess(
        self, delta: dict[str, torch.Tensor], value: dict[str, torch.Tensor], step: int = 1 << 20
    ) -> float:
        """The largest ``|delta| / bound`` over every coordinate (<= 1 for honest training), a
        million coordinates at a time (the temporaries of a whole large block would not be)."""
        eps = torch.finfo(torch.float32).eps  # float32 rounding of p + delta, relative to |p|
        worst = 0.0
        for n, d in delta.items():
            flat, base = d.detach().reshape(-1), value[n].detach().reshape(-1)
            for i in range(0, flat.numel(), step):
                p = base[i : i + step].abs()
                allowed = self.reach + self.noise + self.decay * p
                over = (flat[i : i + step].abs() - eps * p).clamp_min(0) / allowed
                worst = max(worst, float(over.max()))
        return worst
