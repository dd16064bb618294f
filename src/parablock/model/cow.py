"""Copy on write of a client's trained blocks, for clients that share one process.

A client's copy differs from the global model on at most two blocks: the one it trains now and,
with ParaBlock, the one whose delta is in flight until the barrier's correction (FedBCD: one). On
every other block it holds the global value at a version it knows, the same bits in every client.
With a store (``SharedBlocks``, implemented by the local backend's ``backends.shared.BlockStore``)
the clients of one process hold one canonical copy of each such (block, version). A client's
parameters stay its own objects (``requires_grad``, ``.grad`` and the version counter are per
client); only their ``.data`` is the store's tensor. Every write to a trained block goes through ``BlockWriter``:

- ``write_global(b, version, tensors)``: block b becomes the global value at ``version`` (a join's
  download, a catch-up, the correction). With a store the parameters are rebound to the store's
  tensors for (b, version), which the first client to offer them provides; a later client's own
  copy (the same bits: the store checks) is dropped. Without a store: written in place, as always.
- ``own(b)``: before the client writes block b in place (training, a checkpoint's dirty block) it
  takes private copies and lets go of the shared ones (which training then keeps, unwritten, as
  the value it started from).

So no in-place write ever reaches a shared tensor. A block the client has not written since it was
built counts as shared: its model may have it on the base model's tensors (``FrozenShare``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from parablock.model.blocks import Block, check_block, set_block


class SharedBlocks(Protocol):
    """Canonical tensors per (block, version), held by clients (by id)."""

    def hold(
        self, holder: int, block: int, version: int, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The canonical tensors for (block, version) (``tensors`` if it is the first offer),
        now held by ``holder`` instead of whatever it held of ``block`` before."""
        ...

    def release(self, holder: int, block: int) -> None:
        """``holder`` no longer holds anything of ``block``."""
        ...


class BlockWriter:
    """How one client writes its blocks: in place when alone, copy on write with a store."""

    def __init__(
        self, model: nn.Module, blocks: list[Block], holder: int, store: SharedBlocks | None = None
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.holder = holder
        self.store = store
        self.private: set[int] = set()  # blocks on this client's own tensors (with a store)

    def write_global(self, block: int, version: int, tensors: dict[str, torch.Tensor]) -> None:
        b = self.blocks[block]
        if self.store is None:
            set_block(self.model, b, tensors)
            return
        params = check_block(self.model, b, tensors)
        offered = {n: t.detach().to(params[n].dtype) for n, t in tensors.items()}
        canonical = self.store.hold(self.holder, block, version, offered)
        for n, t in canonical.items():
            p = params[n]
            p.data = t
            # The rebinding keeps ``p``'s own version counter; move it as an in-place write
            # would, so anything keyed on it (the prefix cache) sees that the block changed.
            torch.autograd.graph.increment_version(p)
        self.private.discard(block)

    def own(self, block: int) -> dict[str, torch.Tensor] | None:
        """Make block ``block``'s tensors this client's own before it writes them in place.

        Returns the shared tensors it lets go of, a value of the block that nobody writes
        (training keeps it as the value it started from instead of copying it once more), or
        None when the block was the client's own already."""
        if self.store is None or block in self.private:
            return None
        params = dict(self.model.named_parameters())
        shared = {}
        for n in self.blocks[block].param_names:
            shared[n] = params[n].data
            params[n].data = shared[n].clone()
        self.store.release(self.holder, block)
        self.private.add(block)
        return shared
