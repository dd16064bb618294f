"""What a run's config decides for its clients: the settings the server hands every client at
join (``RunSettings``), a client's training settings and links, and the LoRA adapter and its
learning rate of an adapter algorithm."""

from __future__ import annotations

import logging
from dataclasses import replace

from parablock.backends.assembly import Placement
from parablock.config import Config, per_client_value
from parablock.core.algorithms import ALGORITHMS
from parablock.core.privacy import calibrate, rounds_within
from parablock.core.schedule import round_turns
from parablock.data.examples import Example
from parablock.errors import ConfigError
from parablock.model.lora import LoraSettings
from parablock.transport.faults import stall_seconds
from parablock.transport.link import LinkSpec
from parablock.wire.protocol import PrivacySettings, RunSettings

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
        block_size=cfg.model.block_size,
        lr_schedule_scope=f.lr_schedule_scope,
        optimizer_state=f.optimizer_state,
        client_clip_norm=f.client_clip_norm,
        privacy=privacy_settings(cfg),
        turns=round_turns(f.algorithm, f.rounds, f.clients),
    )


def privacy_settings(cfg: Config) -> PrivacySettings:
    """``[privacy]`` as clients must follow it (its noise multiplier already resolved)."""
    p, n = cfg.privacy, cfg.federation.clients
    secure = {}
    if p.secure_aggregation:  # its threshold resolved: 0 means a majority of the clients
        secure = dict(
            secure_aggregation=True,
            secagg_threshold=p.secagg_threshold or n // 2 + 1,
            secagg_masks=p.secagg_masks,
            secagg_scale_bits=p.secagg_scale_bits,
            secagg_clients=n,
        )
    if p.mode == "none":
        return PrivacySettings(**secure)
    return PrivacySettings(
        p.mode,
        p.clip_norm,
        p.noise_multiplier,
        p.delta,
        p.noise_at,
        p.accountant,
        p.physical_batch,
        p.max_epsilon,
        shares=n,
        **secure,
    )


def privacy_plan(cfg: Config, records: list[int] | None) -> tuple[PrivacySettings, int]:
    """The run's privacy settings and rounds: ``privacy.target_epsilon`` turned into the noise
    multiplier the planned rounds end at, and ``privacy.max_epsilon`` into the rounds that stay
    within it (the run then ends there, cleanly). Record mode accounts the site with the fewest
    records (the largest sampling rate: the largest epsilon); ``records`` None (remote sites):
    each site accounts for itself and stops at ``max_epsilon`` on its own."""
    p, f = cfg.privacy, cfg.federation
    if p.mode == "none":
        return privacy_settings(cfg), f.rounds
    if p.mode == "client":
        rate, steps = 1.0, 1  # one release per round, every client taking part
    elif records is None:
        if p.target_epsilon:
            raise ConfigError(
                "privacy.target_epsilon with privacy.mode=record needs each site's record count, "
                "which a parablock server does not know; set privacy.noise_multiplier (each site "
                "accounts for itself, and stops at privacy.max_epsilon)"
            )
        return privacy_settings(cfg), f.rounds
    else:
        rate, steps = min(1.0, f.batch_size / max(1, min(records))), f.local_steps
    sigma = p.noise_multiplier
    if p.target_epsilon:
        sigma = calibrate(p.target_epsilon, p.delta, rate, steps * f.rounds, p.accountant)
        log.info(
            "privacy.target_epsilon=%g: noise multiplier %.4g for %d rounds (sampling rate %.4g)",
            p.target_epsilon,
            sigma,
            f.rounds,
            rate,
        )
    rounds = f.rounds
    if p.max_epsilon:
        rounds, eps = rounds_within(
            p.max_epsilon, p.delta, sigma, rate, steps, f.rounds, p.accountant
        )
        if rounds == 0:
            raise ConfigError(
                f"privacy.max_epsilon={p.max_epsilon:g} is spent before the first round ends; "
                "raise it, or raise privacy.noise_multiplier"
            )
        if rounds < f.rounds:
            log.warning(
                "privacy.max_epsilon=%g: the run stops after round %d of %d, at epsilon %.3g "
                "(another round would pass the budget)",
                p.max_epsilon,
                rounds,
                f.rounds,
                eps,
            )
    cfg = replace(cfg, privacy=replace(p, noise_multiplier=sigma))
    return privacy_settings(cfg), rounds


def lora_settings(cfg: Config) -> LoraSettings | None:
    """The run's adapter, or None when its algorithm trains blocks of the model itself."""
    if not ALGORITHMS.get(cfg.federation.algorithm).adapter:
        return None
    c = cfg.lora
    return LoraSettings(c.r, c.alpha, c.dropout, c.target_modules, c.layers)


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
        device=cfg.client_devices()[client],
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
