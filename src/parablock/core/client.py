"""A federated client: its own model copy, private data, a computation thread and a communication
thread. The algorithms (``algorithms.py``) decide how the primitives here are ordered in time.

Primitives: ``compute`` trains the round's block and keeps the delta as the pending upload;
``communicate`` uploads it, waits for the round's aggregate and downloads it; ``correct`` applies
the block-level correction. All of them record spans and per-round numbers in ``self.log``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

from parablock.core.aggregate import apply
from parablock.core.blocks import Block, block_state, set_block
from parablock.core.checkpoint import CheckpointStore, ClientState
from parablock.core.correction import Correction
from parablock.core.messages import BlockUpdate, BlockValue
from parablock.core.metrics import ClientLog, RoundRecord
from parablock.core.train import TrainSettings, train_block
from parablock.data.examples import Example, round_indices
from parablock.errors import UpdateRejected
from parablock.transport.inprocess import Connection

log = logging.getLogger(__name__)


class Client:
    def __init__(
        self,
        client_id: int,
        model: nn.Module,
        blocks: list[Block],
        data: list[Example],
        settings: TrainSettings,
        connection: Connection,
        correction: Correction,
        *,
        seed: int,
        pad_id: int,
        on_barrier: Callable[[Client, int], None] | None = None,
        checkpoint: CheckpointStore | None = None,
        resume: ClientState | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if not data:
            raise ValueError(f"client {client_id} has no training data")
        self.id = client_id
        self.model = model
        self.blocks = blocks
        self.data = data
        self.settings = settings
        self.connection = connection
        self.correction = correction
        self.seed = seed
        self.pad_id = pad_id
        self.on_barrier = on_barrier
        self.versions = {b.index: -1 for b in blocks}  # last global version known per block
        self.plan: list[int] = []
        self.pending: BlockUpdate | None = None  # the trained delta not yet uploaded
        self.dirty: set[int] = set()  # blocks where this copy differs from the known global
        self.start_round = 0
        self.checkpoint = checkpoint
        self.resume = resume
        self.stop = stop
        self.log = ClientLog(client_id)
        self._comm = ThreadPoolExecutor(1, thread_name_prefix=f"client{client_id}-comm")

    # -- lifecycle ---------------------------------------------------------------------------
    def join(self) -> None:
        """Get the round plan and catch up on every block whose global version we lack."""
        plan, values, _ = self.connection.join(self.id, self.versions)
        for v in values:
            set_block(self.model, self.blocks[v.block], v.tensors)
            self.versions[v.block] = v.version
        self.plan = plan
        if self.resume is not None:
            self._restore(self.resume)
            self.resume = None

    def _restore(self, state: ClientState) -> None:
        for b, tensors in state.dirty.items():
            set_block(self.model, self.blocks[b], tensors)
        self.dirty = set(state.dirty)
        self.versions = dict(state.versions)
        self.pending = state.pending
        self.log.rounds = list(state.records)
        self.log.spans = list(state.spans)
        self.start_round = state.round + 1

    def state(self, round: int) -> ClientState:
        """Everything needed to continue after barrier ``round`` (copies, safe to write later)."""
        return ClientState(
            self.id,
            round,
            dict(self.versions),
            self.pending,
            {b: block_state(self.model, self.blocks[b]) for b in sorted(self.dirty)},
            list(self.log.rounds),
            list(self.log.spans),
        )

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def close(self) -> None:
        self._comm.shutdown(wait=True)

    # -- primitives ----------------------------------------------------------------------------
    def compute(self, round: int, record: RoundRecord) -> BlockUpdate:
        """Train the round's block from the current model; leave global + delta in place."""
        block = self.blocks[self.plan[round]]
        batches = round_indices(
            len(self.data), round, self.settings.steps, self.settings.batch_size, self.seed
        )
        with self.log.span(round, "compute", record):
            result = train_block(self.model, block, self.data, batches, self.settings, self.pad_id)
            # Hold exactly base + delta (the server's own formula), so that with identical
            # updates the stale copy equals the aggregate bit for bit.
            set_block(self.model, block, apply(result.before, result.delta, 1.0))
        self.dirty.add(block.index)
        record.train_loss = result.loss
        record.examples = result.num_examples
        return BlockUpdate(
            self.id,
            round,
            block.index,
            self.versions[block.index],
            result.num_examples,
            result.loss,
            {n: t.cpu() for n, t in result.delta.items()},  # messages carry CPU tensors
        )

    def communicate(self, pending: BlockUpdate, record: RoundRecord) -> BlockValue:
        """Upload a pending delta, wait for its round's aggregate, download it."""
        round = pending.round
        with self.log.span(round + 1, "upload", record):
            try:
                record.bytes_up += self.connection.upload(pending)
            except UpdateRejected as e:
                log.warning("client %d: round %d update rejected: %s", self.id, round, e)
        with self.log.span(round + 1, "wait", record):
            payload = self.connection.wait_aggregate(round)
        with self.log.span(round + 1, "download", record):
            value = self.connection.download(payload)
        record.bytes_down += len(payload)
        return value

    def communicate_async(self, pending: BlockUpdate, record: RoundRecord) -> Future[BlockValue]:
        return self._comm.submit(self.communicate, pending, record)

    def correct(self, value: BlockValue) -> None:
        """Block-level correction for the block that was in flight."""
        self.versions[value.block] = value.version
        if self.correction.apply_global:
            set_block(self.model, self.blocks[value.block], value.tensors)
            self.dirty.discard(value.block)

    def barrier(self, record: RoundRecord) -> None:
        record.end = time.time()
        record.round_s = record.end - record.start
        self.log.rounds.append(record)
        if self.checkpoint is not None and not record.drain:
            self.checkpoint.save_client(self.state(record.round))
        if self.on_barrier is not None:
            self.on_barrier(self, record.round)

    def new_record(self, round: int, drain: bool = False) -> RoundRecord:
        block = self.plan[round] if round < len(self.plan) else -1
        return RoundRecord(self.id, round, block, start=time.time(), drain=drain)
