"""Model architectures by name (``arch:<preset>[@seed]``): the shapes of well-known LLMs, for the
timing and memory estimator (built on the ``meta`` device, without weights) and for systems work
(built with random weights: ``model.name_or_path = arch:llama-3.2-1b`` trains in every path).

Random weights are drawn per parameter from a generator seeded by (seed, parameter name), so every
process that builds the same ``arch:<preset>@<seed>`` (clients, the server, Ray actors, a networked
``parablock client``) holds the same bits, and the base fingerprints match without shipping
weights. Such a model's loss means nothing; its step times and memory are those of the real one.
Its tokenizer is the embedded SmolLM2's (``load.py``): every preset's vocabulary holds its ids."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from parablock.errors import (
    ConfigError,
    EstimateError,  # noqa: F401
)

log = logging.getLogger(__name__)


ARCH_PREFIX = "arch:"
_WARNED: set[str] = set()


# Architecture presets (public config.json values).
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
    "llama-3.2-3b": dict(
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
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
    # for tests: SmolLM2's vocabulary (its tokenizer), 4 layers of width 64
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}


def is_arch(name_or_path: str) -> bool:
    return name_or_path.startswith(ARCH_PREFIX)


def parse_arch(name_or_path: str) -> tuple[str, int]:
    """``arch:<preset>[@seed]`` -> (preset, seed); a one-line ConfigError otherwise."""
    body = name_or_path[len(ARCH_PREFIX) :]
    name, _, seed_text = body.partition("@")
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: unknown architecture; valid: "
            + ", ".join(ARCH_PREFIX + a for a in ARCHITECTURES)
            + " (optionally @SEED)"
        )
    seed = 0
    if seed_text or "@" in body:
        if not seed_text.isdigit() or int(seed_text) >= 2**63:
            raise ConfigError(
                f"model.name_or_path={name_or_path!r}: the seed after '@' must be an integer "
                f"in [0, 2^63), e.g. {ARCH_PREFIX}{name}@1"
            )
        seed = int(seed_text)
    return name, seed


def arch_config(name_or_path: str):
    """The transformers config of an ``arch:`` preset."""
    from transformers import AutoConfig

    name, _ = parse_arch(name_or_path)
    spec = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: the same in every process and on every platform."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def build_random_model(name_or_path: str) -> torch.nn.Module:
    """An ``arch:`` preset in fp32 on the CPU, every parameter drawn from its own seeded generator
    (matrices N(0, initializer_range), norms 1, biases 0), independent of the global RNG."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    name, seed = parse_arch(name_or_path)
    config = arch_config(name_or_path)
    with no_init_weights():  # allocate only: every parameter is drawn below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    std = float(getattr(config, "initializer_range", 0.02))
    for n, p in model.named_parameters():  # tied weights are listed once
        if p.dim() >= 2:
            gen = torch.Generator().manual_seed(parameter_seed(seed, n))
            p.normal_(0.0, std, generator=gen)
        elif n.endswith("bias"):
            p.zero_()
        else:  # norm scales
            p.fill_(1.0)
    model.config.name_or_path = name_or_path
    if name_or_path not in _WARNED:  # once per process, however many copies it builds
        _WARNED.add(name_or_path)
        log.warning(
            "%s: random weights (seed %d): its loss means nothing, its step times and memory do",
            name_or_path,
            seed,
        )
    return model
