"""The weights no block trains, held in bf16 (``model.frozen_dtype``), and a base fingerprint
that reads the checkpoint files instead of the model.

A client trains only the blocks of ``model.blocks``; the rest of its copy (SmolLM2 under
``top:8``: the embeddings and 22 of 30 layers, 79% of the weights) is read, never written. Under
a bf16 forward (``train.precision``) every matrix product casts those fp32 weights to bf16 at
each use, so holding the matrices in bf16 gives the same products and halves their memory. Only
matrices (2-D and up) are converted: norms and biases stay fp32, and the embeddings' output is
turned back into fp32, so the residual stream stays fp32 exactly as under autocast. The one
numeric difference is that the embedding rows are rounded to bf16. Trained blocks, their
gradients, optimizer state and deltas stay fp32, and so does the server's model: the invariant
(every client's trained blocks equal the server's) is unchanged, but a client's whole-model
fingerprint then differs from the server's.

``int8`` goes one step further for small-memory sites: on top of bf16, the linear weights of the
frozen decoder layers are held as int8 with one scale per row through torchao (an optional
extra; absent, a one-line error), about half their bf16 bytes again. The products then differ
from the bf16 ones by the rounding of those weights, so a client's deltas differ slightly from a
bf16 client's (tested within a tolerance, docs/scaling.md); the trained blocks, their updates
and the server's model stay fp32 and plain. ``nf4`` holds the same weights in QLoRA's 4-bit
NormalFloat instead (torchao's ``NF4Tensor``, a quarter of their bf16 bytes and a little more):
the deltas differ more from bf16's (tested within a looser tolerance).

Memory: transformers maps a safetensors file and reads a tensor's pages only when it is touched,
and the pages it touched stay resident while the mapping lives. Converting through the mapping
would first make the whole fp32 file resident. So both the fingerprint and the conversion read
each tensor from the file with ``pread`` (page cache, not this process's memory), one at a time,
and every parameter is replaced, so the mapping is released. Where the files do not hold a
parameter as expected (another format, a renamed key), the model's own tensor is used instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from parablock.errors import ConfigError
from parablock.model.architectures import is_arch
from parablock.model.load import model_fingerprint, resolve

log = logging.getLogger(__name__)

FROZEN_DTYPES = ("fp32", "bf16", "int8", "nf4")
QUANTISED = ("int8", "nf4")  # the dtypes that need torchao
NF4_BLOCK = 64  # values per nf4 scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per second-level scale, or the largest power of two that divides
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _entries(path: Path) -> dict[str, _Entry]:
    """Every tensor of the model's safetensors file(s), by name; {} where there are none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_bytes())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    out: dict[str, _Entry] = {}
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            dtype = _DTYPES.get(meta.get("dtype", "")) if name != "__metadata__" else None
            if dtype is not None:
                begin, end = meta["data_offsets"]
                out[name] = _Entry(f, dtype, tuple(meta["shape"]), 8 + size + begin, end - begin)
    return out


