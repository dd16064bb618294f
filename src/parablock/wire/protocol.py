"""Typed control messages between a client and the server (block tensors travel in messages.py).

Every message is a frozen dataclass that crosses as strict JSON: ``from_bytes`` checks that every
field is present, of its declared type and within bounds, and that no other field is there, so a
peer's bytes are never trusted further than their parse. ``PROTOCOL`` changes whenever a message
changes; a client and a server of different protocols refuse each other at join.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from parablock.errors import MessageError
from parablock.model.lora import LoraSettings
from parablock.model.train import TrainSettings
from parablock.wire.messages import parse_json

# 2: RunSettings for [train], compression, LoRA and ParaBlock's overlap; RecordReport.steps
# 3: RunSettings.client_clip_norm
# 4: RunSettings.privacy, JoinRequest.privacy_modes, RecordReport.epsilon
# 5: secure aggregation: PrivacySettings.secagg_*, JoinRequest.secagg_key,
#    AggregateReady.reveal, SecAggCall / SecAggReply
PROTOCOL = 5
MAX_ITEMS = 1 << 16  # no list or map in a control message is longer (plans, versions, spans)
MAX_TEXT = 4096

M = TypeVar("M", bound="Message")


class Message:
    """Base of the JSON control messages: ``to_bytes`` / ``from_bytes`` with strict checking."""

    MAX_BYTES: ClassVar[int] = 4 << 20  # a larger payload is refused before it is parsed

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls: type[M], payload: bytes) -> M:
        if len(payload) > cls.MAX_BYTES:
            raise MessageError(
                f"{cls.__name__}: {len(payload)} bytes is too large (at most {cls.MAX_BYTES})"
            )
        return _build(cls, parse_json(payload, cls.__name__), cls.__name__)

    @classmethod
    def from_dict(cls: type[M], data: Any) -> M:
        return _build(cls, data, cls.__name__)


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise MessageError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    extra = set(data) - names
    if extra:
        raise MessageError(f"{where}: unknown field(s) {sorted(extra)[:5]}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            raise MessageError(f"{where}: missing field {f.name!r}")
        kwargs[f.name] = _value(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MessageError(f"{where}: {e}") from None


def _value(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if type(v) is not bool:
            raise MessageError(f"{where}: expected true/false, got {type(v).__name__}")
        return v
    if tp is int:
        if type(v) is not int or abs(v) > 1 << 62:
            raise MessageError(f"{where}: expected an integer, got {type(v).__name__}")
        return v
    if tp is float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise MessageError(f"{where}: expected a finite number, got {v!r:.40}")
        return float(v)
    if tp is str:
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise MessageError(f"{where}: expected a string of at most {MAX_TEXT} characters")
        return v
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(v, list) or len(v) > MAX_ITEMS:
            raise MessageError(f"{where}: expected a list of at most {MAX_ITEMS} items")
        return [_value(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        key, item = typing.get_args(tp)
        if not isinstance(v, dict) or len(v) > MAX_ITEMS:
            raise MessageError(f"{where}: expected a map of at most {MAX_ITEMS} items")
        out = {}
        for k, x in v.items():
            try:
                kk = int(k) if key is int else k
            except ValueError:
                raise MessageError(f"{where}: key {k!r:.20} is not an integer") from None
            out[kk] = _value(item, x, f"{where}[{k!r:.20}]")
        return out
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, where)
    if isinstance(tp, type) and issubclass(tp, Message):
        return _build(tp, v, where)
    raise MessageError(f"{where}: unsupported field type {tp}")  # a bug in a message definition


@dataclass(frozen=True)
class Overlap:
    """A ParaBlock client's overlap settings (FedBCD has nothing to overlap and ignores them)."""

    local_steps_max: int = 0  # 0: exactly local_steps
    duplex: bool = False

    def most_steps(self, local_steps: int) -> int:
        """The most optimizer steps one round may take (what bounds an update's examples)."""
        return max(local_steps, self.local_steps_max)


PRIVACY_MODES = ("none", "record", "client")


