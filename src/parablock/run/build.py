"""Building a run from its config: the model, its blocks and plan, the data and its partition,
the server, and each client's spec (or, for a served run, the server and its held-out data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from parablock.backends.assembly import Placement
from parablock.config import Config, per_client_text
from parablock.core.algorithms import check_plan
from parablock.core.schedule import layout, make_plan
from parablock.core.server import Server
from parablock.data.examples import DataStats, Example, Record, encode_all
from parablock.data.partition import client_stats, partition
from parablock.data.sources import client_records, heldout_draw, train_and_heldout
from parablock.errors import ConfigError, RunDirError, RunInterrupted  # noqa: F401
from parablock.model.blocks import block_nbytes
from parablock.model.devices import train_device
from parablock.model.forward import resolve_precision
from parablock.model.frozen import QUANTISED, int8_available
from parablock.model.load import load_model, load_tokenizer, model_fingerprint
from parablock.run.settings import lora_settings, placement, privacy_plan, run_settings

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything a run needs, built from the config (tests use it to drive backends directly)."""

    cfg: Config
    server: Server
    placements: list[Placement]
    tokenizer: Any
    heldout: list[Example]
    selected: list[int]
    heldout_records: list[Record]
    partition_stats: list[dict]
    data_stats: dict

    @property
    def model(self):
        return self.server.model


def _per_client_train(
    cfg: Config,
    sources: list[str],
    tokenizer,
    heldout_records: list[Record],
    stats: DataStats,
) -> tuple[list[Record], list[Example], list[list[int]]]:
    """data.partition=per_client: client i encodes ``client_records(sources[i], ...)``.

    Returns the records and examples of all clients concatenated in client order, and the
    indices each client owns in them (contiguous ranges), for the partition statistics.
    """
    d, seed = cfg.data, cfg.run.seed
    heldout_keys = {r.key for r in heldout_records}
    records: list[Record] = []
    examples: list[Example] = []
    parts: list[list[int]] = []
    for i, src in enumerate(sources):
        recs = client_records(src, d.train_size, seed, d.label_field)
        overlap = sum(r.key in heldout_keys for r in recs)
        if overlap:
            log.warning(
                "client %d (%s): %d training prompt(s) are also held-out; evaluation is not "
                "on unseen data",
                i,
                src,
                overlap,
            )
        own = DataStats()
        exs = encode_all(recs, tokenizer, d.max_length, f"train client {i} ({src})", own)
        stats.kept += own.kept
        stats.truncated += own.truncated
        stats.dropped += own.dropped
        parts.append(list(range(len(examples), len(examples) + len(exs))))
        records += recs
        examples += exs
    return records, examples, parts


def prepare(cfg: Config, serve: bool = False) -> Federation:
    """Load the model, build blocks, plan, data, partition, server and client placements.

    ``serve``: the clients are remote (``parablock server``): no training data here, only the
    server's own held-out data (``eval.source``, if any), and the server checks each joining
    client's base model against this one's fingerprint.
    """
    fed, seed = cfg.federation, cfg.run.seed
    if serve and fed.correction == "none":
        # The ablation leaves each client's copy apart from the global model, which a real
        # federation's clients (checked against the server at the end, resumed from it) cannot be.
        raise ConfigError(
            "federation.correction=none is a simulation ablation; a networked federation applies "
            "every aggregate (use federation.correction=replace)"
        )
    device = torch.device(cfg.client_devices()[0])  # the first client's: a mix is unusual
    if (
        cfg.model.frozen_dtype != "fp32"
        and resolve_precision(cfg.train.precision, device) != "bf16"
    ):
        raise ConfigError(
            f"model.frozen_dtype={cfg.model.frozen_dtype} needs a bf16 forward, but train.precision"
            f"={cfg.train.precision} is fp32 on this {device.type} (no fast bf16); use fp32"
        )
    if cfg.run.client_devices and not serve:  # (a local run: the config checks that)
        for d in sorted(set(cfg.client_devices())):
            train_device(d, "run.client_devices")  # one line now, before the model loads
    if cfg.model.frozen_dtype in QUANTISED and not serve:
        int8_available(
            cfg.model.frozen_dtype
        )  # the clients of this process need torchao: say so before loading
    torch.manual_seed(seed)
    model = load_model(cfg.model.name_or_path)
    fingerprint = model_fingerprint(model) if serve else ""  # of the base, before any adapter
    lora = lora_settings(cfg)
    blocks, selected = layout(
        model,
        fed.algorithm,
        cfg.model.extra_blocks,
        cfg.model.blocks,
        lora,
        seed,
        cfg.model.block_size,
    )
    check_plan(fed.algorithm, selected)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    pad_id = tokenizer.pad_token_id
    if serve:
        cfg, plan = _private(cfg, selected, None)
        server = _server(cfg, model, blocks, plan, fingerprint)
        return _serving(cfg, server, tokenizer, selected)
    train_stats, heldout_stats = DataStats(), DataStats()
    train_records, heldout_records = train_and_heldout(
        cfg.data.source,
        cfg.data.train_size,
        max(cfg.eval.size, cfg.eval.accuracy_size),
        seed,
        heldout_spec=cfg.eval.source,
        label_field=cfg.data.label_field,
        stats=train_stats,
    )
    max_len = cfg.data.max_length
    client_sources = cfg.data.client_source_list()
    if cfg.data.partition == "per_client":
        # Each client's data is its own source, drawn exactly as a networked client draws it
        # (no filtering against held-out data, which such a client cannot know); the records
        # drawn from data.source above are not trained on.
        train_records, train, parts = _per_client_train(
            cfg, client_sources, tokenizer, heldout_records, train_stats
        )
    else:
        train = encode_all(train_records, tokenizer, max_len, "train", train_stats)
    # The loss uses the first eval.size held-out items; accuracy the first eval.accuracy_size.
    heldout = encode_all(heldout_records[: cfg.eval.size], tokenizer, max_len, "held-out")
    encode_all(heldout_records, tokenizer, max_len, "held-out (all)", heldout_stats)
    if cfg.data.partition != "per_client":
        parts = partition(
            [e.group for e in train],
            fed.clients,
            cfg.data.partition,
            seed,
            alpha=cfg.data.alpha,
            weights=cfg.data.weights(),
        )
    pstats = client_stats(train, parts)
    for c in pstats:
        log.info(
            "client %d: %d examples, %d tokens, %d label(s)",
            c["client"],
            c["examples"],
            c["tokens"],
            len(c["labels"]),
        )
    data_stats = {
        "source": cfg.data.source,
        "eval_source": cfg.eval.source or cfg.data.source,
        "max_length": max_len,
        "train_records": len(train_records),
        "heldout_records": len(heldout_records),
        "train": train_stats.to_json(),
        "heldout": heldout_stats.to_json(),
    }
    if client_sources:
        data_stats["client_sources"] = client_sources

    cfg, plan = _private(cfg, selected, [len(part) for part in parts])
    fed = cfg.federation
    server = _server(cfg, model, blocks, plan, fingerprint)
    placements = [
        placement(cfg, i, tuple(train[j] for j in parts[i]), pad_id) for i in range(fed.clients)
    ]
    log.info(
        "%s: %d clients, %d rounds over blocks %s (%.1f MB per block), links up %s / down %s "
        "Mbit/s, %s ms%s",
        fed.algorithm,
        fed.clients,
        fed.rounds,
        selected,
        block_nbytes(model, blocks[selected[0]]) / 1e6,
        per_client_text(cfg.link.up_mbps),
        per_client_text(cfg.link.down_mbps),
        per_client_text(cfg.link.latency_ms),
        ""
        if fed.compute_slowdown == (1.0,)
        else f", compute slow-down {per_client_text(fed.compute_slowdown)}",
    )
    return Federation(
        cfg,
        server,
        placements,
        tokenizer,
        heldout,
        selected,
        heldout_records,
        pstats,
        data_stats,
    )


