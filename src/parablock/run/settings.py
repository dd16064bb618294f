"""What a run's config decides for its clients: the settings the server hands every client at
join (``RunSettings``), a client's training settings and links, and the LoRA adapter and its
learning rate of an adapter algorithm."""

from __future__ import annotations

import logging

from parablock.backends.assembly import Placement
from parablock.config import Config, per_client_value
from parablock.core.algorithms import ALGORITHMS
from parablock.core.schedule import round_turns
from parablock.data.examples import Example
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.model.lora import LoraSettings
from parablock.transport.faults import stall_seconds
from parablock.transport.link import LinkSpec
from parablock.wire.protocol import RunSettings

log = logging.getLogger(__name__)


def client_links(cfg: Config, client: int) -> tuple[LinkSpec, LinkSpec]:
    """Client ``client``'s uplink and downlink (``link.*`` may differ per client)."""
    up, down, latency = cfg.link.client(client)
    chunk = cfg.link.chunk_kb * 1024
    return LinkSpec(up, latency, chunk), LinkSpec(down, latency, chunk)


def run_settings(cfg: Config, plan: list[int]) -> RunSettings:
    """The training settings a server hands every client at join."""
    f, d = cfg.federation, cfg.data
    lora = lora_settings(cfg)
    return RunSettings(
        f.algorithm,
        f.correction,
        list(plan),
        cfg.model.extra_blocks,
        f.local_steps,
        f.batch_size,
        client_lr(cfg),
        f.weight_decay,
        f.warmup_steps,
        f.lr_schedule,
        f.grad_clip,
        cfg.run.seed,
        d.max_length,
        d.train_size,
        d.label_field,
        cfg.train.precision,
        cfg.train.prefix_cache_mb,
        cfg.train.response_logits,
        cfg.train.loss_chunk,
        cfg.link.compression,
        f.server_lr,
        **(lora.run_fields() if lora else {}),  # the adapter of fedit_lora
        local_steps_max=f.local_steps_max,
        duplex=f.duplex,
        client_clip_norm=f.client_clip_norm,
        turns=round_turns(f.algorithm, f.rounds, f.clients),
    )


def lora_settings(cfg: Config) -> LoraSettings | None:
    """The run's adapter, or None when its algorithm trains blocks of the model itself."""
    if not ALGORITHMS.get(cfg.federation.algorithm).adapter:
        return None
    c = cfg.lora
    return LoraSettings(c.r, c.alpha, c.dropout, c.target_modules)


def client_lr(cfg: Config) -> float:
    """The clients' learning rate: ``federation.lr``, except that an adapter algorithm trains at
    ``lora.lr`` unless ``federation.lr`` was changed from its default (so ``compare`` gives each
    method its own default, and one ``--set federation.lr=X`` sets it for all)."""
    from parablock.config import FederationConfig

    if lora_settings(cfg) is not None and cfg.federation.lr == FederationConfig().lr:
        return cfg.lora.lr
    return cfg.federation.lr


def placement(cfg: Config, client: int, data: tuple[Example, ...], pad_id: int) -> Placement:
    """Where simulated client ``client`` runs and with what (``backends/assembly.py``): its share of
    the data, its links and slow-down, its resources, its memory choices and its faults."""
    return Placement(
        client,
        cfg.model.name_or_path,
        data,
        pad_id,
        cpus=cfg.run.client_cpus,
        gpus=cfg.run.client_gpus,
        uplink=client_links(cfg, client)[0],
        downlink=client_links(cfg, client)[1],
        frozen_dtype=cfg.model.frozen_dtype,
        recompute=cfg.train.recompute,
        slowdown=per_client_value(cfg.federation.compute_slowdown, client),
        faults=cfg.run.faults,
        fault_seed=cfg.run.seed,
        stall_s=stall_seconds(cfg.federation.round_timeout_s),
    )
