"""The sections of the config tree, one frozen dataclass each, every field with its default, its
help and what it allows. The choices of a registry-backed field are listed by the registry
itself, when they are asked for, so the config never names what it does not need to."""

from __future__ import annotations

import math
from dataclasses import dataclass

from parablock.config.fields import MAX_SEED, PER_CLIENT, opt, per_client_value
from parablock.errors import ConfigError  # noqa: F401
from parablock.transport.link import MAX_LATENCY_MS


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
        "a local Hugging Face model directory, 'smollm2-135m-instruct' for the embedded "
        "SmolLM2-135M-Instruct (a dequantised Q4_1 GGUF copy, cached once as safetensors), or "
        "arch:<preset>[@seed] for an architecture with random weights, the same in every "
        "process (its loss means nothing, its times and memory do; docs/scaling.md)",
    )
    blocks: str = opt(
        "top:8",
        "which blocks train: 'all', 'top:N', 'bottom:N', or indices/ranges like '0-3,10'",
    )
    block_size: int = opt(
        1,
        "consecutive decoder layers per block (the last block may hold fewer); model.blocks "
        "then counts these blocks: top:4 with block_size 2 trains the top 8 layers in 4 blocks",
        ge=1,
    )
    extra_blocks: str = opt(
        "",
        "comma-separated non-layer blocks to add after the decoder layers: embed, norm, head",
    )
    frozen_dtype: str = opt(
        "fp32",
        "clients hold the weight matrices no block trains in this dtype: bf16 halves their "
        "memory and, under the bf16 forward, computes the same products (the embedding rows are "
        "rounded to bf16); int8 also holds the frozen layers' linear weights in int8 (torchao, "
        "an optional extra; the deltas then differ slightly); nf4 holds them in 4-bit "
        "NormalFloat instead (torchao too; the deltas differ more); trained blocks, the server "
        "and evaluation stay fp32",
        choices=("fp32", "bf16", "int8", "nf4"),
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = opt(
        "reasoning_gym:word_sequence_reversal?min_words=2&max_words=3",
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
    # defaults by measurement (benchmarks/tune.py; docs/performance.md, "Defaults by measurement")
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
    warmup_steps: int = opt(
        0, "linear warm-up steps at the start of each round (of the run: lr_schedule_scope)", ge=0
    )
    lr_schedule: str = opt(
        "constant", "learning rate after warm-up within a round", choices=("constant", "cosine")
    )
    lr_schedule_scope: str = opt(
        "round",
        "what warm-up and lr_schedule span: each round's K steps, restarting every round, or the "
        "client's whole run of rounds x K steps",
        choices=("round", "run"),
    )
    optimizer_state: str = opt(
        "reset",
        "AdamW state of local training: a fresh one every round, or per_block: each client keeps "
        "every block's moments and step count across that block's visits (on the host between "
        "visits, in its checkpoint)",
        choices=("reset", "per_block"),
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
    client_clip_norm: float = opt(
        0.0,
        "each client scales its block delta down to this L2 norm before it leaves (a stage of "
        "the client's delta pipeline, before the codec; 0 = off)",
        ge=0.0,
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
        "block deltas on the wire, both ways: none (float32), bf16 (half the bytes), int8 "
        "(a quarter: int8 values and one float32 scale per row) or int4 (1/7: two values a "
        "byte and one float32 scale per 64 values), the lossy ones with error feedback; the "
        "server's choice holds for every client",
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
        64,
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
    batch_size: int = opt(8, "examples per forward pass of the held-out loss", ge=1)
    generate_batch_size: int = opt(
        32,
        "items generated at once for accuracy (a wider batch makes each decoding step cheaper "
        "per item; finished items leave the batch)",
        ge=1,
    )
    tasks: tuple[str, ...] = opt(
        (),
        "standard benchmarks run on the global model before and after training through the "
        "lm-evaluation-harness (local files only): a list of task specs, or a comma list with "
        "--set, e.g. ['gsm8k:test.jsonl', 'reasoning_gym:basic_arithmetic', 'syllogism_choice']",
    )
    tasks_size: int = opt(64, "items per eval.tasks task", ge=1)


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
    client_devices: str = opt(
        "",
        "local backend: where each client trains, cpu, cuda or cuda:N: one device for every "
        "client or a comma list with one per client, e.g. 'cuda:0,cuda:0,cuda:1' (several "
        "clients may share a GPU); empty = cuda where run.client_gpus > 0, else cpu. GPU clients "
        "train in bf16 autocast with their model on the GPU; the server stays on the CPU",
    )
    checkpoint: bool = opt(
        True, "save a checkpoint after every round (continue with `parablock run --resume DIR`)"
    )
    log_level: str = opt("info", "logging level", choices=("debug", "info", "warning"))
    tensorboard: bool = opt(
        False,
        "write TensorBoard event files round by round (held-out loss and accuracy, each "
        "client's train loss, phase seconds and bytes, updates, epsilon): tensorboard "
        "--logdir RUN_DIR shows them (docs/observability.md)",
    )
    tensorboard_dir: str = opt(
        "", "with run.tensorboard: where the event files go (default: RUN_DIR/tb)"
    )
    faults: str = opt(
        "",
        "fault injection, for tests and benchmarks (off when empty): comma-separated "
        "KIND@CLIENT:ROUND (one fault) or KIND~P (each client's round, probability P, seeded "
        "by run.seed); KIND: crash, stall, cut, nan, shape, block, stale, future, truncate, "
        "forge, scale, token, replay, vanish, vanish_after (docs/robustness.md: Fault injection)",
    )


from parablock.config.features import LoraConfig, PrivacyConfig, ServerConfig  # noqa: E402

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
    "privacy": PrivacyConfig,
}