def _serving(cfg: Config, server: Server, tokenizer, selected: list[int]) -> Federation:
    """A server whose clients are remote: held-out data from ``eval.source`` only."""
    ev, stats = cfg.eval, DataStats()
    records, heldout = [], []
    if ev.source:
        n = max(ev.size, ev.accuracy_size)
        records = heldout_draw(ev.source, n, cfg.run.seed, cfg.data.label_field)
        heldout = encode_all(records[: ev.size], tokenizer, cfg.data.max_length, "held-out")
        encode_all(records, tokenizer, cfg.data.max_length, "held-out (all)", stats)
    else:
        log.info("no eval.source: the server evaluates nothing (clients' data never leaves them)")
    if cfg.federation.compute_slowdown != (1.0,) or not cfg.link.uniform():
        log.info(
            "link.* and federation.compute_slowdown pace simulated clients only; a networked "
            "client paces itself with its own --emulate-* and --compute-slowdown options"
        )
    log.info(
        "%s server: %d clients, %d rounds over blocks %s (%.1f MB per block)",
        cfg.federation.algorithm,
        cfg.federation.clients,
        cfg.federation.rounds,
        selected,
        block_nbytes(server.model, server.blocks[selected[0]]) / 1e6,
    )
    data_stats = {
        "eval_source": ev.source,
        "heldout_records": len(records),
        "heldout": stats.to_json(),
        "training_data": "stays with the clients",
    }
    return Federation(cfg, server, [], tokenizer, heldout, selected, records, [], data_stats)


def _private(cfg: Config, selected: list[int], records: list[int] | None):
    """The config the run goes by once ``[privacy]`` is resolved (the noise multiplier
    calibrated to ``privacy.target_epsilon``, the rounds ``privacy.max_epsilon`` allows), and its
    block plan. ``records``: each client's training records (None: remote clients)."""
    privacy, rounds = privacy_plan(cfg, records)
    if privacy.private:
        cfg = replace(
            cfg,
            federation=replace(cfg.federation, rounds=rounds),
            privacy=replace(cfg.privacy, noise_multiplier=privacy.noise_multiplier),
        )
    return cfg, make_plan(cfg.federation.schedule, selected, rounds, cfg.run.seed)


def _server(cfg: Config, model, blocks, plan: list[int], fingerprint: str) -> Server:
    fed = cfg.federation
    return Server(
        model,
        blocks,
        plan,
        clients=fed.clients,
        min_clients=fed.min_clients,
        aggregator=fed.aggregator,
        server_lr=fed.server_lr,
        trim_fraction=fed.trim_fraction,
        max_client_weight=fed.max_client_weight,
        max_update_norm=fed.max_update_norm,
        update_norm_action=fed.update_norm_action,
        update_bound=fed.update_bound,
        round_timeout_s=fed.round_timeout_s,
        settings=run_settings(cfg, plan),
        fingerprint=fingerprint,
        compression=cfg.link.compression,
    )