@dataclass(frozen=True)
class PrivacySettings(Message):
    """``[privacy]`` as every client must follow it (``core/privacy.py``); the noise multiplier
    is the one the run uses (``privacy.target_epsilon`` has been turned into it already)."""

    mode: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    noise_at: str = "server"
    accountant: str = "rdp"
    physical_batch: int = 8
    max_epsilon: float = 0.0  # 0: no hard stop
    shares: int = 1  # noise_at=client: the clients whose noise shares make up the whole
    # secure aggregation (core/secure.py): masks on, the threshold, the fixed-point scale bits
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_masks: bool = True
    secagg_scale_bits: int = 32
    secagg_clients: int = 0  # the clients that agree keys: every client of the run

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES or self.noise_at not in ("server", "client"):
            raise ValueError(f"privacy mode {self.mode!r} / noise_at {self.noise_at!r}")
        if self.accountant not in ("rdp", "prv") or self.physical_batch < 1:
            raise ValueError(f"privacy accountant {self.accountant!r}")
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
            raise ValueError("privacy clip_norm, noise_multiplier or delta out of range")

    @property
    def private(self) -> bool:
        return self.mode != "none"

    def secagg_range(self, client_clip_norm: float) -> float:
        """R, the bound of every coordinate secure aggregation encodes: the clip bound C a
        client applied (client mode's, else ``client_clip_norm``; 0: none), plus 12 standard
        deviations of a noise share when clients add one (passed with p < 1e-32)."""
        if self.mode != "client":
            return client_clip_norm
        bound = self.clip_norm
        if self.noise_at == "client":
            bound += 12.0 * self.noise_multiplier * self.clip_norm / math.sqrt(max(self.shares, 1))
        return bound


@dataclass(frozen=True)
class RunSettings(Message):
    """What the server decides for every client, handed out at join."""

    algorithm: str
    correction: str
    plan: list[int]  # block of each round
    extra_blocks: str
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    grad_clip: float
    seed: int
    max_length: int
    train_size: int
    label_field: str
    # how a client computes its step ([train]); the defaults are today's plain fp32 step
    precision: str = "fp32"
    prefix_cache_mb: float = 0.0
    response_logits: bool = True
    loss_chunk: int = 0
    compression: str = "none"  # link.compression: the wire form of deltas, both ways
    server_lr: float = 1.0  # a compressed aggregate is applied as base + server_lr * delta
    # the LoRA adapter every copy of the model gets (fedit_lora); lora_r = 0: none
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_target_modules: str = ""
    lora_layers: str = "all"

    local_steps_max: int = 0  # 0: exactly local_steps
    duplex: bool = False
    block_size: int = 1  # model.block_size: decoder layers per block
    lr_schedule_scope: str = "round"  # or "run": warm-up and schedule over rounds x steps
    optimizer_state: str = "reset"  # or "per_block": AdamW moments kept per block
    client_clip_norm: float = 0.0  # > 0: each client clips its delta's L2 norm to this
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    # the one client that trains each round, for an algorithm whose clients take turns
    # (``baselines.round_turns``); empty: every client trains every round
    turns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lora()  # an impossible adapter is refused at parse time
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.local_steps_max < 0 or 0 < self.local_steps_max < self.local_steps:
            raise ValueError("local_steps_max must be 0 or at least local_steps")
        if self.lr_schedule_scope not in ("round", "run"):
            raise ValueError(f"lr_schedule_scope {self.lr_schedule_scope!r}")
        if self.optimizer_state not in ("reset", "per_block"):
            raise ValueError(f"optimizer_state {self.optimizer_state!r}")

    def lora(self) -> LoraSettings | None:
        if self.lora_r == 0:
            return None
        return LoraSettings(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            self.lora_target_modules,
            self.lora_layers,
        )

    def overlap(self) -> Overlap:
        """How a ParaBlock client overlaps beyond its two threads (``core/overlap.py``)."""
        return Overlap(self.local_steps_max, self.duplex)

    def train_settings(self) -> TrainSettings:
        """The local training part, as ``core.train`` takes it."""
        return TrainSettings(
            self.local_steps,
            self.batch_size,
            self.lr,
            self.weight_decay,
            self.warmup_steps,
            self.lr_schedule,
            self.grad_clip,
            self.precision,
            self.prefix_cache_mb,
            self.response_logits,
            self.loss_chunk,
            lr_schedule_scope=self.lr_schedule_scope,
            rounds=len(self.plan),
            optimizer_state=self.optimizer_state,
        )


@dataclass(frozen=True)
class JoinRequest(Message):
    """A client asks to take part; a restarted client says what its checkpoint holds."""

    protocol: int
    client: int  # the id it claims; a network server checks it against the session's token
    fingerprint: str  # of the client's base model weights ("" in-process: same object)
    versions: dict[int, int] = field(default_factory=dict)  # block -> global version held
    next_round: int = 0  # the round it would train next (0 on a fresh start)
    pending_round: int = -1  # the round of the trained delta it has not uploaded yet, or -1
    dirty: list[int] = field(default_factory=list)  # blocks where its copy differs from global
    # the privacy modes this client can follow; a server whose run needs another refuses it
    privacy_modes: list[str] = field(default_factory=lambda: list(PRIVACY_MODES))
    # its X25519 public key for secure aggregation's masks, hex ("" when it has none)
    secagg_key: str = ""

    def __post_init__(self) -> None:
        if self.client < 0 or self.next_round < 0 or self.pending_round < -1:
            raise ValueError("negative client or round")
        if self.secagg_key and not _is_hex(self.secagg_key, SECAGG_KEY_BYTES):
            raise ValueError(f"secagg_key is not {SECAGG_KEY_BYTES} bytes of hex")


