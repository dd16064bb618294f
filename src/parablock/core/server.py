"""The server: the global model and its per-block versions, behind the ``ServerEndpoint`` seam.

Transport-agnostic: it takes bytes (or chunks of them) and typed control messages, and the caller
says which client is speaking (a network transport takes that from the authenticated session,
never from the payload). ``Server`` is the seam's one implementation; the gRPC service, the Ray
backend's server actor and the Flower relay all drive it through ``wire.seams.ServerEndpoint``.
It is split by role, one file each, sharing one lock:

- ``participation.py``: joins and rejoins, who is expected in which round, drops, deadlines;
- ``aggregation.py``: from an update received to its round's aggregate committed (validation,
  the delta pipeline, versions);
- ``service.py``: block downloads and the clients' reports;
- ``unmasking.py``: secure aggregation's exchange and dropout recovery (``core/secure.py``).

This file holds what ties them: the state they share, waiting for an aggregate, stopping, and
the copy a Ray actor hosts.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from parablock.core.aggregation import Aggregation
from parablock.core.metrics import ClientLog
from parablock.core.participation import Participation
from parablock.core.pipeline import server_pipeline
from parablock.core.privacy import Ledger, server_privacy
from parablock.core.secure import SecureSum
from parablock.core.service import BlockService
from parablock.core.trust import UpdateBound
from parablock.core.unmasking import Unmasking
from parablock.errors import RoundFailedError, RunStopped
from parablock.model.blocks import Block
from parablock.model.train import lr_factor
from parablock.wire.compress import CODECS, ErrorFeedback
from parablock.wire.messages import BlockUpdate, BlockValue, MessageError
from parablock.wire.protocol import AggregateReady, PrivacySettings, RunSettings

log = logging.getLogger(__name__)


class Rejections:
    """Rejected updates: ``len()`` counts them all, ``recent`` keeps the last reasons (a client
    that floods the server with bad payloads cannot grow this without bound), ``by_client``
    counts per client, ``by_kind`` per kind of reason (``aggregation.Refused``) and
    ``by_round`` per round the update was for (the open round when it named none that exists),
    all since the server started (a resume restores only ``len()``)."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.recent: deque[str] = deque(maxlen=100)
        self.by_client: Counter[int] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.by_round: Counter[int] = Counter()

    def add(self, client: int, reason: str, kind: str = "other", round: int = -1) -> None:
        self.count += 1
        self.recent.append(reason)
        self.by_client[client] += 1
        self.by_kind[kind] += 1
        self.by_round[round] += 1

    def __len__(self) -> int:
        return self.count


