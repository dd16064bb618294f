"""Block-level corrections applied at the ParaBlock barrier to the block that was in flight.

``replace`` (the algorithm) writes the server's new global value, so the client's copy equals the
server's bit for bit. ``none`` (ablation only) keeps the client's own stale update and lets it drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from parablock.registry import Registry


@dataclass(frozen=True)
class Correction:
    apply_global: bool  # write the aggregate into the client's copy at the barrier
    drain: bool  # upload the last round's delta and apply its aggregate after round T-1


CORRECTIONS: Registry[Correction] = Registry("correction mode")
CORRECTIONS.add("replace", Correction(apply_global=True, drain=True))
CORRECTIONS.add("none", Correction(apply_global=False, drain=False))
