"""One copy of the frozen weights for every client in a process (the local backend).

A parameter outside every block the run trains is never written by anyone: not by training, not
by a correction, not by a join (only trained blocks have versions to catch up on). So clients in
one process can hold the same tensor for it. Each client gets a deep copy of one base model in
which those parameters are the base's own objects and only the trained blocks are its own, e.g.
8 of SmolLM2's 30 layers under ``top:8``, without the 113 MB embedding. A LoRA run trains no
base weight (``trained`` empty): every client shares them all, and PEFT's injection into a copy
wraps the copy's own modules without writing the shared weights. With ``model.frozen_dtype=bf16``
the shared weights are held in bf16 (``frozen.py``), converted once.
"""

from __future__ import annotations

import copy
import threading

from torch import nn

from parablock.core.baselines import protocol_blocks
from parablock.frozen import hold_frozen
from parablock.model import load_model


class FrozenShare:
    """Builds client models that share every never-trained parameter (CPU clients only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # restarted clients are rebuilt on their own threads
        self._bases: dict[tuple[str, str], nn.Module] = {}

    def model(
        self,
        path: str,
        extra_blocks: str,
        trained: tuple[int, ...],
        algorithm: str = "",
        frozen_dtype: str = "fp32",
    ) -> nn.Module:
        with self._lock:
            base = self._bases.get((path, frozen_dtype))
            fresh = base is None
            if fresh:
                base = self._bases[(path, frozen_dtype)] = load_model(path)
            blocks = protocol_blocks(base, algorithm, extra_blocks)  # the run's block indices
            own = {n for b in trained for n in blocks[b].param_names}
            if fresh:  # one conversion, shared by every client (the same run trains the same)
                hold_frozen(base, path, own, frozen_dtype)
            # deepcopy takes what the memo already holds as is: those parameters stay shared
            memo = {id(p): p for n, p in base.named_parameters() if n not in own}
            return copy.deepcopy(base, memo)
