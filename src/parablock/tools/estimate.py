"""``parablock estimate``: the per-round timing model, for scales this machine cannot run.

Per round, with B the bytes of the block in flight (real parameter counts of that block times the
payload dtype's size) and the links of ``link.*``::

    T_up   = latency + 8 B / up_bandwidth          T_down = latency + 8 B / down_bandwidth
    T_comm = T_up + T_agg + T_down
    FedBCD round    = T_comp + T_comm              ParaBlock round = max(T_comp, T_comm)
    ParaBlock, full duplex (federation.duplex) = max(T_comp, T_up + T_agg, T_down,
                                                     (T_comp + T_comm) / 2)

Full duplex starts round t's upload right after compute t, beside round t-1's download; the last
term is the one-round staleness: compute t, its upload, aggregation and download must fit in the
two rounds before compute t+2 (``core/overlap.py``). Those are steady states; the mean and total
times come from ``simulate``, which plays the rounds of the plan through (each block's own size)
with identical clients: round 0 has nothing to send (both algorithms take T_comp), and the drain
after round T-1 is one more communication; the mean round time (as ``metrics.round_times``
measures it) leaves the drain out. With ``federation.local_steps_max`` a ParaBlock client keeps
stepping (T_comp / local_steps per step) while the next upload could not start yet, so rounds
stay as long and ``simulate`` counts the steps taken. Models: a local Hugging Face directory, the embedded ``smollm2-135m-instruct``, or
``arch:<name>`` for an architecture built on the meta device (no weights, no memory).
``--from-run`` predicts a finished run's mean round time from its own measured compute time, its
aggregation time and its link settings, and prints predicted against measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parablock.config import Config, ConfigError, _coerce, _validate, from_dict, opt
from parablock.core.blocks import model_blocks, select_blocks
from parablock.core.schedule import make_plan
from parablock.errors import EstimateError  # noqa: F401
from parablock.registry import Registry
from parablock.transport.link import LinkSpec

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


@dataclass(frozen=True)
class Phases:
    """One client's times for one round, in seconds."""

    comp: float
    up: float
    agg: float
    down: float

    @property
    def comm(self) -> float:
        return self.up + self.agg + self.down


# How one client's steady-state round time follows from its phase times.
ROUND_MODELS: Registry[Callable[[Phases], float]] = Registry("round model")
ROUND_MODELS.add("fedbcd", lambda p: p.comp + p.comm)
ROUND_MODELS.add("parablock", lambda p: max(p.comp, p.comm))
ROUND_MODELS.add(
    "parablock_duplex", lambda p: max(p.comp, p.up + p.agg, p.down, (p.comp + p.comm) / 2)
)


def round_model(algorithm: str, duplex: bool) -> str:
    """The round model of a run of ``algorithm`` (full duplex only changes ParaBlock)."""
    return "parablock_duplex" if duplex and algorithm == "parablock" else algorithm


def _links(cfg: Config) -> tuple[LinkSpec, LinkSpec]:
    return LinkSpec(cfg.link.up_mbps, cfg.link.latency_ms), LinkSpec(
        cfg.link.down_mbps, cfg.link.latency_ms
    )


def comm_seconds(nbytes: float, cfg: Config, aggregate_s: float) -> float:
    up, down = _links(cfg)
    return up.seconds(int(nbytes)) + aggregate_s + down.seconds(int(nbytes))


@dataclass(frozen=True)
class Simulated:
    round_s: list[float]  # each round's time, barrier to barrier
    steps: list[int]  # optimizer steps each round takes
    total_s: float  # the whole run, drain included

    @property
    def mean_round_s(self) -> float:
        return sum(self.round_s) / len(self.round_s)

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / len(self.steps)


