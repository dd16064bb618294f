"""One typed configuration tree that is also the CLI: sections, defaults, help and validation.

Every key is ``section.key``; ``--set section.key=value`` and TOML files ``[section] key = value``
reach the same dataclass field. Validation happens on construction and names the field and what is
allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from parablock.config.features import LoraConfig, PrivacyConfig, ServerConfig  # noqa: F401
from parablock.config.fields import (  # noqa: F401  (the config's public face)
    MAX_SEED,
    PER_CLIENT,
    _bound_text,
    _coerce,
    _per_client,
    _per_client_plain,
    _validate,
    opt,
    per_client_text,
    per_client_value,
)
from parablock.config.sections import (  # noqa: F401
    SECTIONS,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LinkConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from parablock.data.textfile import read_utf8
from parablock.errors import ConfigError  # noqa: F401


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

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
        _check_devices(self)
        if self.eval.tasks:
            from parablock.evaluation.tasks import parse_tasks

            parse_tasks(self.eval.tasks)  # a bad spec: one line naming it, before anything loads
        if self.run.faults:
            from parablock.transport.faults import parse

            parse(self.run.faults, self.run.seed)  # a bad spec: one line naming the item
        if self.run.tensorboard_dir and not self.run.tensorboard:
            raise ConfigError("run.tensorboard_dir is set but run.tensorboard=false: set both")

    def client_devices(self) -> list[str]:
        """Where each client trains (``run.client_devices``, else by ``run.client_gpus``)."""
        if self.run.client_devices:
            devices = [d.strip() for d in self.run.client_devices.split(",")]
            return devices * self.federation.clients if len(devices) == 1 else devices
        return ["cuda" if self.run.client_gpus > 0 else "cpu"] * self.federation.clients

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


def _check_devices(cfg: Config) -> None:
    """``run.client_devices``: device names, one for all or one per client, local backend only
    (Ray places a client on a GPU by ``run.client_gpus``)."""
    devices = cfg.client_devices()
    if not cfg.run.client_devices:
        return
    from parablock.model.devices import check_device_text

    for d in devices:
        check_device_text(d, "run.client_devices")
    if len(devices) not in (1, cfg.federation.clients):
        raise ConfigError(
            f"run.client_devices={cfg.run.client_devices!r} has {len(devices)} values but "
            f"federation.clients={cfg.federation.clients}; give one device for every client or "
            "one per client"
        )
    if cfg.run.backend != "local":
        raise ConfigError(
            f"run.client_devices applies to run.backend=local (got {cfg.run.backend!r}); "
            "Ray places clients on GPUs by run.client_gpus"
        )
    if cfg.run.client_gpus > 0:
        raise ConfigError("run.client_devices and run.client_gpus: set one of the two")


def _check_algorithm(cfg: Config) -> None:
    """Algorithm combinations the config alone shows cannot run (the model shows the rest:
    ``core.algorithms.check_plan``)."""
    from parablock.core.algorithms import ALGORITHMS
    from parablock.model.blocks import BlockError, extra_names, fixed_selection_size
    from parablock.model.lora import check_layers, target_names

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
    check_layers(cfg.lora.layers)
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
    _check_privacy(cfg)
    _check_secure_aggregation(cfg)
    need = entry.min_blocks
    n = fixed_selection_size(model.blocks, model.extra_blocks)
    if n is not None and n < need:
        raise ConfigError(
            f"model.blocks={model.blocks!r} selects {n} block(s) but federation.algorithm="
            f"{fed.algorithm} needs at least {need} (it trains the next block while the previous "
            "one is in flight); select more blocks or use federation.algorithm=fedbcd"
        )


def _check_privacy(cfg: Config) -> None:
    """Privacy settings that could not keep their promise, refused naming both settings."""
    from parablock.core.algorithms import ALGORITHMS

    priv, fed = cfg.privacy, cfg.federation
    if priv.mode == "none":
        return
    if priv.mode == "record" and fed.local_steps_max:
        raise ConfigError(
            f"privacy.mode=record accounts a fixed number of steps per round; federation."
            f"local_steps_max={fed.local_steps_max} makes it vary (set it to 0)"
        )
    if priv.mode == "client" and fed.aggregator != "mean":
        raise ConfigError(
            f"privacy.mode=client bounds each client's share of the aggregate by clip_norm / n; "
            f"federation.aggregator={fed.aggregator} breaks that bound (use "
            "federation.aggregator=mean)"
        )
    if priv.mode == "client" and fed.server_lr != 1.0:
        raise ConfigError(
            f"privacy.mode=client: federation.server_lr={fed.server_lr:g} scales the noise with "
            "the aggregate; the accounting assumes 1 (set federation.server_lr=1)"
        )
    if priv.mode == "record" and ALGORITHMS.get(fed.algorithm).adapter:
        raise ConfigError(
            f"privacy.mode=record trains blocks of the model; federation.algorithm="
            f"{fed.algorithm} trains an adapter (use privacy.mode=client with it)"
        )
    if priv.noise_at == "client" and priv.mode != "client":
        raise ConfigError(
            f"privacy.noise_at=client applies to privacy.mode=client only (got privacy.mode="
            f"{priv.mode})"
        )
    if priv.target_epsilon and priv.max_epsilon and priv.max_epsilon < priv.target_epsilon:
        raise ConfigError(
            f"privacy.max_epsilon={priv.max_epsilon:g} is below privacy.target_epsilon="
            f"{priv.target_epsilon:g}: the run would stop before its planned rounds"
        )


def _check_secure_aggregation(cfg: Config) -> None:
    """What secure aggregation cannot keep, refused in one line each: the server can no longer
    look at one update, so per-update checks and robust aggregators go; the encoding needs a
    clip bound and a sum that cannot overflow; dropouts need a threshold of survivors."""
    from parablock.core.algorithms import ALGORITHMS
    from parablock.core.secagg import Encoding
    from parablock.wire.protocol import PrivacySettings

    priv, fed, key = cfg.privacy, cfg.federation, "privacy.secure_aggregation=true"
    if not priv.secure_aggregation:
        return
    n = fed.clients
    if n < 2 or ALGORITHMS.get(fed.algorithm).in_turn:
        raise ConfigError(
            f"{key} needs at least 2 clients summed per round (federation.clients={n}, "
            f"federation.algorithm={fed.algorithm}): one client's sum is its own update"
        )
    bound = PrivacySettings(
        priv.mode if priv.mode == "client" else "none",
        priv.clip_norm,
        0.0 if priv.target_epsilon else priv.noise_multiplier,
        noise_at=priv.noise_at if priv.mode == "client" else "server",
        shares=n,
    ).secagg_range(fed.client_clip_norm)
    if bound <= 0:
        raise ConfigError(
            f"{key} encodes coordinates within the clip bound: set privacy.mode=client "
            f"(privacy.clip_norm) or federation.client_clip_norm > 0 (privacy.mode={priv.mode})"
        )
    if fed.aggregator != "mean":
        raise ConfigError(
            f"{key}: the server sees only the sum, so federation.aggregator={fed.aggregator} "
            "cannot run; use federation.aggregator=mean"
        )
    if fed.update_bound:
        raise ConfigError(
            f"{key}: the server cannot check one update's coordinates, so federation."
            "update_bound=true cannot hold; set federation.update_bound=false (the encoding's "
            "range bounds each client instead)"
        )
    if fed.max_update_norm > 0:
        raise ConfigError(
            f"{key}: the server cannot see one update's norm, so federation.max_update_norm="
            f"{fed.max_update_norm:g} cannot hold; set it to 0 and clip at the clients "
            "(privacy.clip_norm or federation.client_clip_norm)"
        )
    if cfg.link.compression != "none":
        raise ConfigError(
            f"{key}: masked updates are integers mod 2^64 and cannot be compressed; set "
            f"link.compression=none (got {cfg.link.compression})"
        )
    lo, threshold = n // 2 + 1, priv.secagg_threshold or n // 2 + 1
    if not lo <= threshold <= n:
        raise ConfigError(
            f"privacy.secagg_threshold={priv.secagg_threshold} must be within {lo}..{n} (a "
            f"majority of federation.clients={n}), or 0 for {lo}"
        )
    if fed.min_clients and fed.min_clients < threshold:
        raise ConfigError(
            f"federation.min_clients={fed.min_clients} is below privacy.secagg_threshold="
            f"{threshold}: a round could close with fewer updates than secure aggregation sums"
        )
    Encoding(bound, priv.secagg_scale_bits).check(
        n, "privacy.secagg_scale_bits or the clip bound (privacy.clip_norm / client_clip_norm)"
    )


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
