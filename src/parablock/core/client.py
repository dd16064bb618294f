"""A federated client: its own model copy, private data, a computation thread and a communication
thread. The algorithms (``algorithms.py``) decide how the primitives here are ordered in time.

Primitives: ``compute`` trains the round's block and keeps the delta as the pending upload;
``communicate`` uploads it, waits for the round's aggregate and downloads it (``send`` then
``fetch``; in full duplex ``send_async`` runs the two on separate threads, ``core/overlap.py``);
``correct`` applies the block-level correction. All of them record spans and per-round numbers in
``self.log``.

With a lossy ``link.compression`` the pending delta is kept in the codec's wire form (quantised
once, with this client's error feedback for the block), and the client keeps the global value of
the block it trained from until that round's aggregate arrives: the server then sends the
compressed aggregate, which the client applies to that value with the server's own formula.

Clients that share a process may share the blocks that equal the global model (``core/cow.py``);
every write to a block goes through ``self.writer``, and ``self.gate`` (optional) bounds how many
clients run a training step at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager

from torch import nn

from parablock.core.aggregate import apply
from parablock.core.checkpoint import CheckpointStore, ClientState
from parablock.core.correction import Correction
from parablock.core.metrics import ClientLog, RoundRecord
from parablock.core.overlap import DuplexLink, ElasticBatches, InFlight
from parablock.core.pipeline import client_pipeline
from parablock.core.privacy import SitePrivacy
from parablock.core.secure import Mask, SecureClient
from parablock.data.examples import Example, round_batches, round_indices
from parablock.errors import ClientBehind, DataError, UpdateRejected
from parablock.model.blocks import Block, block_state, set_block
from parablock.model.cow import BlockWriter, SharedBlocks
from parablock.model.devices import to_host
from parablock.model.forward import BlockForward, first_trained_layer
from parablock.model.train import Moments, TrainSettings, train_block
from parablock.wire.compress import CODECS, ErrorFeedback
from parablock.wire.messages import BlockUpdate, BlockValue, Expected, MessageError
from parablock.wire.protocol import (
    BEHIND,
    MAX_REPORT_SPANS,
    PROTOCOL,
    AggregateReady,
    JoinReply,
    JoinRequest,
    Overlap,
    RecordReport,
    RoundReport,
    SpanReport,
)
from parablock.wire.seams import ServerConnection

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
        slowdown: float = 1.0,
        compression: str = "none",
        server_lr: float = 1.0,
        clip_norm: float = 0.0,
        privacy: SitePrivacy | None = None,
        overlap: Overlap | None = None,
        store: SharedBlocks | None = None,
        gate: AbstractContextManager | None = None,
        secure: SecureClient | None = None,
    ) -> None:
        if not data:
            raise DataError(f"client {client_id} has no training data")
        if not 1.0 <= slowdown < float("inf"):
            raise ValueError(f"client {client_id}: compute slow-down must be >= 1, got {slowdown}")
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
        # optimizer_state=per_block: each trained block's AdamW state, on the host between visits
        self.moments: dict[int, Moments] = {}
        self.start_round = 0
        self.checkpoint = checkpoint
        self.resume = resume
        self.stop = stop
        self.fingerprint = fingerprint  # of the base model, checked by a network server
        self.slowdown = slowdown  # each compute takes this many times its measured time
        self.codec = CODECS.get(compression)  # the server's link.compression
        self.server_lr = server_lr
        self.feedback = ErrorFeedback(self.codec)  # residuals of this client's uploads
        # privacy.mode other than none: its mechanism and this site's ledger (core/privacy.py)
        self.privacy = privacy
        # privacy.secure_aggregation: its keys, and the masking stage after clipping and noise
        self.secure = secure
        if secure is not None:
            secure.connection = connection
        # what a trained delta passes through before it leaves (core/pipeline.py)
        self.pipeline = client_pipeline(
            self.feedback,
            clip_norm,
            seed,
            client_id,
            [
                *(privacy.stages() if privacy is not None else []),
                *([Mask(secure)] if secure is not None else []),
            ],
        )
        self.bases: dict[int, dict] = {}  # round -> the global block value its delta is from
        self._sent: dict[int, BlockUpdate] = {}  # round -> the update ``send`` uploaded
        self.overlap = overlap or Overlap()  # off: exactly local_steps, half duplex
        self.log = ClientLog(client_id)
        self._reported_spans = 0
        self._forward: BlockForward | None = None  # built at the first compute (needs the plan)
        self._comm = ThreadPoolExecutor(1, thread_name_prefix=f"client{client_id}-comm")
        self._duplex: DuplexLink | None = None  # full duplex's two threads, made when first used
        # Every write to a block goes through it: in place, or copy on write with a ``store``
        # of the blocks that equal the global model, shared with other clients (``core/cow.py``).
        self.writer = BlockWriter(model, blocks, client_id, store)
        self.gate = gate  # held around each training step: how many clients step at once

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
            self.bases.clear()
        for b, version in sorted(reply.stale.items()):
            value, _ = self.connection.download(b, version, self._expected(b))
            self.writer.write_global(b, value.version, value.tensors)
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
            self.writer.own(b)
            set_block(self.model, self.blocks[b], tensors)
        self.dirty = set(state.dirty)
        self.versions = {
            b: state.versions.get(b, -1) if b in self.dirty else -1 for b in self.versions
        }
        self.pending = state.pending
        self.feedback.residuals = dict(state.residuals)
        self.moments = dict(state.moments)
        if state.pending is not None and state.base is not None:
            self.bases = {state.pending.round: state.base}
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
            # in full duplex the next round's upload may have begun already: not this barrier's
            [s for s in list(self.log.spans) if s.round <= round],
            dict(self.feedback.residuals),
            self.bases.get(self.pending.round) if self.pending is not None else None,
            self.privacy.ledger.to_json() if self.privacy is not None else [],
            dict(self.moments),  # replaced, never written, by a later visit: safe to keep
        )

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def close(self) -> None:
        self._comm.shutdown(wait=True)
        if self._duplex is not None:
            self._duplex.close()
        self.connection.close()

    # -- primitives ----------------------------------------------------------------------------
    def compute(
        self, round: int, record: RoundRecord, busy: Callable[[], bool] | None = None
    ) -> BlockUpdate:
        """Train the round's block from the current model; leave global + delta in place.

        ``busy``: with ``overlap.local_steps_max``, keep taking steps beyond ``local_steps`` (up
        to ``local_steps_max``) while it says the link is still busy."""
        block = self.blocks[self.plan[round]]
        s = self.settings
        dp = self.privacy.dp_step(round, len(self.data)) if self.privacy is not None else None
        if dp is not None:  # DP-SGD: Poisson batches, as the accountant assumes
            batches = self.privacy.batches(round, len(self.data))
        elif busy is not None and self.overlap.local_steps_max > s.steps:
            stream = round_batches(len(self.data), round, s.steps, s.batch_size, self.seed)
            batches = ElasticBatches(stream, s.steps, self.overlap.local_steps_max, busy)
        else:
            batches = round_indices(len(self.data), round, s.steps, s.batch_size, self.seed)
        with self.log.span(round, "compute", record):
            started = time.perf_counter()
            shared = self.writer.own(block.index)  # training writes it in place
            result = train_block(
                self.model,
                block,
                self.data,
                batches,
                self.settings,
                self.pad_id,
                self.forward(),
                self.gate,
                before=shared,
                dp=dp,
                round=round,
                moments=self.moments.get(block.index),
            )
            if result.moments is not None:
                self.moments[block.index] = result.moments
            # Hold exactly base + delta (the server's own formula), so that with identical
            # updates the stale copy equals the aggregate bit for bit.
            set_block(self.model, block, apply(result.before, result.delta, 1.0))
            if self.slowdown > 1.0:  # a slower device, for studies: inside the span
                time.sleep((self.slowdown - 1.0) * (time.perf_counter() - started))
        self.dirty.add(block.index)
        record.train_loss = result.loss
        record.examples = result.num_examples
        record.steps = batches.taken if isinstance(batches, ElasticBatches) else len(batches)
        # the client's stages (core/pipeline.py: clipping, noise, then the codec); CPU tensors
        delta = self.pipeline(to_host(result.delta), round, block.index)
        if self.codec.lossy:  # the aggregate will come as a change from the value it trained from
            self.bases[round] = to_host(result.before)
        examples, loss = result.num_examples, result.loss
        if self.privacy is not None:  # what leaves the site: public numbers only
            record.epsilon = self.privacy.spent(round, len(self.data))
            examples, loss = s.steps * s.batch_size, 0.0
        return BlockUpdate(
            self.id, round, block.index, self.versions[block.index], examples, loss, delta
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
        return self.fetch(self.send(pending, record), record)

    def send(self, pending: BlockUpdate, record: RoundRecord) -> AggregateReady:
        """Upload a pending delta and wait until its round's aggregate exists."""
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
            while ready.reveal:  # secure aggregation after a dropout: open what it asks for
                self.connection.secagg(self.secure.reveal(round, ready.reveal))
                ready = self.connection.wait_aggregate(round)
        self._sent[round] = pending  # its base tells ``fetch`` how to read a compressed aggregate
        return ready

    def fetch(self, ready: AggregateReady, record: RoundRecord) -> BlockValue:
        """Download the aggregate ``ready`` announces (round ``ready.version``'s)."""
        round = ready.version
        pending = self._sent.pop(round, None)
        base = None
        if pending is not None and ready.block == pending.block:
            base = self.bases.get(round)
        base_version = -1 if pending is None else pending.base_version
        with self.log.span(round + 1, "download", record):
            value, nbytes = self.connection.download(
                ready.block,
                ready.version,
                self._download_layout(ready.block, base is not None),
                None if base is None else base_version,
            )
            value = self._resolve(value, base_version, base)
        record.bytes_down += nbytes
        self.bases.pop(round, None)
        return value

    def _download_layout(
        self, block: int, compressed: bool
    ) -> Expected | Callable[[dict], Expected]:
        """What a download may hold: the block's value, or (when this client can apply one) a
        compressed aggregate in the codec's wire form."""
        value = self._expected(block)
        if not compressed:
            return value
        wire = self.codec.layout({n: shape for n, (shape, _) in value.items()})
        return lambda meta: wire if "base_version" in meta else value

    def _resolve(self, value: BlockValue, base_version: int, base: dict | None) -> BlockValue:
        """The block's global value: as sent, or the compressed aggregate applied to ``base``
        (the global value at ``base_version``) with the server's own decode and formula."""
        if value.base_version is None:
            return value
        if base is None or value.base_version != base_version:
            raise MessageError(
                f"client {self.id}: block {value.block} v{value.version} came as a change from "
                f"v{value.base_version}, but this client holds v{base_version}"
            )
        shapes = {n: tuple(t.shape) for n, t in base.items()}
        delta = self.codec.decode(value.tensors, shapes)
        return BlockValue(value.block, value.version, apply(base, delta, self.server_lr))

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
                self.writer.write_global(b, value.version, value.tensors)
                self.versions[b] = value.version
                self.dirty.discard(b)
                record.bytes_down += nbytes

    def communicate_async(self, pending: BlockUpdate, record: RoundRecord) -> Future[BlockValue]:
        return self._comm.submit(self.communicate, pending, record)

    def send_async(self, pending: BlockUpdate, record: RoundRecord) -> InFlight:
        """Full duplex: ``send`` on the upload thread, then ``fetch`` on the download thread."""
        if self._duplex is None:
            self._duplex = DuplexLink(self.id, self.send, self.fetch)
        return self._duplex.send(pending, record)

    def correct(self, value: BlockValue) -> None:
        """Block-level correction for the block that was in flight."""
        self.versions[value.block] = value.version
        if self.correction.apply_global:
            self.writer.write_global(value.block, value.version, value.tensors)
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
        if fields["train_loss"] != fields["train_loss"] or self.privacy is not None:
            fields["train_loss"] = None  # NaN (drain rounds): JSON has none; private: not told
        report = RoundReport(
            RecordReport(**fields),
            [SpanReport(s.round, s.phase, s.start, s.end) for s in spans[-MAX_REPORT_SPANS:]],
            final,
        )
        try:
            self.connection.report(report)
        except MessageError as e:  # the server keeps less of this round's timings; train on
            log.warning("client %d: round %d report refused: %s", self.id, record.round, e)

    def new_record(self, round: int, drain: bool = False) -> RoundRecord:
        block = self.plan[round] if round < len(self.plan) else -1
        return RoundRecord(self.id, round, block, start=time.time(), drain=drain)
