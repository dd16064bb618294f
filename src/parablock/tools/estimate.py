"""``parablock estimate``: the per-round timing model, for scales this machine cannot run.

Per round, with B the bytes of the block in flight (real parameter counts of that block times the
payload dtype's size) and the links of ``link.*``::

    T_up   = latency + 8 B / up_bandwidth          T_down = latency + 8 B / down_bandwidth
    T_comm = T_up + T_agg + T_down
    FedBCD round    = T_comp + T_comm              ParaBlock round = max(T_comp, T_comm)

Round 0 has nothing to send (both algorithms take T_comp), and the drain after round T-1 is one
communication phase; the mean round time (as ``metrics.round_times`` measures it) leaves the drain
out. Models: a local Hugging Face directory, the embedded ``smollm2-135m-instruct``, or
``arch:<name>`` for an architecture built on the meta device (no weights, no memory).
``--from-run`` predicts a finished run's mean round time from its own measured compute time, its
aggregation time and its link settings, and prints predicted against measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parablock.config import (
    Config,
    ConfigError,
    _coerce,
    _validate,
    from_dict,
    opt,
    per_client_value,
)
from parablock.core.blocks import model_blocks, select_blocks
from parablock.core.schedule import make_plan
from parablock.errors import EstimateError  # noqa: F401
from parablock.registry import Registry
from parablock.transport.link import LinkSpec

log = logging.getLogger(__name__)

ARCH_PREFIX = "arch:"
# Architecture presets (public config.json values); built without weights on the meta device.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEASURE_MAX_PARAMS = 2_000_000_000  # --measure builds real weights, AdamW state and activations


@dataclass(frozen=True)
class EstimateSettings:
    """The ``[estimate]`` section of an estimate preset (the rest is the ordinary config tree)."""

    compute_s: float = opt(
        0.0,
        "compute time per client per round in seconds (0 = step_s x federation.local_steps, "
        "or --measure)",
        ge=0.0,
    )
    step_s: float = opt(0.0, "seconds per optimizer step, if compute_s is 0", ge=0.0)
    aggregate_s: float = opt(0.0, "server aggregation time per round in seconds", ge=0.0)
    dtype: str = opt("float32", "dtype of block payloads on the wire", choices=tuple(DTYPES))
    seq_len: int = opt(0, "tokens per example for --measure (0 = data.max_length)", ge=0)


# -- loading ---------------------------------------------------------------------------------


def load(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[Config, EstimateSettings]:
    """An estimate preset: ``[estimate]`` plus any config sections; ``--set`` wins over the file."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"estimate file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"estimate file {p} is not valid TOML: {e}") from None
    est = data.pop("estimate", {})
    if not isinstance(est, dict):
        raise ConfigError("[estimate] must be a table of keys")
    for item in overrides:
        name, eq, value = item.partition("=")
        if not eq or name.count(".") != 1:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, key = name.strip().split(".")
        (est if section == "estimate" else data.setdefault(section, {}))[key] = value
    fields = {f.name: f for f in dataclasses.fields(EstimateSettings)}
    kwargs = {}
    for key, value in est.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key estimate.{key}; valid keys in [estimate]: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(f"estimate.{key}", fields[key], value)
    settings = EstimateSettings(**kwargs)
    _validate("estimate", settings)
    return from_dict(data), settings


# -- block sizes -----------------------------------------------------------------------------


