"""LoRA adapters for ``federation.algorithm=fedit_lora`` (FedIT: FedAvg over LoRA adapters), built
with PEFT; nothing here re-implements LoRA.

PEFT injects the adapters into the Hugging Face causal LM in place (``inject_adapter_in_model``),
so the model stays a ``LlamaForCausalLM`` (or whichever class it was): the training step, the
evaluation and the block functions work on it unchanged. Every adapted linear layer becomes a
``lora.Linear`` whose frozen weight is renamed ``...<module>.base_layer.weight`` and whose adapter
is ``...<module>.lora_A.default.weight`` / ``lora_B.default.weight``.

For the protocol all adapter tensors form one block, ``adapter`` (index 0), trained every round:
only it travels, is aggregated (the weighted mean of the clients' adapter deltas added to the
global adapter) and checkpointed; the base weights never change. Every copy of the model (the
server's, each client's, the evaluation replica) is injected with torch seeded by the run seed, so
all start from the identical adapter (A random as PEFT draws it, B zero: the adapted model equals
the base). The run's ``model/`` is the merged model (``merge_and_unload`` on a fresh base with the
final adapter), and ``model-adapter/`` the adapter alone in PEFT's format.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from parablock.errors import BlockError, ConfigError
from parablock.model.blocks import Block, model_blocks, select_blocks

if TYPE_CHECKING:
    pass

ADAPTER = "adapter"  # the one block of an adapter run
# Attention and MLP projections of Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM).
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# lora.layers: the syntax of model.blocks ('all', 'top:N', 'bottom:N', '0-3,10'), checked before
# any model is loaded; the model then decides which indices exist
_LAYER_SPEC = re.compile(
    r"all|(top|bottom):[1-9][0-9]{0,5}|[0-9]{1,6}(-[0-9]{1,6})?(,[0-9]{1,6}(-[0-9]{1,6})?)*"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# PEFT draws A from torch's global generator: injections are serialised and seeded (and the
# generator's state restored afterwards) so every copy gets the same adapter whichever thread
# builds it.
_INJECT_LOCK = threading.Lock()


def target_names(text: str) -> tuple[str, ...]:
    """``lora.target_modules`` split on commas; ConfigError when empty or malformed."""
    names = tuple(n.strip() for n in text.split(","))
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad or not text.strip():
        raise ConfigError(
            f"lora.target_modules={text!r} must be comma-separated module names such as "
            f"{DEFAULT_TARGETS!r}"
        )
    return names


def check_layers(spec: str) -> str:
    """``lora.layers`` when well formed; ConfigError naming the allowed forms otherwise."""
    if len(spec) > 1000 or not _LAYER_SPEC.fullmatch(spec.strip().lower()):
        raise ConfigError(
            f"lora.layers={spec[:100]!r} is malformed; use 'all', 'top:N', 'bottom:N' or layer "
            "indices like '0-3,10'"
        )
    return spec


def adapter_layers(model: nn.Module, spec: str) -> list[int] | None:
    """The decoder layers ``lora.layers`` gives an adapter on ``model`` (PEFT's
    ``layers_to_transform``); None for 'all', which leaves PEFT's default: every layer."""
    if check_layers(spec).strip().lower() == "all":
        return None
    return select_blocks(model_blocks(model), spec, field="lora.layers", unit="layers")


@dataclass(frozen=True)
class LoraSettings:
    """The adapter every copy of the model gets (``[lora]``; handed to networked clients)."""

    r: int
    alpha: float
    dropout: float
    target_modules: str  # comma-separated names of the decoder layers' linear modules
    layers: str = "all"  # the decoder layers that get adapters (the syntax of model.blocks)

    def __post_init__(self) -> None:
        if not 1 <= self.r <= 4096:
            raise ValueError(f"LoRA rank {self.r} is outside 1..4096")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha {self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        target_names(self.target_modules)  # a ConfigError is a ValueError
        check_layers(self.layers)

    def run_fields(self) -> dict[str, object]:
        """The adapter as ``protocol.RunSettings`` carries it to networked clients."""
        return {
            "lora_r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_target_modules": self.target_modules,
            "lora_layers": self.layers,
        }

    def peft_config(self, model: nn.Module):
        """PEFT's config of this adapter on ``model`` (whose layers ``layers`` selects from)."""
        from peft import LoraConfig as PeftLoraConfig

        layers = adapter_layers(model, self.layers)
        return PeftLoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(target_names(self.target_modules)),
            bias="none",
            task_type="CAUSAL_LM",
            **({"layers_to_transform": layers, "layers_pattern": "layers"} if layers else {}),
        )


def _check_targets(model: nn.Module, names: tuple[str, ...]) -> None:
    """Every target must name a linear module inside the decoder layers (PEFT alone would
    accept a name that matches nothing as long as another one matches)."""
    linear = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if _LAYER.match(n + ".") and isinstance(m, nn.Linear)
    }
    missing = [n for n in names if n not in linear]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {', '.join(missing)} is not a linear module of this model's "
            f"decoder layers; valid: {', '.join(sorted(linear))}"
        )


def inject(model: nn.Module, lora: LoraSettings, seed: int) -> None:
    """Add the adapter to ``model`` in place (on the CPU, before any move to a device), drawn
    with torch seeded by ``seed``: every copy injected with the same seed is identical."""
    from peft import inject_adapter_in_model

    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise BlockError("the model already holds a LoRA adapter")
    _check_targets(model, target_names(lora.target_modules))
    with _INJECT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora.peft_config(model), model)


def adapter_blocks(model: nn.Module) -> list[Block]:
    """One block holding every adapter tensor of ``model``."""
    names = tuple(n for n, _ in model.named_parameters() if ".lora_" in n)
    if not names:
        raise BlockError("the model holds no LoRA adapter (inject one first)")
    return [Block(0, ADAPTER, names)]


def blocks_for(
    model: nn.Module,
    extra_blocks: str,
    lora: LoraSettings | None,
    seed: int,
    block_size: int = 1,
) -> list[Block]:
    """The blocks a run federates on ``model``: its decoder-layer blocks (and extra blocks), or
    with ``lora`` the single adapter block, injected here in place."""
    if lora is None:
        return model_blocks(model, extra_blocks, block_size)
    inject(model, lora, seed)
    return adapter_blocks(model)


def export(
    model: nn.Module, lora: LoraSettings, base: str, merged_dir: Path, adapter_dir: Path
) -> None:
    """Save ``model``'s adapter in PEFT's format (``PeftModel.from_pretrained(base, adapter_dir)``)
    and the base with it merged in (``AutoModelForCausalLM.from_pretrained(merged_dir)``).

    The adapter goes onto a fresh copy of the base model ``base`` (``model.name_or_path``), which
    PEFT then merges: the run's own model keeps its adapter, and the export is exactly what a user
    gets from the base and the saved adapter."""
    from peft import get_peft_model

    from parablock.model.load import load_model

    base_model = load_model(base)
    with _INJECT_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT asks transformers 5 about gradient checkpointing through a deprecated name
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(base_model, lora.peft_config(base_model))
    target = dict(peft_model.base_model.model.named_parameters())
    adapter = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(adapter) != {n for n in target if ".lora_" in n}:
        raise BlockError("the model's adapter does not match a fresh injection into the base")
    with torch.no_grad():
        for n, p in adapter.items():
            target[n].copy_(p.detach().cpu())
    peft_model.save_pretrained(adapter_dir)
    peft_model.merge_and_unload().save_pretrained(merged_dir)