def _read(entry: _Entry) -> torch.Tensor:
    """The tensor, read with plain file I/O into fresh memory (no mapping)."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(t.view(torch.uint8).reshape(-1).numpy())
    with open(entry.file, "rb") as fh:
        got = os.preadv(fh.fileno(), [view], entry.offset)
    if got != entry.nbytes:
        raise OSError(f"{entry.file}: short read ({got} of {entry.nbytes} bytes)")
    return t


def _matching(model: nn.Module, name_or_path: str) -> dict[str, _Entry] | None:
    """The file entry of every parameter, or None unless all match in name, shape and dtype
    (an ``arch:`` model has no files: its own tensors are used)."""
    if is_arch(name_or_path):
        return None
    try:
        entries = _entries(resolve(name_or_path))
    except (OSError, ValueError, KeyError, struct.error):
        return None
    for n, p in model.named_parameters():
        e = entries.get(n)
        if e is None or e.shape != tuple(p.shape) or e.dtype != p.dtype:
            return None
    return entries


def base_fingerprint(model: nn.Module, name_or_path: str) -> str:
    """``model_fingerprint`` of a freshly loaded model, reading the bytes from its files."""
    entries = _matching(model, name_or_path)
    if entries is None:
        return model_fingerprint(model)
    h = hashlib.blake2b(digest_size=16)
    for n, _ in model.named_parameters():
        t = _read(entries[n])
        h.update(f"{n}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy())
    return h.hexdigest()


def _fp32_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@torch.no_grad()
def hold_frozen(
    model: nn.Module, name_or_path: str, trained: Iterable[str], dtype: str = "bf16"
) -> int:
    """Hold every matrix outside ``trained`` (parameter names) in ``dtype``; returns the bytes
    saved. Every parameter is rewritten from the files (see the module docstring)."""
    if dtype == "fp32":
        return 0
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen dtype {dtype!r}; valid: {', '.join(FROZEN_DTYPES)}")
    keep = set(trained)
    entries = _matching(model, name_or_path) or {}
    saved = 0
    for n, p in model.named_parameters():
        source = _read(entries[n]) if n in entries else p.data
        if n not in keep and p.dim() >= 2 and p.dtype == torch.float32:
            p.data = source.to(torch.bfloat16)
            saved += p.numel() * 2
        elif source is not p.data:
            p.data = source
    embed = model.get_input_embeddings()
    if embed.weight.dtype != torch.float32:
        embed.register_forward_hook(_fp32_output)  # the residual stream stays fp32
    if dtype == "int8":
        saved += _int8_layers(model, keep)
    elif dtype == "nf4":
        saved += _nf4_layers(model, keep)
    log.info("frozen weights held in %s: %.0f MB saved", dtype, saved / 2**20)
    return saved


def int8_available(dtype: str = "int8") -> None:
    """A one-line ConfigError unless torchao, which ``model.frozen_dtype=int8`` and ``nf4``
    use, is here."""
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            f"model.frozen_dtype={dtype} needs torchao, an optional extra (scripts/install.sh "
            "int8, or pip install 'parablock[int8]'); use bf16 or fp32 without it"
        )


def _frozen_linears(model: nn.Module, trained: set[str]) -> set[str]:
    """The names of the frozen decoder layers' linear modules whose weights are bf16 already
    (the embedding and the LM head are not among them: a tied head is the embedding itself)."""
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    return {
        n
        for n, m in model.named_modules()
        if n.startswith(prefix)
        and isinstance(m, nn.Linear)
        and f"{n}.weight" not in trained
        and m.weight.dtype == torch.bfloat16
    }


def _int8_layers(model: nn.Module, trained: set[str]) -> int:
    """The frozen decoder layers' linear weights (already bf16) as int8 with one scale per row
    (torchao's weight-only int8; the matmul dequantises, the input gradient still flows)."""
    int8_available()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    frozen = _frozen_linears(model, trained)
    saved = sum(m.weight.numel() for n, m in model.named_modules() if n in frozen)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in frozen)
    for n, m in model.named_modules():
        if n in frozen:
            m.weight.requires_grad_(False)
    return saved - 4 * sum(m.weight.shape[0] for n, m in model.named_modules() if n in frozen)


def _nf4_layers(model: nn.Module, trained: set[str]) -> int:
    """The frozen decoder layers' linear weights (already bf16) in 4-bit NormalFloat, QLoRA's
    format: one scale per 64 values, the scales themselves in 8 bits per ``NF4_SCALER_BLOCK``
    (torchao's ``NF4Tensor``; a linear dequantises its weight to the input's dtype, the input
    gradient still flows, the weight never gets one). A weight whose size is not a multiple of
    the block stays bf16. About 0.53 bytes a value against bf16's 2."""
    int8_available("nf4")
    from torchao.quantization import to_nf4

    saved = 0
    modules = dict(model.named_modules())
    for n in sorted(_frozen_linears(model, trained)):
        m = modules[n]
        w = m.weight.data
        blocks = w.numel() // NF4_BLOCK
        if w.numel() % NF4_BLOCK or w.dim() != 2:
            continue
        scaler = NF4_SCALER_BLOCK
        while blocks % scaler:
            scaler //= 2
        q = to_nf4(w.contiguous(), NF4_BLOCK, scaler)
        m.weight = nn.Parameter(q, requires_grad=False)
        kept = q.quantized_data.numel() + q.quantized_scalers.numel() + 4 * (blocks // scaler)
        saved += w.numel() * 2 - kept
    return saved
