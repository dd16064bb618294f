"""Which parameter names form block k: the one definition that freezing, the optimizer, payloads,
aggregation and checkpoints all use.

Blocks are numbered in model order: the decoder layers 0..L-1, then any configured extra blocks
(``embed``, ``norm``, ``head``) as L, L+1, ... ``model.blocks`` then selects the blocks that train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from parablock.errors import BlockError  # noqa: F401

SUPPORTED = (
    "decoder-only models whose decoder keeps its layers in `model.layers` "
    "(Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM)"
)
EXTRA_BLOCKS = ("embed", "norm", "head")


@dataclass(frozen=True)
class Block:
    index: int
    name: str  # "layer.7", "embed", "norm" or "head"
    param_names: tuple[str, ...]


def _layers_prefix(model: nn.Module) -> tuple[str, int]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise BlockError(
            f"{type(model).__name__} is not supported yet: ParaBlock supports {SUPPORTED}"
        )
    return "model.layers.", len(layers)


def model_blocks(model: nn.Module, extra: str = "") -> list[Block]:
    """All blocks of ``model``: one per decoder layer, then the requested extra blocks."""
    prefix, n_layers = _layers_prefix(model)
    names = [n for n, _ in model.named_parameters()]  # tied weights appear once
    blocks = []
    for j in range(n_layers):
        p = f"{prefix}{j}."
        blocks.append(Block(j, f"layer.{j}", tuple(n for n in names if n.startswith(p))))
    wanted = [e.strip() for e in extra.split(",") if e.strip()]
    for e in wanted:
        if e not in EXTRA_BLOCKS:
            raise BlockError(
                f"model.extra_blocks: unknown block {e!r}; valid: {', '.join(EXTRA_BLOCKS)}"
            )
    patterns = {
        "embed": r"^model\.embed_tokens\.",
        "norm": r"^model\.norm\.",
        "head": r"^lm_head\.",
    }
    for e in wanted:
        params = tuple(n for n in names if re.match(patterns[e], n))
        if not params:
            hint = " (its weight is tied to the embeddings: use 'embed')" if e == "head" else ""
            raise BlockError(f"model.extra_blocks: {e!r} has no parameters of its own{hint}")
        blocks.append(Block(len(blocks), e, params))
    return blocks


def select_blocks(blocks: list[Block], spec: str) -> list[int]:
    """Indices chosen by ``model.blocks``: 'all', 'top:N', 'bottom:N' or '0-3,10'."""
    n = len(blocks)
    s = spec.strip().lower()
    chosen: list[int]
    try:
        if s == "all":
            chosen = list(range(n))
        elif s.startswith("top:") or s.startswith("bottom:"):
            k = int(s.split(":", 1)[1])
            if k < 1:
                raise ValueError
            layer_ids = [b.index for b in blocks if b.name.startswith("layer.")]
            chosen = layer_ids[-k:] if s.startswith("top:") else layer_ids[:k]
            chosen += [b.index for b in blocks if not b.name.startswith("layer.")]
        else:
            chosen = []
            for part in s.split(","):
                part = part.strip()
                if "-" in part:
                    a, b = part.split("-", 1)
                    chosen.extend(range(int(a), int(b) + 1))
                else:
                    chosen.append(int(part))
    except ValueError:
        raise BlockError(
            f"model.blocks={spec!r} is malformed; use 'all', 'top:N', 'bottom:N' or indices like '0-3,10'"
        ) from None
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen:
        raise BlockError(
            f"model.blocks={spec!r} selects no valid block (bad: {bad}); this model has blocks 0-{n - 1}"
        )
    return sorted(set(chosen))


def block_state(model: nn.Module, block: Block) -> dict[str, torch.Tensor]:
    """Detached copies of the block's parameters (safe to send or keep while training goes on)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in block.param_names}


@torch.no_grad()
def set_block(model: nn.Module, block: Block, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` into the block's parameters, in place, after checking names and shapes."""
    params = dict(model.named_parameters())
    if set(tensors) != set(block.param_names):
        raise BlockError(f"tensors for block {block.index} do not match its parameter names")
    for n, t in tensors.items():
        if params[n].shape != t.shape:
            raise BlockError(f"{n}: shape {tuple(t.shape)} != {tuple(params[n].shape)}")
        params[n].copy_(t)


def freeze_all_but(model: nn.Module, block: Block) -> list[nn.Parameter]:
    """Make only ``block`` trainable; return its parameters."""
    keep = set(block.param_names)
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        if n in keep:
            trainable.append(p)
    return trainable


def block_nbytes(model: nn.Module, block: Block) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in block.param_names)
