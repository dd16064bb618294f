"""What the clients of one process share (the local backend): frozen weights, and trained blocks
while they equal the global model.

**Frozen weights.** A parameter outside every block the run trains is never written by anyone: not
by training, not by a correction, not by a join (only trained blocks have versions to catch up
on). So clients in one process can hold the same tensor for it. Each client gets a deep copy of
one base model in which those parameters are the base's own objects and only the trained blocks
are its own, e.g. 8 of SmolLM2's 30 layers under ``top:8``, without the 113 MB embedding. A LoRA
run trains no base weight (``trained`` empty): every client shares them all, and PEFT's injection
into a copy wraps the copy's own modules without writing the shared weights. With
``model.frozen_dtype=bf16`` the shared weights are held in bf16 (``frozen.py``), converted once.

**Trained blocks, copy on write** (``BlockStore``; the client's side is ``core/cow.py``). A
client's copy differs from the global model on at most two blocks (ParaBlock: the one it trains
and the one in flight; FedBCD: one); every other trained block is the global value at a version
the client knows, the same bits in every client. The store keeps one canonical set of tensors per
(block, version) with the ids of the clients that hold it, and drops it when the last one lets
go. Version -1 is the base model's own tensors (pinned: nobody writes them, and they stay alive
with the base anyway). With a store, ``FrozenShare.model`` gives each client new ``Parameter``
objects for its trained blocks that still point at the base's storage, so nothing is copied until
the client trains a block. Each client's parameters stay its own objects, each with its own
version counter (``p.data``, never ``p.detach()``: a shared counter would let one client's write
invalidate another client's autograd graph). A later offer of a (block, version) the store holds
is compared bit for bit with it, which also catches an in-place write into shared tensors.
GPU clients and the Ray and network backends use no store.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from parablock.core.schedule import protocol_blocks
from parablock.errors import SharedBlockError
from parablock.model.frozen import hold_frozen
from parablock.model.load import load_model

BASE = -1  # the version of a block no round has changed: the base model's own value


@dataclass
class _Entry:
    tensors: dict[str, torch.Tensor]
    holders: set[int] = field(default_factory=set)
    pinned: bool = False  # the base's value (version -1): kept while the store lives


class BlockStore:
    """Canonical tensors per (block, version), held by client ids; thread-safe (each client
    runs on its own threads, and a crashed client is rebuilt on another)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._held: dict[int, dict[int, int]] = {}  # holder -> block -> version

    def pin(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        """The base model's value of ``block`` (version -1), kept for good; the first pin wins."""
        with self._lock:
            self._entries.setdefault((block, BASE), _Entry(dict(tensors), pinned=True))

    def hold(
        self, holder: int, block: int, version: int, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        key = (block, version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry({n: t.detach() for n, t in tensors.items()})
            else:
                _check_same(entry.tensors, tensors, f"block {block} v{version} from {holder}")
            previous = self._held.setdefault(holder, {}).get(block)
            entry.holders.add(holder)
            self._held[holder][block] = version
            if previous is not None and previous != version:
                self._drop(holder, (block, previous))
            return dict(entry.tensors)

    def release(self, holder: int, block: int) -> None:
        with self._lock:
            version = self._held.get(holder, {}).pop(block, None)
            if version is not None:
                self._drop(holder, (block, version))

    def release_all(self, holder: int) -> None:
        """Everything ``holder`` held (a client that is rebuilt starts from the base model)."""
        with self._lock:
            for block, version in self._held.pop(holder, {}).items():
                self._drop(holder, (block, version))

    def _drop(self, holder: int, key: tuple[int, int]) -> None:
        entry = self._entries[key]
        entry.holders.discard(holder)
        if not entry.holders and not entry.pinned:
            del self._entries[key]

    def holders(self) -> dict[tuple[int, int], frozenset[int]]:
        """Who holds each (block, version) the store keeps (pinned base values included)."""
        with self._lock:
            return {k: frozenset(e.holders) for k, e in self._entries.items()}

    def tensors(self, block: int, version: int) -> dict[str, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get((block, version))
            return None if entry is None else dict(entry.tensors)


def _check_same(held: dict[str, torch.Tensor], offered: dict[str, torch.Tensor], what: str):
    """``offered`` is bit for bit ``held`` (the same global value, and no one wrote it)."""
    if set(held) != set(offered):
        raise SharedBlockError(f"{what}: tensor names differ from the held ones")
    for n, t in offered.items():
        h = held[n]
        same = h.dtype == t.dtype and h.shape == t.shape
        if same:
            same = torch.equal(h.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        if not same:
            raise SharedBlockError(f"{what}: {n} differs from the value other clients hold")


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
        store: BlockStore | None = None,
        frozen_dtype: str = "fp32",
        block_size: int = 1,
    ) -> nn.Module:
        """A client's model. With ``store`` (the client copies a block before writing it) its
        trained blocks are new parameters on the base's storage too, and their base values
        are pinned in the store as version -1; without, they are the client's own copies."""
        with self._lock:
            base = self._bases.get((path, frozen_dtype))
            fresh = base is None
            if fresh:
                base = self._bases[(path, frozen_dtype)] = load_model(path)
            # the run's block indices
            blocks = protocol_blocks(base, algorithm, extra_blocks, block_size=block_size)
            own = {n for b in trained for n in blocks[b].param_names}
            if fresh:  # one conversion, shared by every client (the same run trains the same)
                hold_frozen(base, path, own, frozen_dtype)
            # deepcopy takes what the memo already holds as is: those parameters stay shared
            memo = {id(p): p for n, p in base.named_parameters() if n not in own}
            if store is not None:
                params = dict(base.named_parameters())
                for b in trained:
                    store.pin(b, {n: params[n].data for n in blocks[b].param_names})
                for n in own:  # ``.data``: the new parameter gets a version counter of its own
                    memo[id(params[n])] = nn.Parameter(params[n].data, params[n].requires_grad)
            return copy.deepcopy(base, memo)