@dataclass(frozen=True)
class JoinReply(Message):
    """The run's settings, the round to start from, and the blocks to download first."""

    protocol: int
    settings: RunSettings
    start_round: int
    keep_pending: bool  # False: the pending delta is too old; drop it and its dirty blocks
    stale: dict[int, int]  # block -> version to download before starting


# Marks a rejection of an update whose round has closed: its client is behind and rejoins.
BEHIND = "[behind]"


@dataclass(frozen=True)
class UploadReply(Message):
    accepted: bool
    reason: str  # why it was rejected; holds BEHIND when the client should rejoin


@dataclass(frozen=True)
class AggregateReady(Message):
    """Round ``version``'s aggregate exists: block ``block`` now has version ``version``.

    Secure aggregation: with ``reveal`` not empty the aggregate does not exist yet; the server
    asks this client to open the shares it was sealed of the clients that dropped before their
    upload (dropped client -> its sealed share for this client, hex), and waits for them."""

    block: int
    version: int
    reveal: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not _is_hex(h, max_bytes=SEALED_MAX_BYTES) for h in self.reveal.values()):
            raise ValueError("a sealed share is not hex of a sealed share's size")


# Secure aggregation (core/secure.py): the one exchange after the join, and dropout reveals.
SECAGG_KEY_BYTES = 32  # an X25519 public key
SEALED_MAX_BYTES = 12 + 68 + 16  # nonce, a Shamir share (x and a 521-bit value), Poly1305 tag
SECAGG_KINDS = ("roster", "shares", "reveal")


def _is_hex(text: str, size: int = 0, max_bytes: int = 0) -> bool:
    if len(text) % 2 or (size and len(text) != 2 * size) or len(text) > 2 * (max_bytes or size):
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SecAggCall(Message):
    """``roster``: the public keys of every client (waits until all have joined); ``shares``:
    this client's key, Shamir-shared, each share sealed for its receiver (client -> hex; waits
    until every client has sent its own); ``reveal``: for ``round``, the opened shares of the
    dropped clients the server asked for (dropped client -> share, hex)."""

    MAX_BYTES: ClassVar[int] = 1 << 20

    kind: str
    round: int = -1
    sealed: dict[int, str] = field(default_factory=dict)
    shares: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SECAGG_KINDS:
            raise ValueError(
                f"secure aggregation call {self.kind!r:.20} is not one of {SECAGG_KINDS}"
            )
        if any(not _is_hex(h, max_bytes=SEALED_MAX_BYTES) for h in self.sealed.values()):
            raise ValueError("a sealed share is not hex of a sealed share's size")
        if any(not _is_hex(h, max_bytes=SEALED_MAX_BYTES) for h in self.shares.values()):
            raise ValueError("a share is not hex of a share's size")


@dataclass(frozen=True)
class SecAggReply(Message):
    """The run's secure-aggregation session (hex) and, for ``roster``, every client's key."""

    session: str
    keys: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not _is_hex(k, SECAGG_KEY_BYTES) for k in self.keys.values()):
            raise ValueError(f"a key is not {SECAGG_KEY_BYTES} bytes of hex")


@dataclass(frozen=True)
class SpanReport(Message):
    round: int
    phase: str
    start: float
    end: float


@dataclass(frozen=True)
class RecordReport(Message):
    round: int
    block: int
    compute_s: float
    upload_s: float
    wait_s: float
    download_s: float
    idle_s: float
    round_s: float
    bytes_up: int
    bytes_down: int
    train_loss: float | None  # NaN does not survive JSON: None
    examples: int
    start: float
    end: float
    drain: bool
    steps: int = 0
    epsilon: float | None = None  # privacy.mode=record: this site's epsilon after the round


# An honest report holds one barrier record and the handful of phase spans (compute, upload,
# wait, download, idle) since the last one; these bounds leave room for ten times that.
MAX_REPORT_SPANS = 64  # per report, and per client and round over all its reports
MAX_REPORT_BYTES = 64 << 10


@dataclass(frozen=True)
class RoundReport(Message):
    """A client's barrier record and the phase spans since its last report."""

    MAX_BYTES: ClassVar[int] = MAX_REPORT_BYTES

    record: RecordReport
    spans: list[SpanReport]
    final: bool = False  # its last report: the client has finished

    def __post_init__(self) -> None:
        if len(self.spans) > MAX_REPORT_SPANS:
            raise ValueError(f"{len(self.spans)} spans (at most {MAX_REPORT_SPANS} a report)")