def build_meta_model(name_or_path: str):
    """The model's modules with shapes but no storage (``torch.device('meta')``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name_or_path.startswith(ARCH_PREFIX):
        name = name_or_path[len(ARCH_PREFIX) :]
        if name not in ARCHITECTURES:
            raise ConfigError(
                f"model.name_or_path={name_or_path!r}: unknown architecture; valid: "
                + ", ".join(ARCH_PREFIX + a for a in ARCHITECTURES)
            )
        spec = dict(ARCHITECTURES[name])
        hf_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    else:
        from parablock.model import ModelError, resolve

        path = resolve(name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {e}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@dataclass(frozen=True)
class ModelSizes:
    total_params: int
    block_params: dict[int, int]  # selected block index -> parameter count
    block_names: dict[int, str]


def model_sizes(cfg: Config) -> ModelSizes:
    model = build_meta_model(cfg.model.name_or_path)
    blocks = model_blocks(model, cfg.model.extra_blocks)
    selected = select_blocks(blocks, cfg.model.blocks)
    params = dict(model.named_parameters())
    return ModelSizes(
        sum(p.numel() for p in params.values()),
        {i: sum(params[n].numel() for n in blocks[i].param_names) for i in selected},
        {i: blocks[i].name for i in selected},
    )


# -- the timing model ------------------------------------------------------------------------

# How one client's round time follows from its compute and communication times.
ROUND_MODELS: Registry[Callable[[float, float], float]] = Registry("round model")
ROUND_MODELS.add("fedbcd", lambda comp, comm: comp + comm)
ROUND_MODELS.add("parablock", lambda comp, comm: max(comp, comm))


def _links(cfg: Config, client: int) -> tuple[LinkSpec, LinkSpec]:
    up, down, latency = cfg.link.client(client)
    return LinkSpec(up, latency), LinkSpec(down, latency)


def client_comm_seconds(nbytes: float, cfg: Config, aggregate_s: float) -> list[float]:
    """Each client's T_up + T_agg + T_down for a block of ``nbytes``."""
    out = []
    for i in range(cfg.federation.clients):
        up, down = _links(cfg, i)
        out.append(up.seconds(int(nbytes)) + aggregate_s + down.seconds(int(nbytes)))
    return out


def comm_seconds(nbytes: float, cfg: Config, aggregate_s: float) -> float:
    """The slowest client's communication time: every round waits for its update."""
    return max(client_comm_seconds(nbytes, cfg, aggregate_s))


def client_compute_seconds(cfg: Config, compute_s: float) -> list[float]:
    """Each client's T_comp: ``compute_s`` times its ``federation.compute_slowdown``."""
    f = cfg.federation
    return [compute_s * per_client_value(f.compute_slowdown, i) for i in range(f.clients)]


def round_seconds(algorithm: str, comps: Sequence[float], comms: Sequence[float]) -> float:
    """A round with every client: the slowest client's round. (In the steady state each client
    starts a round when it has the last aggregate, so the period is the largest cycle through
    the server: max over clients of its own comp + comm, or max(comp, comm).)"""
    model = ROUND_MODELS.get(algorithm)
    return max(model(c, m) for c, m in zip(comps, comms, strict=True))


def mean_round_s(
    algorithm: str,
    plan: Sequence[int],
    block_bytes: dict[int, float],
    compute_s: float,
    cfg: Config,
    aggregate_s: float,
) -> float:
    """Mean over rounds 0..T-1; round t communicates the block trained in round t-1."""
    comps = client_compute_seconds(cfg, compute_s)
    times = [max(comps)]
    for t in range(1, len(plan)):
        comms = client_comm_seconds(block_bytes[plan[t - 1]], cfg, aggregate_s)
        times.append(round_seconds(algorithm, comps, comms))
    return sum(times) / len(times)


def _scaled(cfg: Config, factor: float) -> Config:
    """``cfg`` with every client's bandwidths times ``factor``."""
    link = cfg.link
    return cfg.replace(
        link={
            "up_mbps": tuple(v * factor for v in link.up_mbps),
            "down_mbps": tuple(v * factor for v in link.down_mbps),
        }
    )


def _as_set(values: tuple[float, ...]) -> float | list[float]:
    """A per-client value as the config holds it: one number, or one per client."""
    return values[0] if len(set(values)) == 1 else list(values)


def crossover(
    nbytes: float, compute_s: float, cfg: Config, aggregate_s: float
) -> tuple[float | list[float], float | list[float]] | None:
    """Up/down bandwidths (Mbit/s; every client's at the configured ratios) where the slowest
    client's T_comm equals the slowest T_comp.

    None when no bandwidth gets there: latency and aggregation alone already exceed T_comp for a
    client, or the links are unlimited.
    """
    target = max(client_compute_seconds(cfg, compute_s))
    factor = 0.0  # the smallest scale at which every client's T_comm <= target
    for i in range(cfg.federation.clients):
        up, down, latency = cfg.link.client(i)
        inv = sum(0.0 if math.isinf(b) else 1.0 / b for b in (up, down))  # s per Mbit at scale 1
        fixed = 2 * latency / 1000 + aggregate_s
        if target <= fixed:
            return None
        factor = max(factor, 8 * nbytes / 1e6 * inv / (target - fixed))
    if factor == 0:
        return None
    link = _scaled(cfg, factor).link
    return _as_set(link.up_mbps), _as_set(link.down_mbps)


