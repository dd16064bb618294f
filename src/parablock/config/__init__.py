"""One typed configuration tree that is also the CLI: sections, defaults, help and validation.

Every key is ``section.key``; ``--set section.key=value`` and TOML files ``[section] key = value``
reach the same dataclass field. Validation happens on construction and names the field and what is
allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from parablock.data.textfile import read_utf8
from parablock.errors import ConfigError  # noqa: F401
from parablock.transport.link import MAX_LATENCY_MS


def opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
    per_client: bool = False,
) -> Any:
    """A config field with its help text and constraints (checked by ``_validate``); a float is
    finite unless ``allow_inf``. A ``per_client`` field holds a tuple of floats: one value for
    every client, or one per client (``per_client_value`` picks a client's), each checked
    against the bounds."""
    meta = {
        "help": help,
        "choices": choices,
        "ge": ge,
        "gt": gt,
        "le": le,
        "allow_inf": allow_inf,
        "per_client": per_client,
    }
    if per_client:
        default = (float(default),)
    return field(default=default, metadata=meta)


PER_CLIENT = "one value for every client, or a comma list with one per client, e.g. '20,20,5'"


def per_client_value(values: tuple[float, ...], client: int) -> float:
    """Client ``client``'s value of a per-client setting (a single value is every client's)."""
    return values[0] if len(values) == 1 else values[client]


def per_client_text(values: tuple[float, ...]) -> str:
    """A per-client setting as a user would write it, for logs and messages: '20' or '20,20,5'."""
    return ",".join(f"{v:g}" for v in values)


def _per_client_plain(values: tuple[float, ...]) -> float | str:
    """A per-client setting as config.toml holds it, exactly: a number, or a comma list of
    exact numbers ('inf' included) in a string, which loads back to the same tuple."""
    return values[0] if len(values) == 1 else ",".join(repr(v) for v in values)


# torch.manual_seed takes at most 2**64 - 1 and numpy any size; a signed 64-bit bound also keeps
# the seed a TOML integer in config.toml (TOML integers are signed 64-bit), so --resume reads it.
MAX_SEED = 2**63 - 1


def _algorithms() -> list[str]:
    from parablock.core.algorithms import ALGORITHMS

    return ALGORITHMS.names()


def _schedules() -> list[str]:
    from parablock.core.schedule import SCHEDULES

    return SCHEDULES.names()


def _corrections() -> list[str]:
    from parablock.core.correction import CORRECTIONS

    return CORRECTIONS.names()


def _aggregators() -> list[str]:
    from parablock.core.aggregate import AGGREGATORS

    return AGGREGATORS.names()


def _compressions() -> list[str]:
    from parablock.wire.compress import CODECS

    return CODECS.names()


def _partitions() -> list[str]:
    from parablock.data.partition import PARTITIONS

    return PARTITIONS.names()


def _backends() -> list[str]:
    from parablock.backends import BACKENDS

    return BACKENDS.names()


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = opt(
        "smollm2-135m-instruct",
        "a local Hugging Face model directory, or 'smollm2-135m-instruct' for the embedded "
        "SmolLM2-135M-Instruct (a dequantised Q4_1 GGUF copy, cached once as safetensors)",
    )
    blocks: str = opt(
        "top:8",
        "which blocks train: 'all', 'top:N', 'bottom:N', or indices/ranges like '0-3,10'",
    )
    extra_blocks: str = opt(
        "",
        "comma-separated non-layer blocks to add after the decoder layers: embed, norm, head",
    )
    frozen_dtype: str = opt(
        "fp32",
        "clients hold the weight matrices no block trains in this dtype: bf16 halves their "
        "memory and, under the bf16 forward, computes the same products (the embedding rows are "
        "rounded to bf16); trained blocks, the server and evaluation stay fp32",
        choices=("fp32", "bf16"),
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = opt(
        "reasoning_gym:gsm_symbolic",
        "training data, comma-separated sources with optional '@weight': "
        "'reasoning_gym:<task>[?opt=v&...]' (generated offline with run.seed), "
        "'alpaca:<file>', 'gsm8k:<file>', 'chat:<file>', 'file:<file>' or a .json/.jsonl path "
        "(format detected); e.g. 'reasoning_gym:basic_arithmetic@1,alpaca:a.json@3'",
    )
    train_size: int = opt(
        512,
        "training examples drawn from the sources, split over clients "
        "(data.partition=per_client: at most this many per client, from its own source)",
        ge=1,
    )
    max_length: int = opt(
        256,
        "tokens per example; longer ones are truncated from the right, and one whose prompt "
        "alone fills it is dropped (both counted in data.json)",
        ge=16,
    )
    partition: str = opt("iid", "how examples are split over clients", choices=_partitions)
    alpha: float = opt(
        0.5, "Dirichlet concentration for data.partition=dirichlet (small = skewed)", gt=0.0
    )
    label_field: str = opt(
        "",
        "record field whose value labels a file record for non-IID partitions "
        "(default: the file name; reasoning-gym: the task or template)",
    )
    client_weights: str = opt(
        "", "relative client sizes for data.partition=iid, e.g. '4,2,1,1' ('' = equal)"
    )
    client_sources: str = opt(
        "",
        "one data source per client for data.partition=per_client, separated by ';' (each any "
        "data.source syntax), e.g. 'gsm8k:site0.jsonl;gsm8k:site1.jsonl'",
    )

    def weights(self) -> tuple[float, ...]:
        if not self.client_weights.strip():
            return ()
        try:
            w = tuple(float(x) for x in self.client_weights.split(","))
        except ValueError:
            raise ConfigError(
                f"data.client_weights={self.client_weights!r} must be comma-separated numbers"
            ) from None
        if any(not (x > 0 and math.isfinite(x)) for x in w):
            raise ConfigError(f"data.client_weights={self.client_weights!r} must all be > 0")
        return w

    def client_source_list(self) -> list[str]:
        """``client_sources`` split on ';', one source spec per client ([] when unset)."""
        if not self.client_sources.strip():
            return []
        items = [s.strip() for s in self.client_sources.split(";")]
        if not all(items):
            raise ConfigError(
                f"data.client_sources={self.client_sources!r} has an empty item; give one "
                "source per client separated by ';'"
            )
        return items


@dataclass(frozen=True)
class FederationConfig:
    algorithm: str = opt(
        "parablock",
        "parablock (two threads per client), fedbcd (sequential), fedit_lora (FedAvg over LoRA "
        "adapters, [lora]), or the baselines fedavg_full (every parameter trains, the whole model "
        "travels) and cyclic (clients train in turn, one block per turn)",
        choices=_algorithms,
    )
    clients: int = opt(2, "number of clients", ge=1, le=1024)
    rounds: int = opt(16, "rounds T; each round trains one block on every client", ge=1)
    # defaults by measurement (benchmarks/tune.py, README "Defaults by measurement")
    local_steps: int = opt(4, "optimizer steps K per client per round", ge=1)
    local_steps_max: int = opt(
        0,
        "parablock: while the link is still busy, keep taking steps on the round's block, up to "
        "this many (0 = exactly local_steps; else >= local_steps, with lr_schedule=constant); "
        "the update counts the examples it really used. No effect on fedbcd",
        ge=0,
    )
    batch_size: int = opt(4, "examples per optimizer step", ge=1)
    lr: float = opt(1e-3, "client AdamW learning rate", gt=0.0, le=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = opt(0, "linear warm-up steps within a round's K steps", ge=0)
    lr_schedule: str = opt(
        "constant", "learning rate after warm-up within a round", choices=("constant", "cosine")
    )
    grad_clip: float = opt(1.0, "max gradient norm per step (0 disables clipping)", ge=0.0)
    schedule: str = opt("cyclic", "block order over rounds", choices=_schedules)
    correction: str = opt(
        "replace", "block-level correction at the barrier (none: ablation)", choices=_corrections
    )
    aggregator: str = opt(
        "weighted_mean", "how the server combines block deltas", choices=_aggregators
    )
    server_lr: float = opt(1.0, "server learning rate eta_g", gt=0.0, le=10.0)
    trim_fraction: float = opt(
        0.1,
        "aggregator=trimmed_mean: share of updates dropped at each end, per coordinate",
        ge=0.0,
        le=0.45,
    )
    max_client_weight: float = opt(
        1.0,
        "largest share of a round's total weight one update may carry (a client's "
        "num_examples is also capped at local_steps (or local_steps_max) x batch_size); "
        "1 = no share cap",
        gt=0.0,
        le=1.0,
    )
    max_update_norm: float = opt(
        0.0, "L2-norm bound on one client's block delta (0 = none); see update_norm_action", ge=0.0
    )
    update_norm_action: str = opt(
        "clip",
        "what federation.max_update_norm does to a larger delta: scale it down to the bound, or "
        "reject the update",
        choices=("clip", "reject"),
    )
    update_bound: bool = opt(
        True,
        "refuse an update that moves any coordinate further than the announced training can "
        "(local_steps, or local_steps_max, AdamW steps at lr; no honest update reaches it): "
        "stops a scaled or poisoned update whatever its size",
    )
    min_clients: int = opt(0, "updates a round needs after its deadline (0 = all clients)", ge=0)
    round_timeout_s: float = opt(
        600.0, "seconds a round waits for missing updates after the first one arrives", gt=0.0
    )
    compute_slowdown: tuple[float, ...] = opt(
        1.0,
        "for studies of slow clients: a client with factor f takes f times its compute time "
        "(it sleeps (f - 1) x the measured time after each compute, inside the compute span); "
        f">= 1, {PER_CLIENT}",
        ge=1.0,
        per_client=True,
    )

    duplex: bool = opt(
        False,
        "parablock: full duplex, each delta starts uploading as soon as it is trained while the "
        "previous aggregate may still be downloading (the same model, shorter rounds on slow "
        "links; false = one upload-wait-download sequence per round). No effect on fedbcd",
    )


def _precisions() -> tuple[str, ...]:
    from parablock.model.forward import PRECISIONS

    return PRECISIONS


@dataclass(frozen=True)
class TrainConfig:
    """How a client computes its training step (not what it computes: see [federation])."""

    precision: str = opt(
        "auto",
        "forward precision: bf16 autocast (weights, optimizer state and deltas stay fp32), fp32, "
        "or auto = bf16 where the device runs it fast (AVX-512-bf16/AMX CPUs, bf16 CUDA GPUs)",
        choices=_precisions,
    )
    prefix_cache_mb: float = opt(
        512.0,
        "MB per client for the hidden states entering the lowest trained layer, computed once "
        "per example and reused (the layers below it never change); 0 = off",
        ge=0.0,
    )
    response_logits: bool = opt(
        True, "compute the LM head only on response tokens (false: on every position)"
    )
    loss_chunk: int = opt(
        1024,
        "positions per piece of the LM head and loss, recomputed in backward so at most one "
        "piece of logits is held (0 = one piece)",
        ge=0,
    )
    recompute: bool = opt(
        False,
        "keep only each decoder layer's input during a step and recompute the layer in backward: "
        "far less activation memory, about a quarter more compute, the same results",
    )


@dataclass(frozen=True)
class LinkConfig:
    up_mbps: tuple[float, ...] = opt(
        20.0,
        f"client uplink bandwidth in Mbit/s ('inf' = unlimited); {PER_CLIENT}",
        gt=0.0,
        allow_inf=True,
        per_client=True,
    )
    down_mbps: tuple[float, ...] = opt(
        50.0,
        f"client downlink bandwidth in Mbit/s ('inf' = unlimited); {PER_CLIENT}",
        gt=0.0,
        allow_inf=True,
        per_client=True,
    )
    latency_ms: tuple[float, ...] = opt(
        20.0,
        f"one-way latency per transfer in milliseconds; {PER_CLIENT}",
        ge=0.0,
        le=MAX_LATENCY_MS,
        per_client=True,
    )
    chunk_kb: int = opt(256, "pacing granularity of a transfer in KiB", ge=1)
    compression: str = opt(
        "none",
        "block deltas on the wire, both ways: none (float32), bf16 (half the bytes) or int8 "
        "(a quarter: int8 values and one float32 scale per row), the lossy ones with error "
        "feedback; the server's choice holds for every client",
        choices=_compressions,
    )

    def client(self, client: int) -> tuple[float, float, float]:
        """Client ``client``'s (up Mbit/s, down Mbit/s, latency ms)."""
        return (
            per_client_value(self.up_mbps, client),
            per_client_value(self.down_mbps, client),
            per_client_value(self.latency_ms, client),
        )

    def uniform(self) -> bool:
        """Every client has the same link."""
        return all(len(set(v)) == 1 for v in (self.up_mbps, self.down_mbps, self.latency_ms))


