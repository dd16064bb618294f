"""Where a client trains: device strings (``cpu``, ``cuda``, ``cuda:N``), the check that the
device exists, block transfers between the device and the host, and the bytes a client's model
holds (for the memory plan of a model too large to build, on the ``meta`` device).

A GPU client holds its whole model on its device: the trained blocks and their optimizer state in
fp32, the frozen rest in ``model.frozen_dtype``, the forward under bf16 autocast. Everything that
leaves the client (deltas, the values a lossy codec's error feedback starts from) is copied to
the host first, the server stays on the CPU, and aggregates are written back into the device's
blocks in place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from parablock.errors import ConfigError

DEVICES = "cpu, cuda, cuda:N"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device_text(text: str, what: str) -> str:
    """``text`` if it names a device a client may train on; else a one-line ConfigError naming
    ``what`` (the option or key). Syntax only: whether the device exists is ``train_device``'s."""
    if not _DEVICE.fullmatch(text):
        raise ConfigError(f"{what}={text!r}: not a training device; valid: {DEVICES}")
    return text


def train_device(text: str, what: str) -> torch.device:
    """The device ``text`` names, once checked to exist here (one-line ConfigError otherwise)."""
    device = torch.device(check_device_text(text, what))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}={text}: no CUDA device is visible to this process "
                "(torch.cuda.is_available() is false); use cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{what}={text}: this process sees {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    return device


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of ``tensors`` (CPU tensors are returned as they are). From a GPU the copies go
    into pinned memory on a side stream, so the compute stream is not held while they cross."""
    first = next(iter(tensors.values()), None)
    if first is None or first.device.type != "cuda":
        return {n: t.cpu() for n, t in tensors.items()}
    side = torch.cuda.Stream(device=first.device)
    side.wait_stream(torch.cuda.current_stream(first.device))  # the values are computed
    with torch.cuda.stream(side):
        out = {
            n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for n, t in tensors.items()
        }
    side.synchronize()
    return out


def held_bytes(model: nn.Module, trained: Iterable[str]) -> dict[str, int]:
    """The bytes of a client's weights: ``trained`` (the parameters its plan trains) and
    ``frozen`` (the rest, in the dtype they are held in). Works on the ``meta`` device."""
    keep = set(trained)
    out = {"trained": 0, "frozen": 0}
    for n, p in model.named_parameters():
        if hasattr(p, "qdata"):  # torchao's int8: the values, then a scale per row
            size = (
                p.qdata.numel() * p.qdata.element_size() + p.scale.numel() * p.scale.element_size()
            )
        else:
            size = p.numel() * p.element_size()
        out["trained" if n in keep else "frozen"] += size
    return out


def optimizer_bytes(block_params: int) -> int:
    """What training one block adds: its gradient and AdamW's two moments, fp32."""
    return 3 * 4 * block_params


def memory_plan(name_or_path: str, blocks: str = "top:8", frozen_dtype: str = "bf16") -> dict:
    """The bytes one client holds for its weights and optimizer, from the model's shapes alone
    (built on ``meta``, its frozen weights converted as a client converts them): ``trained``
    (fp32), ``frozen`` (``frozen_dtype``), ``optimizer`` (the largest trained block's gradient
    and AdamW moments) and their ``total``. Activations come on top (they scale with the batch,
    the sequence and where the prefix cache starts); they are not part of this plan."""
    from parablock.model.blocks import model_blocks, select_blocks
    from parablock.model.frozen import hold_frozen
    from parablock.model.load import build_meta_model

    model = build_meta_model(name_or_path)
    every = model_blocks(model)
    selected = select_blocks(every, blocks)
    trained = {n for b in selected for n in every[b].param_names}
    hold_frozen(model, name_or_path, trained, frozen_dtype)
    params = dict(model.named_parameters())
    largest = max(sum(params[n].numel() for n in every[b].param_names) for b in selected)
    plan = {**held_bytes(model, trained), "optimizer": optimizer_bytes(largest)}
    plan["total"] = sum(plan.values())
    plan["block_params"] = largest
    return plan