# When a client's upload starts, from the start of its round: FedBCD's after its compute,
# ParaBlock's at once (the previous round's delta goes up under the compute).
UPLOAD_STARTS: Registry[Callable[[float], float]] = Registry("upload start")
UPLOAD_STARTS.add("fedbcd", lambda comp: comp)
UPLOAD_STARTS.add("parablock", lambda comp: 0.0)


def deadline_round(
    algorithm: str, clients: Sequence[dict], aggregate_s: float, min_clients: int, timeout_s: float
) -> tuple[float, list[int]]:
    """One round, every client starting it together, that the server closes ``timeout_s`` after
    the first update once ``min_clients`` are in (or when all are): the round time of the
    clients in it (each done at max(T_comp, close + T_agg + T_down)) and the clients left out.
    ``clients``: per-client ``compute_s``, ``upload_s``, ``download_s``."""
    start = UPLOAD_STARTS.get(algorithm)
    arrive = [start(c["compute_s"]) + c["upload_s"] for c in clients]
    a = sorted(arrive)
    close = max(a[min_clients - 1], min(a[-1], a[0] + timeout_s))
    left = [i for i, t in enumerate(arrive) if t > close]
    secs = max(
        max(c["compute_s"], close + aggregate_s + c["download_s"])
        for i, c in enumerate(clients)
        if i not in left
    )
    return secs, left


def resolve_compute_s(cfg: Config, est: EstimateSettings, measured: float | None) -> float:
    if measured is not None:
        return measured
    if est.compute_s > 0:
        return est.compute_s
    if est.step_s > 0:
        return est.step_s * cfg.federation.local_steps
    raise EstimateError(
        "no compute time: set estimate.compute_s or estimate.step_s, or pass --measure"
    )


def estimate(cfg: Config, est: EstimateSettings, measured_compute_s: float | None = None) -> dict:
    """Per-round times for every algorithm (per client when clients differ), the speed-up,
    crossover, a bandwidth sweep, and what ``federation.min_clients`` does about a slow client."""
    sizes = model_sizes(cfg)
    width = DTYPES[est.dtype]
    block_bytes = {i: n * width for i, n in sizes.block_params.items()}
    fed = cfg.federation
    plan = make_plan(fed.schedule, sorted(block_bytes), fed.rounds, cfg.run.seed)
    compute = resolve_compute_s(cfg, est, measured_compute_s)
    mean_bytes = sum(block_bytes[b] for b in plan) / len(plan)
    comps = client_compute_seconds(cfg, compute)
    comms = client_comm_seconds(mean_bytes, cfg, est.aggregate_s)
    clients = []
    for i in range(fed.clients):
        up, down = _links(cfg, i)
        row = {
            "client": i,
            "up_mbps": up.mbps,
            "down_mbps": down.mbps,
            "latency_ms": up.latency_ms,
            "compute_s": comps[i],
            "upload_s": up.seconds(int(mean_bytes)),
            "download_s": down.seconds(int(mean_bytes)),
            "comm_s": comms[i],
        }
        for alg in ROUND_MODELS:
            row[f"{alg}_round_s"] = ROUND_MODELS.get(alg)(comps[i], comms[i])
        clients.append(row)
    steady = {alg: round_seconds(alg, comps, comms) for alg in ROUND_MODELS}
    means = {
        alg: mean_round_s(alg, plan, block_bytes, compute, cfg, est.aggregate_s)
        for alg in ROUND_MODELS
    }
    # Whole run: T rounds plus the drain (one more communication phase, the slowest client's).
    totals = {alg: means[alg] * fed.rounds + max(comms) for alg in ROUND_MODELS}
    cross = crossover(mean_bytes, compute, cfg, est.aggregate_s)
    sweep = []
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        c = _scaled(cfg, factor)
        cms = client_comm_seconds(mean_bytes, c, est.aggregate_s)
        fb, pb = round_seconds("fedbcd", comps, cms), round_seconds("parablock", comps, cms)
        sweep.append(
            {
                "factor": factor,
                "up_mbps": _as_set(c.link.up_mbps),
                "down_mbps": _as_set(c.link.down_mbps),
                "comm_s": max(cms),
                "fedbcd_round_s": fb,
                "parablock_round_s": pb,
                "speedup": fb / pb,
            }
        )
    return {
        "model": cfg.model.name_or_path,
        "total_params": sizes.total_params,
        "blocks": cfg.model.blocks,
        "block_params": sizes.block_params,
        "dtype": est.dtype,
        "mean_block_bytes": mean_bytes,
        "clients": fed.clients,
        "rounds": fed.rounds,
        "up_mbps": _as_set(cfg.link.up_mbps),
        "down_mbps": _as_set(cfg.link.down_mbps),
        "latency_ms": _as_set(cfg.link.latency_ms),
        "compute_slowdown": _as_set(fed.compute_slowdown),
        "compute_s": compute,
        "compute_source": "measured here" if measured_compute_s is not None else "given",
        "upload_s": max(c["upload_s"] for c in clients),
        "aggregate_s": est.aggregate_s,
        "download_s": max(c["download_s"] for c in clients),
        "comm_s": max(comms),
        "fedbcd_round_s": steady["fedbcd"],
        "parablock_round_s": steady["parablock"],
        "speedup": steady["fedbcd"] / steady["parablock"],
        "mean_round_s": means,
        "total_s": totals,
        "crossover_mbps": None if cross is None else {"up": cross[0], "down": cross[1]},
        "sweep": sweep,
        "heterogeneous": len({(c["compute_s"], c["comm_s"]) for c in clients}) > 1,
        "per_client": clients,
        "slowest": _slowest(cfg, clients, est.aggregate_s),
    }


