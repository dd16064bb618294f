"""The sections of what a run may turn on beyond training: the networked server, the LoRA
adapter of ``fedit_lora``, and differential privacy."""

from __future__ import annotations

from dataclasses import dataclass

from parablock.config.fields import opt


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
    metrics_address: str = opt(
        "",
        "parablock server: serve Prometheus metrics (rounds, clients, updates, refused calls, "
        "bytes, round and wait times, epsilon; no token, no data) at http://HOST:PORT/metrics; "
        "PORT alone listens on loopback (docs/observability.md). Empty = off",
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
    layers: str = opt(
        "all",
        "decoder layers that get adapters, in model.blocks' syntax: 'all', 'top:N', 'bottom:N' or "
        "indices like '0-3,10' (PEFT's layers_to_transform); above the lowest one the forward is "
        "cached as for block runs",
    )
    lr: float = opt(
        3e-3,
        "client AdamW learning rate of fedit_lora, used unless federation.lr is changed from "
        "its default",
        gt=0.0,
        le=1.0,
    )


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (docs/privacy.md): what each mode protects, and how epsilon is
    accounted (Opacus's accountants)."""

    mode: str = opt(
        "none",
        "none; record: DP-SGD on the trained block, each example's gradient clipped to "
        "clip_norm and Gaussian noise at every local step (a guarantee per site, over every "
        "record it holds); client: each client's block delta clipped to clip_norm and Gaussian "
        "noise on the aggregate (a guarantee per client, over its whole dataset)",
        choices=("none", "record", "client"),
    )
    clip_norm: float = opt(
        1.0,
        "C: the bound on one example's gradient (record) or one client's delta (client)",
        gt=0.0,
    )
    noise_multiplier: float = opt(
        1.0,
        "sigma: the noise's standard deviation is sigma x clip_norm (ignored when "
        "target_epsilon is set)",
        ge=0.0,
    )
    target_epsilon: float = opt(
        0.0,
        "> 0: compute noise_multiplier before the run so that the planned rounds end at this "
        "epsilon (at privacy.delta)",
        ge=0.0,
    )
    max_epsilon: float = opt(
        0.0,
        "> 0: a hard stop: the run ends cleanly (model and checkpoint saved) before a round "
        "would take epsilon past this",
        ge=0.0,
    )
    delta: float = opt(1e-5, "the delta epsilon is reported at", gt=0.0, le=0.1)
    noise_at: str = opt(
        "server",
        "client mode: server adds the noise to the aggregate (a trusted server); client: each "
        "client adds its share, N(0, sigma^2 C^2 / n), so the sum carries the full noise "
        "(what secure aggregation needs)",
        choices=("server", "client"),
    )
    accountant: str = opt("rdp", "Opacus's accountant: rdp or prv", choices=("rdp", "prv"))
    physical_batch: int = opt(
        8,
        "record mode: examples per forward/backward pass; a step's Poisson-sampled batch "
        "(expected size federation.batch_size) is processed in pieces of at most this many",
        ge=1,
    )
    secure_aggregation: bool = opt(
        False,
        "secure aggregation (docs/privacy.md): each client masks its clipped, fixed-point "
        "encoded delta with pairwise masks that cancel in the sum, so the server holds only "
        "masked updates and their sum; needs a clip bound (privacy.mode=client, or "
        "federation.client_clip_norm > 0) and federation.aggregator=mean",
    )
    secagg_threshold: int = opt(
        0,
        "secure aggregation: the fewest clients whose updates a round sums, and the shares that "
        "recover a dropped client's masks; within clients // 2 + 1 .. clients (0 = clients // 2 "
        "+ 1)",
        ge=0,
    )
    secagg_masks: bool = opt(
        True,
        "secure aggregation: false = the same fixed-point encoding and sum without masks (the "
        "reference run, which a masked run equals bit for bit)",
    )
    secagg_scale_bits: int = opt(
        32,
        "secure aggregation: b, the fixed-point scale 2^b (a coordinate's rounding error is at "
        "most 2^-(b+1)); clients x ceil(R x 2^b) must stay below 2^63, R the clip bound",
        ge=8,
        le=56,
    )
