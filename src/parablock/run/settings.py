"""What a run's config decides for its clients: the settings the server hands every client at
join (``RunSettings``), a client's training settings and links, and the LoRA adapter and its
learning rate of an adapter algorithm."""

from __future__ import annotations

import logging
from dataclasses import replace

from parablock.config import Config
from parablock.core.baselines import round_turns
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.model.lora import LoraSettings
from parablock.model.train import TrainSettings
from parablock.transport.link import LinkSpec
from parablock.wire.protocol import RunSettings

log = logging.getLogger(__name__)


def train_settings(cfg: Config) -> TrainSettings:
    # recompute is a client's own memory choice, not a setting the server hands out
    return replace(run_settings(cfg, []).train_settings(), recompute=cfg.train.recompute)


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
        turns=round_turns(f.algorithm, f.rounds, f.clients),
    )


def lora_settings(cfg: Config) -> LoraSettings | None:
    """The run's adapter, or None when its algorithm trains blocks of the model itself."""
    from parablock.core.algorithms import ADAPTER_ALGORITHMS

    if cfg.federation.algorithm not in ADAPTER_ALGORITHMS:
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