def _slowest(cfg: Config, clients: list[dict], aggregate_s: float) -> dict[str, dict | None]:
    """Per algorithm: the client every round waits for, and whether ``federation.min_clients``
    lets rounds close without it (``round_timeout_s`` after the first update); None for an
    algorithm whose clients all take equally long (e.g. a slow link that ParaBlock hides).

    A round closed at the deadline takes about ``closes_without_s``; the server then drops the
    late client, so until it rejoins the rounds wait for the others only (``others_round_s``)."""
    fed = cfg.federation
    m = fed.min_clients or fed.clients
    out: dict[str, dict | None] = {}
    for alg in ROUND_MODELS:
        rounds = [c[f"{alg}_round_s"] for c in clients]
        worst = max(range(len(rounds)), key=rounds.__getitem__)
        others = max((r for i, r in enumerate(rounds) if i != worst), default=rounds[worst])
        if others >= rounds[worst]:
            out[alg] = None
            continue
        closed, left = deadline_round(alg, clients, aggregate_s, m, fed.round_timeout_s)
        out[alg] = {
            "client": worst,
            "round_s": rounds[worst],
            "others_round_s": others,
            "clients": fed.clients,
            "min_clients": m,
            "round_timeout_s": fed.round_timeout_s,
            "closes_without_s": closed if left else None,
            "left_out": left,
        }
    return out


def _mbps(v: float | list[float]) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"


