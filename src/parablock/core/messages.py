"""Typed messages that cross a link, and their byte format (safetensors + metadata + checksum).

Blocks always travel as bytes, never as shared tensors: ``deserialize`` builds fresh tensors, so a
client's tensors and the server's never alias. A payload whose checksum, header, names or values do
not check out raises ``MessageError`` and is never applied.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from parablock.errors import MessageError  # noqa: F401

_FORMAT = "parablock/1"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    if not tensors:
        raise MessageError(f"{what} carries no tensors")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise MessageError(f"{what}: {name} is not a tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MessageError(f"{what}: {name} holds NaN or Inf")


def _pack(kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    header = {"format": _FORMAT, "kind": kind, "meta": json.dumps(meta), "digest": _digest(tensors)}
    return st_save({n: t.contiguous() for n, t in tensors.items()}, metadata=header)


def _unpack(kind: str, payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    if len(payload) < 8:
        raise MessageError(f"{kind}: payload of {len(payload)} bytes is truncated")
    try:
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        info = header.get("__metadata__", {})
        tensors = st_load(bytes(payload))
    except Exception as e:  # safetensors raises several error types on a damaged header
        raise MessageError(f"{kind}: unreadable payload ({type(e).__name__}: {e})") from None
    if info.get("format") != _FORMAT or info.get("kind") != kind:
        raise MessageError(f"{kind}: wrong message kind {info.get('kind')!r}")
    if _digest(tensors) != info.get("digest"):
        raise MessageError(f"{kind}: checksum mismatch (corrupted in transit)")
    return json.loads(info["meta"]), tensors


@dataclass(frozen=True)
class BlockUpdate:
    """A client's delta for one block after one round of local training."""

    client: int
    round: int
    block: int
    base_version: int  # the version of the block the client trained from
    num_examples: int
    train_loss: float
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if self.client < 0 or self.round < 0 or self.block < 0:
            raise MessageError(f"BlockUpdate: negative client/round/block in {self}")
        if self.num_examples <= 0:
            raise MessageError(f"BlockUpdate: num_examples must be > 0, got {self.num_examples}")
        if not math.isfinite(self.train_loss):
            raise MessageError(f"BlockUpdate: train_loss is {self.train_loss}")
        _check_tensors(self.tensors, f"BlockUpdate(client {self.client}, round {self.round})")

    def serialize(self) -> bytes:
        meta = {
            k: getattr(self, k)
            for k in ("client", "round", "block", "base_version", "num_examples", "train_loss")
        }
        return _pack("BlockUpdate", meta, self.tensors)

    @classmethod
    def deserialize(cls, payload: bytes) -> BlockUpdate:
        meta, tensors = _unpack("BlockUpdate", payload)
        try:
            return cls(tensors=tensors, **meta)
        except TypeError as e:
            raise MessageError(f"BlockUpdate: bad metadata ({e})") from None


@dataclass(frozen=True)
class BlockValue:
    """The server's global value of one block, at ``version`` (the round that last changed it)."""

    block: int
    version: int
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if self.block < 0 or self.version < -1:
            raise MessageError(f"BlockValue: bad block/version in {self}")
        _check_tensors(self.tensors, f"BlockValue(block {self.block})")

    def serialize(self) -> bytes:
        return _pack("BlockValue", {"block": self.block, "version": self.version}, self.tensors)

    @classmethod
    def deserialize(cls, payload: bytes) -> BlockValue:
        meta, tensors = _unpack("BlockValue", payload)
        try:
            return cls(tensors=tensors, **meta)
        except TypeError as e:
            raise MessageError(f"BlockValue: bad metadata ({e})") from None


# The same checked envelope (safetensors + JSON metadata + digest) serves checkpoint files.
pack = _pack
unpack = _unpack