def simulate(
    model: str,
    plan: Sequence[int],
    block_bytes: dict[int, float],
    compute_s: float,
    cfg: Config,
    aggregate_s: float,
) -> Simulated:
    """Play the plan's rounds through for identical clients; round t communicates the block
    trained in round t-1. ``compute_s`` is ``federation.local_steps`` steps; ParaBlock takes
    more (up to ``local_steps_max``) while the link holds the next upload back."""
    ROUND_MODELS.get(model)
    fed = cfg.federation
    up, down = _links(cfg)
    least = fed.local_steps
    most = least if model == "fedbcd" else max(least, fed.local_steps_max)
    step = compute_s / least

    def steps_until(start: float, busy_until: float) -> int:
        """Steps taken from ``start``: each one after local_steps only while still busy."""
        if step <= 0:
            return least
        return max(least, min(most, math.ceil((busy_until - start) / step - 1e-12)))

    def t_up(t: int) -> float:
        return up.seconds(int(block_bytes[plan[t]])) + aggregate_s

    def t_down(t: int) -> float:
        return down.seconds(int(block_bytes[plan[t]]))

    ends: list[float] = []  # each round's barrier
    steps: list[int] = []
    ready = fetched = 0.0  # full duplex: round t-1's aggregate exists / is downloaded
    for t in range(len(plan)):
        start = ends[-1] if ends else 0.0
        if model == "fedbcd":
            comm_end = start + (t_up(t - 1) + t_down(t - 1) if t else 0.0)
            steps.append(least)
            ends.append(comm_end + compute_s)
        elif model == "parablock":
            comm_end = start + (t_up(t - 1) + t_down(t - 1) if t else 0.0)
            steps.append(steps_until(start, comm_end) if t else least)
            ends.append(max(start + steps[-1] * step, comm_end))
        else:  # full duplex: round t's delta goes up as soon as it exists and round t-1's is up
            steps.append(steps_until(start, ready) if t else least)
            computed = start + steps[-1] * step
            ready_t = max(computed, ready) + t_up(t)
            fetched_t = max(ready_t, fetched) + t_down(t)
            ends.append(max(computed, fetched) if t else computed)
            ready, fetched = ready_t, fetched_t
    last = len(plan) - 1
    if model == "parablock_duplex":
        total = max(ends[-1], fetched)
    else:
        total = ends[-1] + t_up(last) + t_down(last)
    rounds = [b - a for a, b in zip([0.0] + ends[:-1], ends, strict=True)]
    return Simulated(rounds, steps, total)


def mean_round_s(
    model: str,
    plan: Sequence[int],
    block_bytes: dict[int, float],
    compute_s: float,
    cfg: Config,
    aggregate_s: float,
) -> float:
    """Mean over rounds 0..T-1 (``simulate``)."""
    return simulate(model, plan, block_bytes, compute_s, cfg, aggregate_s).mean_round_s


def crossover(
    nbytes: float, compute_s: float, cfg: Config, aggregate_s: float
) -> tuple[float, float] | None:
    """Up/down bandwidths (Mbit/s, at the configured up:down ratio) where T_comm = T_comp.

    None when no bandwidth gets there: latency and aggregation alone already exceed T_comp, or the
    links are unlimited.
    """
    up, down = cfg.link.up_mbps, cfg.link.down_mbps
    inv = sum(0.0 if math.isinf(b) else 1.0 / b for b in (up, down))  # s per Mbit at scale 1
    fixed = 2 * cfg.link.latency_ms / 1000 + aggregate_s
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