def format_estimate(r: dict) -> str:
    mb = r["mean_block_bytes"] / 1e6
    slow = (
        ""
        if r["compute_slowdown"] == 1.0
        else f", compute slow-down {_mbps(r['compute_slowdown'])}"
    )
    lines = [
        f"model {r['model']}: {r['total_params'] / 1e6:,.1f} M parameters; blocks {r['blocks']} "
        f"({len(r['block_params'])} selected), {mb:,.2f} MB per block ({r['dtype']})",
        f"{r['clients']} clients, {r['rounds']} rounds; links up {_mbps(r['up_mbps'])} / down "
        f"{_mbps(r['down_mbps'])} Mbit/s, latency {_mbps(r['latency_ms'])} ms{slow}",
        f"T_comp {r['compute_s']:.3f} s ({r['compute_source']}); T_up {r['upload_s']:.3f} s, "
        f"T_agg {r['aggregate_s']:.3f} s, T_down {r['download_s']:.3f} s -> T_comm "
        f"{r['comm_s']:.3f} s" + (" (the slowest client's)" if r["heterogeneous"] else ""),
    ]
    if r["heterogeneous"]:
        lines.append("  client  T_comp s  T_up s  T_down s  T_comm s  FedBCD s  ParaBlock s")
        for c in r["per_client"]:
            lines.append(
                f"  {c['client']:6d}  {c['compute_s']:8.3f}  {c['upload_s']:6.3f}  "
                f"{c['download_s']:8.3f}  {c['comm_s']:8.3f}  {c['fedbcd_round_s']:8.3f}  "
                f"{c['parablock_round_s']:11.3f}"
            )
    lines += [
        f"per round (steady state): FedBCD {r['fedbcd_round_s']:.3f} s = T_comp + T_comm; "
        f"ParaBlock {r['parablock_round_s']:.3f} s = max(T_comp, T_comm); "
        f"speed-up {r['speedup']:.3f}x (at most 2x)",
        f"whole run ({r['rounds']} rounds + drain): FedBCD {r['total_s']['fedbcd']:,.1f} s, "
        f"ParaBlock {r['total_s']['parablock']:,.1f} s",
    ]
    lines += _format_slowest(r["slowest"])
    c = r["crossover_mbps"]
    if c is None:
        lines.append(
            "crossover: none; latency + aggregation alone exceed T_comp (or links unlimited)"
        )
    else:
        lines.append(
            f"crossover: T_comm = T_comp at up {_mbps(c['up'])} / down {_mbps(c['down'])} Mbit/s "
            "(the best case for ParaBlock, 2x); faster links: compute-bound, slower: comm-bound"
        )
    lines.append("bandwidth sweep (every link times the factor):")
    lines.append("  factor  up Mbit/s  down Mbit/s   T_comm s   FedBCD s  ParaBlock s  speed-up")
    for s in r["sweep"]:
        lines.append(
            f"  {s['factor']:6g}  {_mbps(s['up_mbps']):>9}  {_mbps(s['down_mbps']):>11}  "
            f"{s['comm_s']:9.3f}  {s['fedbcd_round_s']:9.3f}  {s['parablock_round_s']:11.3f}  "
            f"{s['speedup']:8.3f}"
        )
    return "\n".join(lines)


def _format_slowest(slowest: dict[str, dict | None]) -> list[str]:
    lines = []
    for alg, s in slowest.items():
        if s is None:
            continue
        head = (
            f"{alg}: every round waits for client {s['client']} ({s['round_s']:.3f} s; the "
            f"others {s['others_round_s']:.3f} s)"
        )
        m, timeout = s["min_clients"], s["round_timeout_s"]
        if s["closes_without_s"] is not None:
            who = ", ".join(map(str, s["left_out"]))
            lines.append(
                f"{head}, unless federation.min_clients={m} closes the round without client(s) "
                f"{who}: about {s['closes_without_s']:.3f} s for a round closed at the deadline "
                f"(round_timeout_s={timeout:g} after the first update), {s['others_round_s']:.3f} "
                "s while the server has dropped them; their updates miss those rounds and they "
                "rejoin at the open round"
            )
        elif m < s["clients"]:
            lines.append(
                f"{head}; federation.min_clients={m} could close rounds without it, but "
                f"round_timeout_s={timeout:g} is longer than the wait"
            )
        else:
            lines.append(
                f"{head}; federation.min_clients < {s['clients']} with a shorter round_timeout_s "
                "would let rounds close without it"
            )
    return lines


# -- measuring compute here ------------------------------------------------------------------


def measure_compute_s(cfg: Config, est: EstimateSettings, repeats: int = 2) -> float:
    """Time one round of local block training here (K steps), mean of the lowest and highest
    selected blocks (backward depth, hence cost, varies between them), torch threads shared out
    over ``federation.clients`` as in a local run."""
    from parablock.backends.local import torch_threads
    from parablock.core.train import TrainSettings, train_block
    from parablock.data.examples import Example
    from parablock.model import load_model

    if cfg.model.name_or_path.startswith(ARCH_PREFIX):
        sizes = model_sizes(cfg)
        if sizes.total_params > MEASURE_MAX_PARAMS:
            raise EstimateError(
                f"--measure: {cfg.model.name_or_path} has {sizes.total_params / 1e9:.1f} B "
                "parameters, too large to train here; give estimate.compute_s instead"
            )
        from transformers import AutoModelForCausalLM

        meta = build_meta_model(cfg.model.name_or_path)
        model = AutoModelForCausalLM.from_config(meta.config, dtype=torch.float32)
    else:
        model = load_model(cfg.model.name_or_path)
    blocks = model_blocks(model, cfg.model.extra_blocks)
    selected = select_blocks(blocks, cfg.model.blocks)
    fed = cfg.federation
    seq = est.seq_len or cfg.data.max_length
    gen = torch.Generator().manual_seed(cfg.run.seed)
    vocab = model.config.vocab_size
    data = []
    for _ in range(fed.batch_size):
        ids = tuple(torch.randint(0, vocab, (seq,), generator=gen).tolist())
        data.append(Example(ids, ids))
    batches = [list(range(fed.batch_size))] * fed.local_steps
    settings = TrainSettings(fed.local_steps, fed.batch_size, fed.lr, grad_clip=fed.grad_clip)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads(fed.clients, cfg.run.threads))
    try:
        times = []
        for b in sorted({selected[0], selected[-1]}):
            train_block(model, blocks[b], data, batches[:1], settings, 0)  # warm-up
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                train_block(model, blocks[b], data, batches, settings, 0)
                best = min(best, time.perf_counter() - start)
            times.append(best)
    finally:
        torch.set_num_threads(before)
    return sum(times) / len(times)


