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
from parablock.core.forward import BlockForward, first_trained_layer
from parablock.core.messages import BlockUpdate, BlockValue, Expected
from parablock.core.metrics import ClientLog, RoundRecord
from parablock.core.protocol import (
    BEHIND,
    PROTOCOL,
    JoinReply,
    JoinRequest,
    RecordReport,
    RoundReport,
    SpanReport,
)
from parablock.core.train import TrainSettings, train_block
from parablock.data.examples import Example, round_indices
from parablock.errors import ClientBehind, DataError, UpdateRejected
from parablock.transport import ServerConnection

log = logging.getLogger(__name__)


class Client:
    def __init__(
        self,
        client_id: int,
        model: nn.Module,
        blocks: list[Block],
        data: list[Example],
        settings: TrainSettings,
        connection: ServerConnection,
        correction: Correction,
        *,
        seed: int,
        pad_id: int,
        on_barrier: Callable[[Client, int], None] | None = None,
        checkpoint: CheckpointStore | None = None,
        resume: ClientState | None = None,
        stop: threading.Event | None = None,
        fingerprint: str = "",
    ) -> None:
        if not data:
            raise DataError(f"client {client_id} has no training data")
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
        self.turns: list[int] = []  # the client that trains each round ([] = every client)
        self.pending: BlockUpdate | None = None  # the trained delta not yet uploaded
        self.dirty: set[int] = set()  # blocks where this copy differs from the known global
        self.start_round = 0
        self.checkpoint = checkpoint
        self.resume = resume
        self.stop = stop
        self.fingerprint = fingerprint  # of the base model, checked by a network server
        self.log = ClientLog(client_id)
        self._reported_spans = 0
        self._forward: BlockForward | None = None  # built at the first compute (needs the plan)
        self._comm = ThreadPoolExecutor(1, thread_name_prefix=f"client{client_id}-comm")

    # -- lifecycle ---------------------------------------------------------------------------
    def join_request(self) -> JoinRequest:
        """What this client holds: block versions and, after a restart, its checkpoint's state."""
        self.restore()
        return JoinRequest(
            PROTOCOL,
            self.id,
            self.fingerprint,
            dict(self.versions),
            self.start_round,
            -1 if self.pending is None else self.pending.round,
            sorted(self.dirty),
        )

    def join(self, reply: JoinReply | None = None) -> None:
        """Join (or rejoin): take the round plan and catch up on every block that moved."""
        if reply is None:
            reply = self.connection.join(self.join_request())
        if not reply.keep_pending and self.pending is not None:
            log.info(
                "client %d: its round %d delta is too late; catching up",
                self.id,
                self.pending.round,
            )
            self.pending = None
        for b, version in sorted(reply.stale.items()):
            value, _ = self.connection.download(b, version, self._expected(b))
            set_block(self.model, self.blocks[b], value.tensors)
            self.versions[b] = value.version
            self.dirty.discard(b)
        self.plan = list(reply.settings.plan)
        self.turns = list(reply.settings.turns)
        self.start_round = reply.start_round

    def _expected(self, block: int) -> Expected:
        params = dict(self.model.named_parameters())
        return {
            n: (tuple(params[n].shape), params[n].dtype) for n in self.blocks[block].param_names
        }

    def restore(self) -> None:
        """Apply the checkpoint state this client was built with (once)."""
        if self.resume is not None:
            self._restore(self.resume)
            self.resume = None

    def _restore(self, state: ClientState) -> None:
        """Continue from a checkpoint. The model is the freshly loaded base model plus the dirty
        blocks the checkpoint holds, so every other block counts as the base (-1) until the join
        downloads its global value."""
        for b, tensors in state.dirty.items():
            set_block(self.model, self.blocks[b], tensors)
        self.dirty = set(state.dirty)
        self.versions = {
            b: state.versions.get(b, -1) if b in self.dirty else -1 for b in self.versions
        }
        self.pending = state.pending
        self.log.rounds = list(state.records)
        self.log.spans = list(state.spans)
        self._reported_spans = len(self.log.spans)
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
        self.connection.close()

    # -- primitives ----------------------------------------------------------------------------
    def compute(self, round: int, record: RoundRecord) -> BlockUpdate:
        """Train the round's block from the current model; leave global + delta in place."""
        block = self.blocks[self.plan[round]]
        batches = round_indices(
            len(self.data), round, self.settings.steps, self.settings.batch_size, self.seed
        )
        with self.log.span(round, "compute", record):
            result = train_block(
                self.model, block, self.data, batches, self.settings, self.pad_id, self.forward()
            )
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

    def forward(self) -> BlockForward:
        """The loss computation, kept across rounds: it holds the prefix cache, which starts at
        the lowest layer this client's plan ever trains."""
        if self._forward is None:
            start = first_trained_layer(self.model, self.blocks, set(self.plan))
            self._forward = self.settings.forward(self.model, start)
            log.info(
                "client %d: %s forward, %s",
                self.id,
                self._forward.precision,
                f"prefix cache from layer {start}"
                if self._forward.cache is not None
                else "no prefix cache",
            )
        return self._forward

    def communicate(self, pending: BlockUpdate, record: RoundRecord) -> BlockValue:
        """Upload a pending delta, wait for its round's aggregate, download it."""
        round = pending.round
        with self.log.span(round + 1, "upload", record):
            try:
                record.bytes_up += self.connection.upload(pending)
            except UpdateRejected as e:
                log.warning("client %d: round %d update rejected: %s", self.id, round, e)
                if BEHIND in str(e):
                    raise ClientBehind(
                        f"client {self.id}: round {round} closed without it"
                    ) from None
        with self.log.span(round + 1, "wait", record):
            ready = self.connection.wait_aggregate(round)
        with self.log.span(round + 1, "download", record):
            value, nbytes = self.connection.download(
                ready.block, ready.version, self._expected(ready.block)
            )
        record.bytes_down += nbytes
        return value

    def catch_up(self, round: int, record: RoundRecord) -> None:
        """Bring this copy to the global model after round ``round - 1`` (the caller knows every
        earlier round is aggregated): download each block that a round since its copy moved."""
        latest = {b: r for r, b in enumerate(self.plan[:round])}  # block -> its global version
        stale = {b: v for b, v in latest.items() if self.versions[b] != v or b in self.dirty}
        if not stale:
            return
        with self.log.span(round, "download", record):
            for b, version in sorted(stale.items()):
                value, nbytes = self.connection.download(b, version, self._expected(b))
                set_block(self.model, self.blocks[b], value.tensors)
                self.versions[b] = value.version
                self.dirty.discard(b)
                record.bytes_down += nbytes

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
        self.report(record)
        if self.on_barrier is not None:
            self.on_barrier(self, record.round)

    def report(self, record: RoundRecord, final: bool = False) -> None:
        """Tell the server this round's record and the spans since the last report."""
        with self.log._lock:
            spans = self.log.spans[self._reported_spans :]
            self._reported_spans = len(self.log.spans)
        fields = {k: getattr(record, k) for k in RecordReport.__dataclass_fields__}
        if fields["train_loss"] != fields["train_loss"]:  # NaN (drain rounds): JSON has none
            fields["train_loss"] = None
        self.connection.report(
            RoundReport(
                RecordReport(**fields),
                [SpanReport(s.round, s.phase, s.start, s.end) for s in spans],
                final,
            )
        )

    def new_record(self, round: int, drain: bool = False) -> RoundRecord:
        block = self.plan[round] if round < len(self.plan) else -1
        return RoundRecord(self.id, round, block, start=time.time(), drain=drain)
