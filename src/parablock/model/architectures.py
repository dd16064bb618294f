"""Model architectures by name (``arch:<preset>``): the shapes of well-known LLMs, for the timing
and memory estimator, and built on the ``meta`` device without any weights."""

from __future__ import annotations

import logging
from typing import Any

import torch

from parablock.errors import (
    ConfigError,
    EstimateError,  # noqa: F401
)

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
        from parablock.model.load import ModelError, resolve

        path = resolve(name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {e}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)