@dataclass
class ServerStats:
    accepted: int = 0
    rejected: Rejections = field(default_factory=Rejections)
    clipped: int = 0  # updates scaled down to federation.max_update_norm
    bound_ratio: float = 0.0  # the largest |delta| / honest bound of an accepted update
    epsilon: dict[int, float] = field(default_factory=dict)  # privacy.mode=client: per round
    aggregate_s: dict[int, float] = field(default_factory=dict)
    aggregated_at: dict[int, float] = field(default_factory=dict)  # round -> time.time()
    participants: dict[int, list[int]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    joins: list[tuple[int, int]] = field(default_factory=list)  # (client, start round)


class Server(Participation, Aggregation, BlockService, Unmasking):
    """The global model, its versions, and the roles that serve them (see the module)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[Block],
        plan: list[int],
        *,
        clients: int,
        min_clients: int = 0,
        aggregator: str = "weighted_mean",
        server_lr: float = 1.0,
        trim_fraction: float = 0.1,
        max_client_weight: float = 1.0,
        max_update_norm: float = 0.0,
        update_norm_action: str = "clip",
        update_bound: bool = True,
        round_timeout_s: float = 600.0,
        settings: RunSettings | None = None,
        fingerprint: str = "",
        compression: str = "none",
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.plan = list(plan)
        self.settings = settings  # handed to every client at join
        self.fingerprint = fingerprint  # of the base model; "" = not checked (in-process)
        self.stats = ServerStats()
        self._init_participation(
            clients, min_clients, list(settings.turns) if settings else [], round_timeout_s
        )
        # aggregation: how updates are checked and combined
        self.server_lr = server_lr
        self.max_client_weight = max_client_weight
        self.max_update_norm = max_update_norm
        self.update_norm_action = update_norm_action
        # What one round can use: K steps of B examples (the server's own settings; with
        # local_steps_max, that many steps), so no client can claim more weight than an honest one.
        self.max_examples = (
            settings.overlap().most_steps(settings.local_steps) * settings.batch_size
            if settings
            else 0
        )
        # What an honest update can reach (core/trust.py): every coordinate within what the
        # announced AdamW steps can move it; None without settings (in-process unit tests).
        self.bound = _honest_bound(settings) if update_bound and settings else None
        # link.compression: updates arrive in the codec's wire form and are decoded before any
        # check; each aggregate is sent back compressed too (``_deltas``: round -> the change
        # from the block's previous version), with the server's own error feedback per block.
        self.codec = CODECS.get(compression)
        self.feedback = ErrorFeedback(self.codec)
        # the aggregator, then the server's stages (core/pipeline.py), seeded by the run's seed
        # privacy.mode=client: the noise on the aggregate (at the server unless the clients add
        # it in shares) and the server's ledger, one release per round (core/privacy.py)
        self.privacy = settings.privacy if settings else PrivacySettings()
        self.ledger = Ledger(self.privacy.accountant)
        self.pipeline = server_pipeline(
            aggregator,
            trim_fraction,
            self.feedback,
            self._shapes,
            settings.seed if settings else 0,
            server_privacy(self.privacy),
        )
        # privacy.secure_aggregation: updates arrive masked; the aggregator is their sum mod
        # 2^64, unmasked and decoded (core/secure.py), and dropouts are recovered (unmasking.py)
        self.secure = None
        if self.privacy.secure_aggregation:
            self.secure = SecureSum(self.privacy, clients, settings.client_clip_norm, self._shapes)
            self.pipeline.aggregate_fn = self.secure.aggregate
        self.versions = {b.index: -1 for b in blocks}  # -1: the pretrained value
        self.next_round = 0  # the next round to aggregate
        self._pending: dict[int, dict[int, BlockUpdate]] = {}
        self._aggregates: dict[int, BlockValue] = {}
        self._deltas: dict[int, BlockValue] = {}
        self._failed: dict[int, str] = {}
        # block service and reports
        self.reports: dict[int, ClientLog] = {}  # what clients reported (remote runs)
        self.finished: set[int] = set()  # clients whose final report arrived
        self._span_counts: dict[int, Counter[int]] = {}  # client -> round -> spans reported
        self._cond = threading.Condition()
        self._stopped = False
        self._params = {n: p for n, p in model.named_parameters()}
        # Each is called as listener(round, block, new_value, aggregate_s, participants, residual)
        # after an aggregation, with the lock held (keep them cheap): the run records the
        # aggregate history there (evaluation of past rounds afterwards) and queues checkpoint
        # writes. ``residual``: the block's error-feedback residual ({} without compression),
        # which a checkpoint needs to resume bit for bit.
        self.aggregate_listeners: list[
            Callable[[int, int, dict, float, list[int], dict], None]
        ] = []

    # A copy of the server can be shipped to another process (the Ray backend hosts it in an
    # actor); the lock is not picklable, so the copy gets a fresh one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cond"], state["_params"]
        state["aggregate_listeners"] = []  # they belong to the process that registered them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cond = threading.Condition()
        self._params = {n: p for n, p in self.model.named_parameters()}

    # -- serving aggregates -----------------------------------------------------------------
    def wait_aggregate(
        self,
        round: int,
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
        client: int | None = None,
    ) -> AggregateReady:
        """Block until round's aggregate exists; close the round at its deadline if needed.
        ``alive``: asked about once a second; a caller that is gone (a network call its peer
        cancelled) stops waiting with ``RunStopped``. ``client``: the caller, whom secure
        aggregation may ask to reveal shares instead (``AggregateReady.reveal``)."""
        limit = self.round_timeout_s if timeout is None else timeout
        with self._cond:
            while True:
                ready = self._settled(round, client)
                if ready is not None:
                    return ready
                if alive is not None and not alive():
                    raise RunStopped("the caller is gone")
                left = self._deadline_left(round, limit)
                if left <= 0 and round == self.next_round:
                    self._close_at_deadline(round, limit)
                    continue
                self._cond.wait(timeout=max(0.01, min(1.0, left)))

    def poll_aggregate(self, round: int, client: int | None = None) -> AggregateReady | None:
        """``wait_aggregate`` without waiting: None while the round is still open."""
        with self._cond:
            return self._settled(round, client)

    def _settled(self, round: int, client: int | None = None) -> AggregateReady | None:
        """With the lock held: the round's aggregate, None while it is open, the shares
        ``client`` must reveal first, or the error a waiter gets (stopping, a failed round, no
        such round)."""
        if self._stopped:
            raise RunStopped("the run is stopping")
        if round in self._aggregates or (0 <= round < self.next_round):
            return AggregateReady(self.plan[round], round)
        reveal = self._reveal_for(round, client)
        if reveal is not None:
            return reveal
        failed = [r for r in self._failed if r <= round]
        if failed:  # this round, or one before it that it can never come after
            raise RoundFailedError(self._failed[min(failed)])
        if not 0 <= round < len(self.plan):
            raise MessageError(f"there is no round {round}")
        return None

    def wait_done(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the last round's aggregate; a failed round raises."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.next_round >= len(self.plan) or self._failed or self._stopped,
                timeout=timeout,
            )
            if self._failed:
                raise RoundFailedError(self._failed[min(self._failed)])
            return self.next_round >= len(self.plan)

    def snapshot(self) -> dict:
        """What a metrics endpoint shows, read at once under the lock: counts and seconds,
        never a payload, a token or an address. ``wait_s``: client -> the wait seconds of each
        round it reported; ``epsilon``: the run's epsilon so far (client mode: the server's
        ledger; record mode: the largest a site reported), None without privacy."""
        with self._cond:
            s = self.stats
            joined = {c for c, _ in s.joins}
            wait = {c: [r.wait_s for r in lg.rounds] for c, lg in self.reports.items()}
            sites = [lg.rounds[-1].epsilon for lg in self.reports.values() if lg.rounds]
            sites = [e for e in sites if e is not None]
            epsilon = s.epsilon[max(s.epsilon)] if s.epsilon else max(sites, default=None)
            return {
                "rounds_done": self.next_round,
                "rounds": len(self.plan),
                "clients": self.clients,
                "joins": len(s.joins),
                "drops": len(s.dropped),
                "active": len(joined - self._dropped),
                "accepted": s.accepted,
                "rejected": dict(s.rejected.by_kind),
                "aggregated_at": dict(s.aggregated_at),
                "wait_s": wait,
                "epsilon": epsilon,
            }

    def stop(self) -> None:
        """Wake every waiting client with RunStopped (their last barrier state is saved)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def _honest_bound(s: RunSettings) -> UpdateBound:
    """The bound of the training ``s`` announces: its most steps, each at its scheduled lr (the
    largest over the rounds, for a run-long schedule), with AdamW state carried over the run's
    steps when ``optimizer_state=per_block``."""
    train = s.train_settings()
    steps = s.overlap().most_steps(s.local_steps)
    rounds = range(max(1, len(s.plan))) if s.lr_schedule_scope == "run" else [0]
    lrs = [s.lr * max(lr_factor(k, train, r) for r in rounds) for k in range(steps)]
    carried = len(s.plan) * steps if s.optimizer_state == "per_block" else 0
    bound = UpdateBound.of(lrs, s.weight_decay, carried)
    p = s.privacy
    if p.mode == "client" and p.noise_at == "client":  # a noise share: 12 standard deviations
        std = p.noise_multiplier * p.clip_norm / math.sqrt(max(p.shares, 1))
        bound = replace(bound, noise=12.0 * std)  # (a coordinate passes it with p < 1e-32)
    return bound