@dataclass(frozen=True)
class EvalConfig:
    source: str = opt(
        "",
        "held-out data, same syntax as data.source ('' = a draw of data.source disjoint from "
        "training); training records that also appear here are removed",
    )
    size: int = opt(32, "held-out examples (never trained on) for the eval loss", ge=1)
    accuracy_size: int = opt(
        8,
        "held-out items with a checkable answer scored by greedy generation (0 = off)",
        ge=0,
    )
    max_new_tokens: int = opt(128, "tokens generated per item for accuracy", ge=1)
    every: int = opt(
        0,
        "also evaluate the global model after every N-th round (replayed after training, so "
        "evaluation never slows the rounds; 0 = only before and after)",
        ge=0,
    )
    batch_size: int = opt(8, "examples per forward pass / generation batch in evaluation", ge=1)


@dataclass(frozen=True)
class RunConfig:
    seed: int = opt(
        0,
        "seed for data, partition, schedule, batches and initialisation",
        ge=0,
        le=MAX_SEED,
    )
    out: str = opt("", "run directory (default: runs/<algorithm>-<timestamp>)")
    backend: str = opt(
        "local",
        "where clients run: local (threads in this process) or ray (one Ray actor per client)",
        choices=_backends,
    )
    threads: int = opt(
        0, "torch threads per client (0 = cores / clients locally, client_cpus on Ray)", ge=0
    )
    compute_slots: int = opt(
        0,
        "local backend: at most this many clients run a training step at the same time (steps "
        "of different clients still interleave); bounds CPU contention and the training "
        "activations held at once. 0 = cores / torch threads per client, at least 1",
        ge=0,
    )
    share_blocks: bool = opt(
        True,
        "local backend: CPU clients hold one shared copy of every trained block that equals the "
        "global model and copy a block only to write it (false: each client its own copy of "
        "every trained block, for comparison)",
    )
    ray_address: str = opt(
        "",
        "Ray cluster to join ('auto' or 'host:6379' of a running cluster; empty = start a local one)",
    )
    client_cpus: float = opt(1.0, "CPUs each client reserves on Ray", gt=0.0)
    client_gpus: float = opt(
        0.0,
        "GPUs each client reserves (fractions share one); a client with a GPU trains on it",
        ge=0.0,
    )
    checkpoint: bool = opt(
        True, "save a checkpoint after every round (continue with `parablock run --resume DIR`)"
    )
    log_level: str = opt("info", "logging level", choices=("debug", "info", "warning"))
    faults: str = opt(
        "",
        "fault injection, for tests and benchmarks (off when empty): comma-separated "
        "KIND@CLIENT:ROUND (one fault) or KIND~P (each client's round, probability P, seeded "
        "by run.seed); KIND: crash, stall, cut, nan, shape, block, stale, future, truncate, "
        "forge, scale, token, replay (README: Fault injection)",
    )


