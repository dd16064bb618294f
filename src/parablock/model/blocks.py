"""Which parameter names form block k: the one definition that freezing, the optimizer, payloads,
aggregation and checkpoints all use.

Blocks are numbered in model order: the decoder layers 0..L-1 (with ``model.block_size`` k > 1,
layers 0..k-1 form block 0, layers k..2k-1 block 1, ...), then any configured extra blocks
(``embed``, ``norm``, ``head``). ``model.blocks`` then selects the blocks that train.
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
    name: str  # "layer.7", "layer.4-7" (several layers), "embed", "norm" or "head"
    param_names: tuple[str, ...]


def _layers_prefix(model: nn.Module) -> tuple[str, int]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise BlockError(
            f"{type(model).__name__} is not supported yet: ParaBlock supports {SUPPORTED}"
        )
    return "model.layers.", len(layers)


def model_blocks(model: nn.Module, extra: str = "", block_size: int = 1) -> list[Block]:
    """All blocks of ``model``: one per ``block_size`` consecutive decoder layers (the last may
    hold fewer), then the requested extra blocks."""
    if block_size < 1:
        raise BlockError(f"model.block_size={block_size} must be at least 1")
    prefix, n_layers = _layers_prefix(model)
    names = [n for n, _ in model.named_parameters()]  # tied weights appear once
    blocks = []
    for lo in range(0, n_layers, block_size):
        hi = min(lo + block_size, n_layers) - 1
        starts = tuple(f"{prefix}{j}." for j in range(lo, hi + 1))
        name = f"layer.{lo}" if hi == lo else f"layer.{lo}-{hi}"
        blocks.append(Block(len(blocks), name, tuple(n for n in names if n.startswith(starts))))
    wanted = extra_names(extra)
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


def extra_names(extra: str) -> list[str]:
    """The names in ``model.extra_blocks``, checked: a name listed twice would make two blocks
    that share (and train twice per pass) the same parameters."""
    wanted = [e.strip() for e in extra.split(",") if e.strip()]
    for e in wanted:
        if e not in EXTRA_BLOCKS:
            raise BlockError(
                f"model.extra_blocks: unknown block {e!r}; valid: {', '.join(EXTRA_BLOCKS)}"
            )
    twice = sorted({e for e in wanted if wanted.count(e) > 1})
    if twice:
        raise BlockError(f"model.extra_blocks lists {', '.join(map(repr, twice))} more than once")
    return wanted


def fixed_selection_size(spec: str, extra: str = "") -> int | None:
    """How many blocks ``model.blocks`` selects when that does not depend on the model, else None.

    Index lists ('3', '2-2,2') select exactly their distinct indices, and 'top:1' / 'bottom:1'
    one layer plus the extra blocks; 'all' and 'top:N' (N > 1) depend on the number of layers.
    Lets the config refuse a selection too small for the algorithm before any model is loaded.
    A malformed spec gives None here: ``select_blocks`` reports it against the model.
    """
    s = spec.strip().lower()
    try:
        if s == "all":
            return None
        if s.startswith(("top:", "bottom:")):
            return 1 + len(extra_names(extra)) if int(s.split(":", 1)[1]) == 1 else None
        chosen: set[int] = set()
        for part in s.split(","):
            lo, hi = _span(part)
            if hi - lo > _MAX_SPAN:
                return None  # too wide for any model: select_blocks says so
            chosen.update(range(lo, hi + 1))
    except (ValueError, BlockError):
        return None
    return len(chosen) if chosen and min(chosen) >= 0 else None


_MAX_SPAN = 100_000  # more blocks than any model has; wider ranges are never materialised


def _span(part: str) -> tuple[int, int]:
    """'3' -> (3, 3), '0-7' -> (0, 7); ValueError when malformed."""
    a, dash, b = part.strip().partition("-")
    return (int(a), int(b)) if dash else (int(a), int(a))


def select_blocks(
    blocks: list[Block], spec: str, field: str = "model.blocks", unit: str = "blocks"
) -> list[int]:
    """Indices chosen by ``model.blocks`` (or the setting ``field`` names, over ``unit``):
    'all', 'top:N', 'bottom:N' or '0-3,10'."""
    n = len(blocks)
    s = spec.strip().lower()
    chosen: list[int]
    bad: list[str] = []
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
            chosen, bad = _listed(s, n)
    except ValueError:
        raise BlockError(
            f"{field}={spec!r} is malformed; use 'all', 'top:N', 'bottom:N' or indices like '0-3,10'"
        ) from None
    if bad or not chosen:
        raise BlockError(
            f"{field}={spec!r} selects no valid block (bad: {', '.join(bad) or 'none'}); "
            f"this model has {unit} 0-{n - 1}"
        )
    return sorted(set(chosen))


def _listed(spec: str, n: int) -> tuple[list[int], list[str]]:
    """The indices of an index list '0-3,10' among ``n`` blocks, and its parts that name a block
    outside 0..n-1 or an empty range (never materialising a range such as 0-10**12)."""
    chosen: list[int] = []
    bad: list[str] = []
    for part in spec.split(","):
        lo, hi = _span(part)
        if lo > hi or lo < 0 or hi >= n:
            bad.append(part.strip())
            continue
        chosen.extend(range(lo, hi + 1))
    return chosen, bad


def block_state(model: nn.Module, block: Block) -> dict[str, torch.Tensor]:
    """Detached copies of the block's parameters (safe to send or keep while training goes on)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in block.param_names}


def check_block(
    model: nn.Module, block: Block, tensors: dict[str, torch.Tensor]
) -> dict[str, nn.Parameter]:
    """The model's parameters by name, once ``tensors`` has exactly the block's names and shapes."""
    params = dict(model.named_parameters())
    if set(tensors) != set(block.param_names):
        raise BlockError(f"tensors for block {block.index} do not match its parameter names")
    for n, t in tensors.items():
        if params[n].shape != t.shape:
            raise BlockError(f"{n}: shape {tuple(t.shape)} != {tuple(params[n].shape)}")
    return params


@torch.no_grad()
def set_block(model: nn.Module, block: Block, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` into the block's parameters, in place, after checking names and shapes."""
    params = check_block(model, block, tensors)
    for n, t in tensors.items():
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
