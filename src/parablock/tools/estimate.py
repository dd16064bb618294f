"""``parablock estimate``: the per-round timing model, for scales this machine cannot run.

Per round, with B the bytes of the block in flight (real parameter counts of that block times the
payload dtype's size) and the links of ``link.*``::

    T_up   = latency + 8 B / up_bandwidth          T_down = latency + 8 B / down_bandwidth
    T_comm = T_up + T_agg + T_down
    FedBCD round    = T_comp + T_comm              ParaBlock round = max(T_comp, T_comm)
    fedavg_full     = T_comp_full + T_comm over the whole model (B = every parameter)
    cyclic round t  = T_down(blocks moved since the round's client last had its turn)
                      + T_comp + T_up + T_agg      (turns are sequential across clients)

Round 0 has nothing to send (FedBCD, ParaBlock and fedavg_full take T_comp), and the drain after
round T-1 is one communication phase (for cyclic: the longest catch-up of a client on the last
rounds); the mean round time (as ``metrics.round_times`` measures it) leaves the drain out.
``T_comp_full`` is ``estimate.full_compute_s``, timed by ``--measure``, or assumed to be
``FULL_COMPUTE_FACTOR`` x ``T_comp`` (a full backward costs about two forwards, a block's backward
stops at the block). Models: a local Hugging Face directory, the embedded ``smollm2-135m-instruct``, or
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

from parablock.config import Config, ConfigError, _coerce, _validate, from_dict, opt
from parablock.core.algorithms import ALGORITHMS
from parablock.core.schedule import layout, make_plan, protocol_blocks
from parablock.errors import EstimateError  # noqa: F401
from parablock.model.architectures import ARCH_PREFIX, ARCHITECTURES  # noqa: F401
from parablock.model.blocks import model_blocks, select_blocks
from parablock.model.load import build_meta_model
from parablock.registry import Registry
from parablock.transport.link import LinkSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEASURE_MAX_PARAMS = 2_000_000_000  # --measure builds real weights, AdamW state and activations
FULL_COMPUTE_FACTOR = 3.0  # fedavg_full's round over a block round's, when neither is measured


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
    full_compute_s: float = opt(
        0.0,
        "compute time per client per round when every parameter trains (fedavg_full); 0 = "
        f"--measure times it, else {FULL_COMPUTE_FACTOR:g} x the block compute time (assumed)",
        ge=0.0,
    )
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


@dataclass(frozen=True)
class ModelSizes:
    total_params: int
    block_params: dict[int, int]  # selected block index -> parameter count
    block_names: dict[int, str]


def model_sizes(cfg: Config, algorithm: str = "") -> ModelSizes:
    """Parameter counts of the selected blocks, as ``algorithm`` forms them (by default the
    model's blocks; fedavg_full: one block of every parameter)."""
    model = build_meta_model(cfg.model.name_or_path)
    blocks, selected = layout(
        model,
        algorithm,
        cfg.model.extra_blocks,
        cfg.model.blocks,
        block_size=cfg.model.block_size,
    )
    params = dict(model.named_parameters())
    return ModelSizes(
        sum(p.numel() for p in params.values()),
        {i: sum(params[n].numel() for n in blocks[i].param_names) for i in selected},
        {i: blocks[i].name for i in selected},
    )


# -- the timing model ------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundInputs:
    """What a round's time depends on: the plan, the bytes of each block that travels, the
    compute time of one client's round, the links and the aggregation time."""

    plan: Sequence[int]
    block_bytes: dict[int, float]
    compute_s: float
    cfg: Config
    aggregate_s: float

    def comm_s(self, block: int) -> float:
        return comm_seconds(self.block_bytes[block], self.cfg, self.aggregate_s)

    def stale(self, t: int) -> set[int]:
        """The blocks round t's client lacks in an in-turn algorithm: those the rounds since its
        own last turn moved (its own last block it downloaded then, except with one client,
        where that download comes right before its next turn)."""
        n = max(self.cfg.federation.clients, 2)
        return set(self.plan[max(0, t - n + 1) : t])

    def catch_up_s(self, t: int) -> float:
        _, down = _links(self.cfg)
        return sum(down.seconds(int(self.block_bytes[b])) for b in self.stale(t))


def _sequential(x: RoundInputs, t: int) -> float:
    """Download the last aggregate, then train (FedBCD, fedavg_full)."""
    return x.compute_s + (x.comm_s(x.plan[t - 1]) if t else 0.0)


def _parallel(x: RoundInputs, t: int) -> float:
    """Train while the last delta travels (ParaBlock)."""
    return max(x.compute_s, x.comm_s(x.plan[t - 1])) if t else x.compute_s


def _in_turn(x: RoundInputs, t: int) -> float:
    """One client catches up, trains and uploads while the others wait (cyclic)."""
    up, _ = _links(x.cfg)
    return x.catch_up_s(t) + x.compute_s + up.seconds(int(x.block_bytes[x.plan[t]])) + x.aggregate_s


# How round t's time follows from the run's inputs, per shape (each algorithm names its own,
# ``Algorithm.round_model``).
SHAPES: Registry[Callable[[RoundInputs, int], float]] = Registry("round model")
SHAPES.add("sequential", _sequential)
SHAPES.add("parallel", _parallel)
SHAPES.add("in_turn", _in_turn)


def modelled() -> list[str]:
    """The algorithms with a round-time model, by name."""
    return [a for a in ALGORITHMS.names() if ALGORITHMS.get(a).round_model is not None]


def round_model(algorithm: str) -> Callable[[RoundInputs, int], float]:
    shape = ALGORITHMS.get(algorithm).round_model
    if shape is None:
        raise ConfigError(f"federation.algorithm={algorithm} has no round-time model")
    return SHAPES.get(shape)


def drain_s(algorithm: str, x: RoundInputs) -> float:
    """After round T-1: the last delta's upload, aggregate and download, or for an in-turn
    algorithm the longest catch-up of a client on the last rounds."""
    if ALGORITHMS.get(algorithm).in_turn:
        return x.catch_up_s(len(x.plan))
    return x.comm_s(x.plan[-1])


def _worst(cfg: Config) -> tuple[float, float, float]:
    """The slowest links of the clients (up, down Mbit/s, latency ms): a round waits for them."""
    links = [cfg.link.client(i) for i in range(cfg.federation.clients)]
    return min(u for u, _, _ in links), min(d for _, d, _ in links), max(x for _, _, x in links)


def _links(cfg: Config) -> tuple[LinkSpec, LinkSpec]:
    up, down, latency = _worst(cfg)
    return LinkSpec(up, latency), LinkSpec(down, latency)


def comm_seconds(nbytes: float, cfg: Config, aggregate_s: float) -> float:
    up, down = _links(cfg)
    return up.seconds(int(nbytes)) + aggregate_s + down.seconds(int(nbytes))


def mean_round_s(algorithm: str, x: RoundInputs) -> float:
    """Mean over rounds 0..T-1 of ``algorithm``'s round time."""
    model = round_model(algorithm)
    return sum(model(x, t) for t in range(len(x.plan))) / len(x.plan)


def crossover(
    nbytes: float, compute_s: float, cfg: Config, aggregate_s: float
) -> tuple[float, float] | None:
    """Up/down bandwidths (Mbit/s, at the configured up:down ratio) where T_comm = T_comp.

    None when no bandwidth gets there: latency and aggregation alone already exceed T_comp, or the
    links are unlimited.
    """
    up, down, _ = _worst(cfg)
    inv = sum(0.0 if math.isinf(b) else 1.0 / b for b in (up, down))  # s per Mbit at scale 1
    fixed = 2 * _worst(cfg)[2] / 1000 + aggregate_s
    if inv == 0 or compute_s <= fixed:
        return None
    scale = 8 * nbytes / 1e6 * inv / (compute_s - fixed)
    return up * scale, down * scale


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


def resolve_full_compute_s(
    est: EstimateSettings, compute_s: float, measured: float | None
) -> tuple[float, str]:
    """fedavg_full's compute time per round, and where it comes from."""
    if measured is not None:
        return measured, "measured here"
    if est.full_compute_s > 0:
        return est.full_compute_s, "given"
    return FULL_COMPUTE_FACTOR * compute_s, f"assumed {FULL_COMPUTE_FACTOR:g} x T_comp"


def round_inputs(
    cfg: Config, algorithm: str, width: int, compute_s: float, aggregate_s: float
) -> RoundInputs:
    """The inputs of ``algorithm``'s rounds: its blocks' bytes and the run's plan over them."""
    sizes = model_sizes(cfg, algorithm)
    block_bytes = {i: n * width for i, n in sizes.block_params.items()}
    fed = cfg.federation
    plan = make_plan(fed.schedule, sorted(block_bytes), fed.rounds, cfg.run.seed)
    return RoundInputs(plan, block_bytes, compute_s, cfg, aggregate_s)


def estimate(
    cfg: Config,
    est: EstimateSettings,
    measured_compute_s: float | None = None,
    measured_full_s: float | None = None,
) -> dict:
    """Per-round times for every algorithm, the speed-up, crossover and a bandwidth sweep."""
    sizes = model_sizes(cfg)
    width = DTYPES[est.dtype]
    fed = cfg.federation
    compute = resolve_compute_s(cfg, est, measured_compute_s)
    full, full_source = resolve_full_compute_s(est, compute, measured_full_s)
    inputs = {
        alg: round_inputs(
            cfg, alg, width, full if ALGORITHMS.get(alg).whole_model else compute, est.aggregate_s
        )
        for alg in modelled()
    }
    plan, block_bytes = inputs["fedbcd"].plan, inputs["fedbcd"].block_bytes
    mean_bytes = sum(block_bytes[b] for b in plan) / len(plan)
    up, down = _links(cfg)
    t_up, t_down = up.seconds(int(mean_bytes)), down.seconds(int(mean_bytes))
    comm = t_up + est.aggregate_s + t_down
    steady = {"fedbcd": compute + comm, "parablock": max(compute, comm)}
    means = {alg: mean_round_s(alg, x) for alg, x in inputs.items()}
    # Whole run: T rounds plus the drain.
    totals = {alg: means[alg] * fed.rounds + drain_s(alg, x) for alg, x in inputs.items()}
    cross = crossover(mean_bytes, compute, cfg, est.aggregate_s)
    sweep = []
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        c = cfg.replace(link={"up_mbps": up.mbps * factor, "down_mbps": down.mbps * factor})
        cm = comm_seconds(mean_bytes, c, est.aggregate_s)
        sweep.append(
            {
                "up_mbps": _worst(c)[0],
                "down_mbps": _worst(c)[1],
                "comm_s": cm,
                "fedbcd_round_s": compute + cm,
                "parablock_round_s": max(compute, cm),
                "speedup": (compute + cm) / max(compute, cm),
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
        "up_mbps": _worst(cfg)[0],
        "down_mbps": _worst(cfg)[1],
        "latency_ms": _worst(cfg)[2],
        "compute_s": compute,
        "compute_source": "measured here" if measured_compute_s is not None else "given",
        "upload_s": t_up,
        "aggregate_s": est.aggregate_s,
        "download_s": t_down,
        "comm_s": comm,
        "fedbcd_round_s": steady["fedbcd"],
        "parablock_round_s": steady["parablock"],
        "speedup": steady["fedbcd"] / steady["parablock"],
        "mean_round_s": means,
        "total_s": totals,
        "full_compute_s": full,
        "full_compute_source": full_source,
        "whole_model_bytes": inputs["fedavg_full"].block_bytes[0],
        "crossover_mbps": None if cross is None else {"up": cross[0], "down": cross[1]},
        "sweep": sweep,
    }


def format_estimate(r: dict) -> str:
    mb = r["mean_block_bytes"] / 1e6
    lines = [
        f"model {r['model']}: {r['total_params'] / 1e6:,.1f} M parameters; blocks {r['blocks']} "
        f"({len(r['block_params'])} selected), {mb:,.2f} MB per block ({r['dtype']})",
        f"{r['clients']} clients, {r['rounds']} rounds; links up {r['up_mbps']:g} / down "
        f"{r['down_mbps']:g} Mbit/s, latency {r['latency_ms']:g} ms",
        f"T_comp {r['compute_s']:.3f} s ({r['compute_source']}); T_up {r['upload_s']:.3f} s, "
        f"T_agg {r['aggregate_s']:.3f} s, T_down {r['download_s']:.3f} s -> T_comm "
        f"{r['comm_s']:.3f} s",
        f"per round (steady state): FedBCD {r['fedbcd_round_s']:.3f} s = T_comp + T_comm; "
        f"ParaBlock {r['parablock_round_s']:.3f} s = max(T_comp, T_comm); "
        f"speed-up {r['speedup']:.3f}x (at most 2x)",
        f"baselines: fedavg_full sends the whole model ({r['whole_model_bytes'] / 1e6:,.1f} MB) "
        f"each way and trains every parameter (T_comp_full {r['full_compute_s']:.3f} s, "
        f"{r['full_compute_source']}): mean round {r['mean_round_s']['fedavg_full']:.3f} s; "
        f"cyclic: one client per round, catch-up + T_comp + T_up + T_agg: mean round "
        f"{r['mean_round_s']['cyclic']:.3f} s",
        f"whole run ({r['rounds']} rounds + drain): "
        + ", ".join(f"{alg} {r['total_s'][alg]:,.1f} s" for alg in modelled()),
    ]
    c = r["crossover_mbps"]
    if c is None:
        lines.append(
            "crossover: none; latency + aggregation alone exceed T_comp (or links unlimited)"
        )
    else:
        lines.append(
            f"crossover: T_comm = T_comp at up {c['up']:,.1f} / down {c['down']:,.1f} Mbit/s "
            "(the best case for ParaBlock, 2x); faster links: compute-bound, slower: comm-bound"
        )
    lines.append("bandwidth sweep (same up:down ratio):")
    lines.append("  up Mbit/s  down Mbit/s   T_comm s   FedBCD s  ParaBlock s  speed-up")
    for s in r["sweep"]:
        lines.append(
            f"  {s['up_mbps']:9.1f}  {s['down_mbps']:11.1f}  {s['comm_s']:9.3f}  "
            f"{s['fedbcd_round_s']:9.3f}  {s['parablock_round_s']:11.3f}  {s['speedup']:8.3f}"
        )
    return "\n".join(lines)


# -- measuring compute here ------------------------------------------------------------------


def measure_compute_s(
    cfg: Config, est: EstimateSettings, repeats: int = 2, whole_model: bool = False
) -> float:
    """Time one round of local block training here (K steps), mean of the lowest and highest
    selected blocks (backward depth, hence cost, varies between them), torch threads shared out
    over ``federation.clients`` as in a local run; ``whole_model``: of every parameter at once
    (fedavg_full)."""
    from parablock.backends.local import torch_threads
    from parablock.data.examples import Example
    from parablock.model.load import load_model
    from parablock.model.train import TrainSettings, train_block

    if cfg.model.name_or_path.startswith(ARCH_PREFIX):
        sizes = model_sizes(cfg)
        if sizes.total_params > MEASURE_MAX_PARAMS:
            raise EstimateError(
                f"--measure: {cfg.model.name_or_path} has {sizes.total_params / 1e9:.1f} B "
                "parameters, too large to train here; give estimate.compute_s instead"
            )
    model = load_model(cfg.model.name_or_path)
    if whole_model:
        blocks, selected = protocol_blocks(model, "fedavg_full"), [0]
    else:
        blocks = model_blocks(model, cfg.model.extra_blocks, cfg.model.block_size)
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


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