# -- checking against a finished run ---------------------------------------------------------


def from_run(path: str | Path) -> list[dict]:
    """Predict each run's mean round time from its measured compute, aggregation and links."""
    from parablock.config import load as load_config
    from parablock.tools.report import find_runs

    out = []
    for run in find_runs(path):
        if run.summary["algorithm"] not in ROUND_MODELS:  # e.g. fedit_lora: its own blocks
            log.warning(
                "%s: no timing model for %s yet; skipped", run.path, run.summary["algorithm"]
            )
            continue
        cfg = load_config(run.path / "config.toml")
        model_dir = run.path / "model"
        if (model_dir / "config.json").is_file():  # the run's own architecture, weights unread
            cfg = cfg.replace(model={"name_or_path": str(model_dir)})
        sizes = model_sizes(cfg)
        block_bytes = {i: n * DTYPES["float32"] for i, n in sizes.block_params.items()}
        plan = run.summary.get("plan") or make_plan(
            cfg.federation.schedule, sorted(block_bytes), cfg.federation.rounds, cfg.run.seed
        )
        aggs = [float(r.get("aggregate_s", 0.0)) for r in run.rounds]
        agg = sum(aggs) / len(aggs) if aggs else 0.0
        # the measured mean over clients includes their compute slow-downs: the model's base
        # compute is the time that, slowed down per client, has that mean
        f = cfg.federation
        slow = sum(per_client_value(f.compute_slowdown, i) for i in range(f.clients))
        compute = float(run.summary["mean_compute_s"]) * f.clients / slow
        predicted = {
            alg: mean_round_s(alg, plan, block_bytes, compute, cfg, agg) for alg in ROUND_MODELS
        }
        alg = run.summary["algorithm"]
        measured = float(run.summary["mean_round_s"])
        ups = [r["bytes_up"] for r in run.client_rounds if r.get("bytes_up")]
        out.append(
            {
                "run_dir": str(run.path),
                "algorithm": alg,
                "compute_s": compute,
                "aggregate_s": agg,
                "predicted_block_bytes": sum(block_bytes[b] for b in plan) / len(plan),
                "measured_upload_bytes": sum(ups) / len(ups) if ups else None,
                "predicted_mean_round_s": predicted[alg],
                "measured_mean_round_s": measured,
                "error": predicted[alg] / measured - 1 if measured > 0 else math.nan,
                "predicted_by_algorithm": predicted,
            }
        )
    return out


def format_from_run(rows: list[dict]) -> str:
    lines = ["run                              algorithm  T_comp s  predicted s  measured s  error"]
    for r in rows:
        lines.append(
            f"{r['run_dir'][-32:]:32} {r['algorithm']:10} {r['compute_s']:8.3f} "
            f"{r['predicted_mean_round_s']:12.3f} {r['measured_mean_round_s']:11.3f} "
            f"{r['error'] * 100:+6.1f}%"
        )
    for r in rows:
        if r["measured_upload_bytes"]:
            lines.append(
                f"{r['algorithm']}: block bytes from parameter counts {r['predicted_block_bytes']:,.0f}"
                f", measured upload payload {r['measured_upload_bytes']:,.0f} (+ message header)"
            )
    ok = all(abs(r["error"]) <= 0.15 for r in rows)
    lines.append(
        f"all predictions within 15% of the measured mean round time: {'yes' if ok else 'no'}"
    )
    return "\n".join(lines)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
