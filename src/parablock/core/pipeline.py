"""The delta pipelines: what happens to a block delta between training and the global model.

On the client, a trained delta passes through ordered **client stages** before it is wrapped in
a ``BlockUpdate``: today norm clipping (``federation.client_clip_norm``) and, always last, the
codec of ``link.compression`` with the client's error feedback. On the server, the updates of a
round that passed validation go through the **aggregator** (it combines them into one delta),
then ordered **server stages**: today the codec the aggregate travels back in (the server applies
exactly what its clients will decode). The privacy mechanisms (clipping and noise) are stages of
the same kind.

Every stage is called with the delta and an ``At``: the round, the block, and a random generator
seeded from the run's seed, the side, the client (or the server), the round, the block and the
stage's place in its pipeline, so a run with a random stage is reproducible bit for bit, also
after a resume. A stage returns a new delta and never changes the one it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from parablock.core.aggregate import AGGREGATORS, delta_norm
from parablock.wire.compress import Codec, ErrorFeedback, Shapes
from parablock.wire.messages import BlockUpdate

Tensors = dict[str, torch.Tensor]
SERVER = -1  # the "client" id of the server's own stages, in their seeds


@dataclass
class At:
    """Where a stage runs: the round, the block, its own seeded generator, and ``notes`` for
    what a stage leaves to the code after the pipeline (the server codec's wire form)."""

    round: int
    block: int
    rng: torch.Generator
    notes: dict = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def __call__(self, delta: Tensors, at: At) -> Tensors: ...


def generator(seed: int, who: int, round: int, block: int, place: int) -> torch.Generator:
    """The generator of stage ``place`` of ``who``'s pipeline (``SERVER`` for the server's) at
    ``round`` and ``block``: independent of every other (numpy's SeedSequence)."""
    words = [seed & 0xFFFFFFFF, seed >> 32, who + 1, round, block, place + 1]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> 1))


class Pipeline:
    """Ordered stages with their seeds: ``pipeline(delta, round, block)``."""

    def __init__(self, stages: Sequence[Stage], seed: int, who: int) -> None:
        self.stages = list(stages)
        self.seed, self.who = seed, who

    def __call__(self, delta: Tensors, round: int, block: int, notes: dict | None = None):
        notes = {} if notes is None else notes
        for place, stage in enumerate(self.stages):
            rng = generator(self.seed, self.who, round, block, place)
            delta = stage(delta, At(round, block, rng, notes))
        return delta

    def names(self) -> list[str]:
        return [s.name for s in self.stages]


# -- client stages ---------------------------------------------------------------------------


@dataclass
class ClipNorm:
    """Scale a delta whose L2 norm exceeds ``bound`` down to it (its direction is kept)."""

    bound: float
    name: str = "clip"

    def __call__(self, delta: Tensors, at: At) -> Tensors:
        norm = delta_norm(delta)
        if norm <= self.bound:
            return delta
        scale = self.bound / norm
        return {n: t * scale for n, t in delta.items()}


@dataclass
class Encode:
    """The client's codec, last: the delta in its wire form, with this client's error feedback
    for the block (quantised once, here: a re-sent update is the same bytes)."""

    feedback: ErrorFeedback
    name: str = "codec"

    def __call__(self, delta: Tensors, at: At) -> Tensors:
        if not self.feedback.codec.lossy:
            return delta
        return self.feedback.encode(at.block, delta)


def client_pipeline(
    feedback: ErrorFeedback,
    clip_norm: float,
    seed: int,
    client: int,
    privacy: Sequence[Stage] = (),
) -> Pipeline:
    """A client's stages, in order: clipping (when set), the privacy mechanism's (clipping to
    C, a noise share), then the codec."""
    stages: list[Stage] = [ClipNorm(clip_norm)] if clip_norm > 0 else []
    return Pipeline([*stages, *privacy, Encode(feedback)], seed, client)


# -- server stages ---------------------------------------------------------------------------


@dataclass
class EncodeAside:
    """The codec the aggregate travels back in: the server goes on with what the clients will
    decode; the wire form and the new error-feedback residual go into ``at.notes``, kept only
    once the aggregate is committed."""

    feedback: ErrorFeedback
    shapes: Callable[[int], Shapes]
    name: str = "codec"

    def __call__(self, delta: Tensors, at: At) -> Tensors:
        codec: Codec = self.feedback.codec
        if not codec.lossy:
            return delta
        wire, residual = self.feedback.encode_aside(at.block, delta)
        at.notes.update(wire=wire, residual=residual)
        return codec.decode(wire, self.shapes(at.block))


class ServerPipeline:
    """The aggregator, then the server's stages: ``pipeline(updates, weights, round, block)``
    gives the delta to apply and the notes its stages left."""

    def __init__(self, aggregator: str, trim_fraction: float, stages: Sequence[Stage], seed: int):
        self.aggregate_fn = AGGREGATORS.get(aggregator)
        self.trim_fraction = trim_fraction
        self.stages = Pipeline(stages, seed, SERVER)

    def __call__(
        self, updates: list[BlockUpdate], weights: list[float], round: int, block: int
    ) -> tuple[Tensors, dict]:
        notes: dict = {"participants": len(updates)}
        at = At(round, block, generator(self.stages.seed, SERVER, round, block, -1), notes)
        delta = self.aggregate_fn(updates, weights, self.trim_fraction, at)
        return self.stages(delta, round, block, notes), notes

    def names(self) -> list[str]:
        return ["aggregator", *self.stages.names()]


def server_pipeline(
    aggregator: str,
    trim_fraction: float,
    feedback: ErrorFeedback,
    shapes: Callable[[int], Shapes],
    seed: int,
    privacy: Sequence[Stage] = (),
) -> ServerPipeline:
    """The server's pipeline: the aggregator, the privacy mechanism's stages (noise on the
    aggregate), then the codec the aggregate travels back in (noise comes before it)."""
    return ServerPipeline(
        aggregator, trim_fraction, [*privacy, EncodeAside(feedback, shapes)], seed
    )