def estimate(cfg: Config, est: EstimateSettings, measured_compute_s: float | None = None) -> dict:
    """Per-round times for every algorithm, the speed-up, crossover and a bandwidth sweep."""
    sizes = model_sizes(cfg)
    width = DTYPES[est.dtype]
    block_bytes = {i: n * width for i, n in sizes.block_params.items()}
    fed = cfg.federation
    plan = make_plan(fed.schedule, sorted(block_bytes), fed.rounds, cfg.run.seed)
    compute = resolve_compute_s(cfg, est, measured_compute_s)
    mean_bytes = sum(block_bytes[b] for b in plan) / len(plan)
    up, down = _links(cfg)
    t_up, t_down = up.seconds(int(mean_bytes)), down.seconds(int(mean_bytes))
    comm = t_up + est.aggregate_s + t_down
    phases = Phases(compute, t_up, est.aggregate_s, t_down)
    steady = {m: ROUND_MODELS.get(m)(phases) for m in ROUND_MODELS}
    # Whole run: T rounds plus the drain (one more communication phase).
    sims = {m: simulate(m, plan, block_bytes, compute, cfg, est.aggregate_s) for m in ROUND_MODELS}
    cross = crossover(mean_bytes, compute, cfg, est.aggregate_s)
    sweep = []
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        c = cfg.replace(link={"up_mbps": up.mbps * factor, "down_mbps": down.mbps * factor})
        cm = comm_seconds(mean_bytes, c, est.aggregate_s)
        u, d = (link.seconds(int(mean_bytes)) for link in _links(c))
        sweep.append(
            {
                "up_mbps": c.link.up_mbps,
                "down_mbps": c.link.down_mbps,
                "comm_s": cm,
                "fedbcd_round_s": compute + cm,
                "parablock_round_s": max(compute, cm),
                "parablock_duplex_round_s": ROUND_MODELS.get("parablock_duplex")(
                    Phases(compute, u, est.aggregate_s, d)
                ),
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
        "up_mbps": cfg.link.up_mbps,
        "down_mbps": cfg.link.down_mbps,
        "latency_ms": cfg.link.latency_ms,
        "compute_s": compute,
        "compute_source": "measured here" if measured_compute_s is not None else "given",
        "upload_s": t_up,
        "aggregate_s": est.aggregate_s,
        "download_s": t_down,
        "comm_s": comm,
        "fedbcd_round_s": steady["fedbcd"],
        "parablock_round_s": steady["parablock"],
        "parablock_duplex_round_s": steady["parablock_duplex"],
        "speedup": steady["fedbcd"] / steady["parablock"],
        "speedup_duplex": steady["fedbcd"] / steady["parablock_duplex"],
        "configured": round_model(fed.algorithm, fed.duplex),
        "local_steps": fed.local_steps,
        "local_steps_max": fed.local_steps_max,
        "mean_round_s": {m: sim.mean_round_s for m, sim in sims.items()},
        "total_s": {m: sim.total_s for m, sim in sims.items()},
        "mean_steps": {m: sim.mean_steps for m, sim in sims.items()},
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
        f"ParaBlock full duplex {r['parablock_duplex_round_s']:.3f} s = max(T_comp, T_up + T_agg, "
        f"T_down, (T_comp + T_comm) / 2); speed-up {r['speedup_duplex']:.3f}x",
        f"whole run ({r['rounds']} rounds + drain): FedBCD {r['total_s']['fedbcd']:,.1f} s, "
        f"ParaBlock {r['total_s']['parablock']:,.1f} s, full duplex "
        f"{r['total_s']['parablock_duplex']:,.1f} s (this config: {r['configured']})",
    ]
    if r["local_steps_max"] > r["local_steps"]:
        st = r["mean_steps"]
        lines.append(
            f"steps per round with local_steps_max={r['local_steps_max']} (local_steps="
            f"{r['local_steps']}): ParaBlock {st['parablock']:.2f}, full duplex "
            f"{st['parablock_duplex']:.2f} (extra steps while the next upload could not start)"
        )
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
    lines.append(
        "  up Mbit/s  down Mbit/s   T_comm s   FedBCD s  ParaBlock s  speed-up  full duplex s"
    )
    for s in r["sweep"]:
        lines.append(
            f"  {s['up_mbps']:9.1f}  {s['down_mbps']:11.1f}  {s['comm_s']:9.3f}  "
            f"{s['fedbcd_round_s']:9.3f}  {s['parablock_round_s']:11.3f}  {s['speedup']:8.3f}  "
            f"{s['parablock_duplex_round_s']:13.3f}"
        )
    return "\n".join(lines)


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
        # measured compute per round, back to local_steps steps (local_steps_max takes more)
        k = cfg.federation.local_steps
        compute = float(run.summary["mean_compute_s"]) * k / (run.summary.get("mean_steps") or k)
        predicted = {m: mean_round_s(m, plan, block_bytes, compute, cfg, agg) for m in ROUND_MODELS}
        alg = run.summary["algorithm"]
        model = round_model(alg, bool(run.summary.get("duplex")))
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
                "round_model": model,
                "predicted_mean_round_s": predicted[model],
                "measured_mean_round_s": measured,
                "error": predicted[model] / measured - 1 if measured > 0 else math.nan,
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
