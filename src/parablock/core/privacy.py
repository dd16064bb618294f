"""Differential privacy: the ledger of what a mechanism released, and the stages that noise.

Two modes (``privacy.mode``, handed out at join in ``RunSettings.privacy``):

- ``record``: DP-SGD on the trained block (``model.train.DPStep``). A site's guarantee covers every
  record it holds, over every step it takes in the run, whatever block each step trains: each step
  is a Poisson-subsampled Gaussian mechanism at rate ``q = batch_size / records``, so the site's
  ``Ledger`` gains ``(sigma, q, local_steps)`` per round it trains.
- ``client``: each client clips its block delta to C (``pipeline.ClipNorm``), and Gaussian noise
  of standard deviation ``sigma x C`` goes on the sum of the round's deltas, added by the server
  (``ServerNoise``, a trusted server) or in shares by the clients (``NoiseShare``: each adds
  ``N(0, sigma^2 C^2 / n)``, what secure aggregation needs). The aggregate is the mean of the
  clipped deltas plus noise / n; every client applies that same noised aggregate, so the
  block-level correction still leaves it equal to the server bit for bit. One release per round
  with every client taking part: the server's ledger gains ``(sigma, 1, 1)`` per round.

The accountant is Opacus's (RDP or PRV): ``Ledger.epsilon`` hands it the history and asks for
epsilon at ``privacy.delta``. Nothing here accounts by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from parablock.core.pipeline import At, ClipNorm
from parablock.data.examples import poisson_indices
from parablock.errors import BudgetSpent
from parablock.model.train import DPStep
from parablock.wire.protocol import PrivacySettings

Tensors = dict[str, torch.Tensor]


@dataclass
class Ledger:
    """What a mechanism has released: ``(noise_multiplier, sample_rate, steps)`` entries."""

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, k = self.history[-1]
            self.history[-1] = (s, q, k + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything released so far (0 before any release; inf
        when a release carried no noise)."""
        if not self.history:
            return 0.0
        if any(s <= 0 for s, _, _ in self.history):
            return math.inf
        acc = _accountant(self.accountant)
        acc.history = [tuple(h) for h in self.history]
        return float(acc.get_epsilon(delta=delta))

    def after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float):
        """Epsilon if ``steps`` more steps were taken (the ledger itself is unchanged)."""
        trial = Ledger(self.accountant, list(self.history))
        trial.add(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta)

    def to_json(self) -> list[list[float]]:
        return [list(h) for h in self.history]

    @classmethod
    def from_json(cls, accountant: str, rows) -> Ledger:
        return cls(accountant, [(float(s), float(q), int(k)) for s, q, k in rows or []])


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def calibrate(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that ends ``steps`` steps at ``sample_rate`` at ``target_epsilon``
    (Opacus's search over the accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def rounds_within(
    max_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str,
) -> tuple[int, float]:
    """How many of ``rounds`` rounds keep epsilon within ``max_epsilon``, and the epsilon they
    end at (rounds of ``steps_per_round`` steps at ``sample_rate``)."""
    ledger, done, eps = Ledger(accountant), 0, 0.0
    for _ in range(rounds):
        nxt = ledger.after(noise_multiplier, sample_rate, steps_per_round, delta)
        if nxt > max_epsilon:
            break
        ledger.add(noise_multiplier, sample_rate, steps_per_round)
        done, eps = done + 1, nxt
    return done, eps


@dataclass
class ServerNoise:
    """Client mode with the noise at the server: ``N(0, sigma^2 C^2)`` on the sum of the
    round's clipped deltas, that is ``/ n`` on their mean (``at.notes['participants']``)."""

    noise_multiplier: float
    clip_norm: float
    name: str = "noise"

    def __call__(self, delta: Tensors, at: At) -> Tensors:
        std = self.noise_multiplier * self.clip_norm / at.notes["participants"]
        return {n: t + std * _normal(t, at.rng) for n, t in delta.items()}


@dataclass
class NoiseShare:
    """Client mode with the noise at the clients: this client's share, ``N(0, sigma^2 C^2 / n)``
    on its clipped delta, so that the n shares in the sum carry ``N(0, sigma^2 C^2)``."""

    noise_multiplier: float
    clip_norm: float
    clients: int
    name: str = "noise share"

    def __call__(self, delta: Tensors, at: At) -> Tensors:
        std = self.noise_multiplier * self.clip_norm / math.sqrt(self.clients)
        return {n: t + std * _normal(t, at.rng) for n, t in delta.items()}


def _normal(like: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=rng, dtype=torch.float32).to(like.dtype)


class SitePrivacy:
    """A client's side of the run's privacy: its mechanism (the stages of its delta pipeline, or
    DP-SGD's step) and, in record mode, its own ledger, kept in its checkpoints."""

    def __init__(
        self,
        settings: PrivacySettings,
        client: int,
        seed: int,
        steps: int,
        batch: int,
        shares: int,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.client, self.seed = client, seed
        self.steps, self.batch, self.shares = steps, batch, shares
        self.ledger = ledger or Ledger(settings.accountant)

    def stages(self) -> list:
        """Client mode: clip the delta to C, then (noise at the clients) this client's share."""
        s = self.settings
        if s.mode != "client":
            return []
        stages: list = [ClipNorm(s.clip_norm)]
        if s.noise_at == "client":
            stages.append(NoiseShare(s.noise_multiplier, s.clip_norm, self.shares))
        return stages

    def rate(self, records: int) -> float:
        """Record mode's sampling rate: the expected batch over the site's records."""
        return min(1.0, self.batch / max(records, 1))

    def dp_step(self, round: int, records: int) -> DPStep | None:
        """Record mode: the round's DP-SGD settings, its noise seeded by (seed, client, round)."""
        s = self.settings
        if s.mode != "record":
            return None
        self.check_budget(records)
        return DPStep(
            s.clip_norm, s.noise_multiplier, self.batch, s.physical_batch, self._seed(round)
        )

    def batches(self, round: int, records: int) -> list[list[int]]:
        return poisson_indices(records, round, self.steps, self.rate(records), self._seed(round, 1))

    def spent(self, round: int, records: int) -> float | None:
        """After a round's training: record mode adds its steps to the ledger and returns the
        site's epsilon; client mode's epsilon is the server's to count (None here)."""
        s = self.settings
        if s.mode != "record":
            return None
        self.ledger.add(s.noise_multiplier, self.rate(records), self.steps)
        return self.ledger.epsilon(s.delta)

    def check_budget(self, records: int) -> None:
        """``privacy.max_epsilon``: refuse to train a round that would take the site past it."""
        s = self.settings
        if not s.max_epsilon:
            return
        eps = self.ledger.after(s.noise_multiplier, self.rate(records), self.steps, s.delta)
        if eps > s.max_epsilon:
            raise BudgetSpent(
                f"client {self.client}: another round would take its epsilon to {eps:.3g}, past "
                f"privacy.max_epsilon={s.max_epsilon:g}; it stops here (checkpoint kept)"
            )

    def _seed(self, round: int, stream: int = 0) -> int:
        words = [self.seed & 0xFFFFFFFF, self.seed >> 32, self.client, round, stream, 0xD9]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def server_privacy(settings: PrivacySettings) -> list:
    """The server's privacy stages: client mode with the noise at the server adds it."""
    if settings.mode == "client" and settings.noise_at == "server":
        return [ServerNoise(settings.noise_multiplier, settings.clip_norm)]
    return []