@dataclass(frozen=True)
class ServerConfig:
    address: str = opt(
        "127.0.0.1:8470",
        "parablock server: host:port to listen on (0.0.0.0:PORT for every interface; port 0 = any)",
    )
    tls_cert: str = opt("", "parablock server: PEM certificate chain of the server")
    tls_key: str = opt("", "parablock server: PEM private key of the server")
    client_ca: str = opt(
        "", "parablock server: PEM CA of client certificates; set = mutual TLS is required"
    )
    insecure: bool = opt(
        False, "parablock server: plain text instead of TLS (trusted test networks only)"
    )
    clients_file: str = opt(
        "", "parablock server: TOML file of client ids and token hashes (parablock certs makes one)"
    )
    join_timeout_s: float = opt(
        600.0,
        "parablock server: seconds to wait for all clients to join; then it starts with "
        "federation.min_clients if that many joined",
        gt=0.0,
    )
    request_timeout_s: float = opt(
        30.0,
        "parablock server: the longest a client may stay silent within a call (its request, an "
        "upload's next chunk, taking a download's next chunk); then the call is ended, logged "
        "and counted, and its worker and call slot are free again",
        gt=0.0,
    )


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter of federation.algorithm=fedit_lora (PEFT; unused by block algorithms)."""

    r: int = opt(16, "adapter rank", ge=1, le=4096)
    alpha: float = opt(32.0, "LoRA alpha: the adapter's output is scaled by alpha / r", gt=0.0)
    dropout: float = opt(
        0.0,
        "dropout on the adapter's input while training; > 0 draws masks from torch's shared "
        "generator, so runs are no longer reproducible bit for bit",
        ge=0.0,
        le=0.9,
    )
    target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated linear modules of every decoder layer that get an adapter (default: "
        "all of attention and MLP)",
    )
    lr: float = opt(
        3e-3,
        "client AdamW learning rate of fedit_lora, used unless federation.lr is changed from "
        "its default",
        gt=0.0,
        le=1.0,
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "link": LinkConfig,
    "eval": EvalConfig,
    "run": RunConfig,
    "server": ServerConfig,
    "lora": LoraConfig,
}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        for name in SECTIONS:
            _validate(name, getattr(self, name))
        fed = self.federation
        _check_client_counts(self)
        if fed.min_clients > fed.clients:
            raise ConfigError(
                f"federation.min_clients={fed.min_clients} exceeds federation.clients={fed.clients}"
            )
        weights = self.data.weights()
        if weights and len(weights) != fed.clients:
            raise ConfigError(
                f"data.client_weights has {len(weights)} value(s) but federation.clients="
                f"{fed.clients}; give one weight per client"
            )
        if weights and self.data.partition != "iid":
            raise ConfigError(
                "data.client_weights applies to data.partition=iid only "
                f"(got data.partition={self.data.partition!r})"
            )
        sources = self.data.client_source_list()
        if self.data.partition == "per_client" and not sources:
            raise ConfigError(
                "data.partition=per_client needs data.client_sources: one source per client "
                f"separated by ';' (federation.clients={fed.clients})"
            )
        if self.data.partition == "per_client" and len(sources) != fed.clients:
            raise ConfigError(
                f"data.client_sources has {len(sources)} source(s) but federation.clients="
                f"{fed.clients}; give one source per client"
            )
        if sources and self.data.partition != "per_client":
            raise ConfigError(
                "data.client_sources applies to data.partition=per_client only "
                f"(got data.partition={self.data.partition!r})"
            )
        _check_algorithm(self)
        if self.run.faults:
            from parablock.transport.faults import parse

            parse(self.run.faults, self.run.seed)  # a bad spec: one line naming the item

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain TOML values: a per-client setting is a number, or a comma list in a string."""
        out = {}
        for name in SECTIONS:
            obj = getattr(self, name)
            values = dataclasses.asdict(obj)
            for f in dataclasses.fields(obj):
                if f.metadata.get("per_client"):
                    values[f.name] = _per_client_plain(values[f.name])
            out[name] = values
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **updates: dict[str, Any]) -> Config:
        """A copy with some keys changed, e.g. ``cfg.replace(federation={"rounds": 3})``."""
        data = self.to_dict()
        for section, values in updates.items():
            data.setdefault(section, {}).update(values)
        return from_dict(data)


def _validate(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        value = getattr(obj, f.name)
        meta = f.metadata
        if not meta.get("per_client"):
            _check(key, key, value, meta)
            continue
        if not (isinstance(value, tuple) and value and all(type(v) is float for v in value)):
            raise ConfigError(f"{key} must be a tuple of floats, one per client, got {value!r}")
        for i, v in enumerate(value):
            _check(key, key if len(value) == 1 else f"{key}: client {i}'s value", v, meta)


def _check(key: str, name: str, value: Any, meta: Any) -> None:
    """One value against its field's constraints; ``name`` says whose value it is."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    if isinstance(value, float) and math.isinf(value) and not meta.get("allow_inf"):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; valid: {', '.join(choices)}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            shown = f"{name}={value!r}" if name == key else f"{name} {value!r}"
            raise ConfigError(f"{shown} is out of range; it must be {word} {_bound_text(b)}")


def _check_client_counts(cfg: Config) -> None:
    """A per-client list has exactly one entry per client."""
    clients = cfg.federation.clients
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            values = getattr(obj, f.name)
            if f.metadata.get("per_client") and len(values) not in (1, clients):
                raise ConfigError(
                    f"{section}.{f.name}={per_client_text(values)!r} has {len(values)} values "
                    f"but federation.clients={clients}; give one value for every client or "
                    f"exactly {clients}, one per client"
                )


def _bound_text(b: float) -> str:
    """A bound as the user would type it: integers in full (a seed bound), floats short."""
    return str(b) if isinstance(b, int) else f"{b:g}"


def _check_algorithm(cfg: Config) -> None:
    """Algorithm combinations the config alone shows cannot run (the model shows the rest:
    ``core.algorithms.check_plan``)."""
    from parablock.core.algorithms import ALGORITHMS
    from parablock.model.blocks import BlockError, extra_names, fixed_selection_size
    from parablock.model.lora import target_names

    fed, model = cfg.federation, cfg.model
    if 0 < fed.local_steps_max < fed.local_steps:
        raise ConfigError(
            f"federation.local_steps_max={fed.local_steps_max} is below federation.local_steps="
            f"{fed.local_steps}; set it to at least {fed.local_steps}, or 0 for exactly local_steps"
        )
    if fed.local_steps_max and fed.lr_schedule != "constant":
        raise ConfigError(
            f"federation.local_steps_max={fed.local_steps_max} needs federation.lr_schedule="
            f"constant (a {fed.lr_schedule} schedule needs a known number of steps per round)"
        )
    try:
        extra_names(model.extra_blocks)
    except BlockError as e:
        raise ConfigError(str(e)) from None
    target_names(cfg.lora.target_modules)
    entry = ALGORITHMS.get(fed.algorithm)
    if entry.adapter and model.extra_blocks:
        raise ConfigError(
            f"federation.algorithm={fed.algorithm} trains a LoRA adapter only; model.extra_blocks"
            f"={model.extra_blocks!r} must be empty"
        )
    if model.frozen_dtype != "fp32":
        if entry.adapter:
            raise ConfigError(
                f"model.frozen_dtype={model.frozen_dtype} is not supported for federation."
                f"algorithm={fed.algorithm} (adapter runs keep the base in fp32); use fp32"
            )
        if cfg.train.precision == "fp32":
            raise ConfigError(
                f"model.frozen_dtype={model.frozen_dtype} needs a bf16 forward; train.precision"
                "=fp32 multiplies in fp32 (set train.precision=auto or bf16, or frozen_dtype=fp32)"
            )
    if fed.correction == "none" and not entry.ablation:
        # FedBCD (and the baselines) train the next block only after downloading the aggregate;
        # with 'none' they would never write that aggregate into the model yet claim its version.
        raise ConfigError(
            "federation.correction=none is the ParaBlock ablation only; federation.algorithm="
            f"{fed.algorithm} always applies the aggregate it downloads (use "
            "federation.correction=replace)"
        )
    if entry.in_turn and fed.clients > fed.rounds:
        raise ConfigError(
            f"federation.algorithm={fed.algorithm} gives round t to client t mod "
            f"federation.clients: with {fed.clients} clients and {fed.rounds} round(s) clients "
            f"{fed.rounds}..{fed.clients - 1} never train; set federation.rounds >= "
            "federation.clients"
        )
    need = entry.min_blocks
    n = fixed_selection_size(model.blocks, model.extra_blocks)
    if n is not None and n < need:
        raise ConfigError(
            f"model.blocks={model.blocks!r} selects {n} block(s) but federation.algorithm="
            f"{fed.algorithm} needs at least {need} (it trains the next block while the previous "
            "one is in flight); select more blocks or use federation.algorithm=fedbcd"
        )


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML value or a ``--set`` string to the field's type, or raise ConfigError."""
    if f.metadata.get("per_client"):
        return _per_client(key, value)
    kind = type(f.default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _per_client(key: str, value: Any) -> tuple[float, ...]:
    """A number, a comma list of numbers in a string ('20,20,5', as ``--set`` gives it too) or
    a TOML array of numbers, as a tuple of floats (bounds and the count are checked later)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    out = []
    for item in items:
        try:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueError
            out.append(float(item))
        except ValueError:
            raise ConfigError(
                f"{key} expects a number or a comma list of numbers, one per client "
                f"(e.g. '20,20,5'), got {value!r}"
            ) from None
    if not out:
        raise ConfigError(f"{key} expects a number or a comma list of numbers, got {value!r}")
    return tuple(out)


def _field(section: str, key: str) -> dataclasses.Field:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if key not in fields:
        raise ConfigError(
            f"unknown config key {section}.{key}; valid keys in [{section}]: {', '.join(fields)}"
        )
    return fields[key]


def from_dict(data: dict[str, Any]) -> Config:
    sections = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(
                f"[{section}] must be a table of keys, got {type(values).__name__} {values!r:.40}"
            )
        kwargs = {}
        for key, value in values.items():
            f = _field(section, key)
            kwargs[key] = _coerce(f"{section}.{key}", f, value)
        sections[section] = SECTIONS[section](**kwargs)
    return Config(**sections)


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build the config from an optional TOML file and ``section.key=value`` overrides."""
    data: dict[str, Any] = _read_toml(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        name, value = item.split("=", 1)
        if name.count(".") != 1:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, key = name.strip().split(".")
        _field(section, key)
        data.setdefault(section, {})[key] = value
    return from_dict(data)


def _read_toml(p: Path) -> dict[str, Any]:
    """A config file's tables; a file that is missing, not UTF-8, not TOML, or has a section
    that is not a table is a ConfigError naming the file (and the byte or the section)."""
    text = read_utf8(p, "config file", ConfigError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    for section, values in data.items():
        if section in SECTIONS and not isinstance(values, dict):
            raise ConfigError(
                f"config file {p}: {section} must be a [{section}] table of keys, got "
                f"{type(values).__name__} {values!r:.40}"
            )
    return data


def help_text() -> str:
    """Every key with its default and meaning, for ``--help``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            if callable(choices):
                try:
                    choices = choices()
                except Exception:  # a registry whose optional package is missing
                    choices = None
            extra = f" {{{', '.join(choices)}}}" if choices else ""
            default = f.default
            if f.metadata.get("per_client"):
                default = _per_client_plain(default)
            lines.append(f"  {section}.{f.name} = {default!r}{extra}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
