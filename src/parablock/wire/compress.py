"""Smaller deltas on the wire (``link.compression``): the codecs and their error feedback.

A codec turns a block delta (float32 tensors by parameter name) into the tensors that cross a
link, and back:

- ``none``: float32 as it is (lossless; nothing about the run changes);
- ``bf16``: each value rounded to bfloat16, half the bytes;
- ``int8``: per row (the first dimension; one row for a 1-D tensor) a float32 scale
  ``absmax / 127`` and the values as int8 in [-127, 127]: about a quarter of the bytes;
- ``int4``: the flattened tensor in groups of 64 values, per group a float32 scale ``absmax / 7``
  and the values in [-7, 7] stored as ``q + 8`` in one nibble, two to a byte (the even index in
  the low nibble; a last, short group padded with zeros): 0.5625 bytes a value, 1/7 of float32.

Error feedback makes the lossy ones lose nothing for good, only late: ``ErrorFeedback`` keeps,
per block, what quantisation dropped from that block's last delta and adds it to the next one
before quantising, so the sum of what crossed over the rounds tracks the sum of the true deltas
to within one round's quantisation error. Clients keep one residual per block for their uploads;
the server one per block for the aggregates it sends back.

The receiver trusts nothing: ``decode`` accepts exactly the layout its codec produces (names,
dtypes, shapes), finite non-negative scales, int8 values within [-127, 127] and int4 nibbles within [1, 15]
(padding 8, the value 0), and raises
``MessageError`` for anything else; what it returns is float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from parablock.registry import Registry
from parablock.wire.messages import Expected, MessageError, all_finite

Shapes = dict[str, tuple[int, ...]]  # parameter name -> shape
Tensors = dict[str, torch.Tensor]

SCALE = "#scale"  # suffix of an int8 tensor's scales ('#' is in no parameter name)
QMAX = 127


class Codec(ABC):
    """The layout, encoder and checked decoder of one ``link.compression``."""

    name = ""
    lossy = True

    @abstractmethod
    def layout(self, shapes: Shapes) -> Expected:
        """Exactly the wire tensors ``encode`` makes for parameters of these shapes."""

    @abstractmethod
    def encode(self, tensors: Tensors) -> Tensors:
        """The wire tensors of float32 ``tensors``."""

    @abstractmethod
    def _decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        """float32 tensors from wire tensors whose layout ``decode`` has checked."""

    def decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        """float32 tensors from wire tensors that must match ``layout(shapes)`` exactly."""
        want = self.layout(shapes)
        if set(wire) != set(want):
            missing, extra = sorted(set(want) - set(wire)), sorted(set(wire) - set(want))
            raise MessageError(
                f"{self.name} payload: tensors missing {missing[:3]} / unexpected {extra[:3]}"
            )
        for n, (shape, dtype) in want.items():
            t = wire[n]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t)
                raise MessageError(
                    f"{self.name} payload: {n} is {got}, expected {shape} {dtype}".replace(
                        "torch.", ""
                    )
                )
        return self._decode(wire, shapes)


class NoCodec(Codec):
    name, lossy = "none", False

    def layout(self, shapes: Shapes) -> Expected:
        return {n: (s, torch.float32) for n, s in shapes.items()}

    def encode(self, tensors: Tensors) -> Tensors:
        return dict(tensors)

    def _decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        for n, t in wire.items():
            if not all_finite(t):
                raise MessageError(f"none payload: {n} is not finite")
        return dict(wire)


class Bf16Codec(Codec):
    name = "bf16"

    def layout(self, shapes: Shapes) -> Expected:
        return {n: (s, torch.bfloat16) for n, s in shapes.items()}

    def encode(self, tensors: Tensors) -> Tensors:
        return {n: t.to(torch.bfloat16) for n, t in tensors.items()}

    def _decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        for n, t in wire.items():
            if not all_finite(t):
                raise MessageError(f"bf16 payload: {n} is not finite")
        return {n: t.float() for n, t in wire.items()}


def _rows(shape: tuple[int, ...]) -> int:
    """How many scales a tensor of ``shape`` has: one per row, or one for a 1-D (or 0-D) one."""
    return shape[0] if len(shape) >= 2 else 1


class Int8Codec(Codec):
    name = "int8"

    def layout(self, shapes: Shapes) -> Expected:
        out: Expected = {}
        for n, s in shapes.items():
            out[n] = (s, torch.int8)
            out[n + SCALE] = ((_rows(s),), torch.float32)
        return out

    def encode(self, tensors: Tensors) -> Tensors:
        out = {}
        for n, t in tensors.items():
            rows = t.detach().float().reshape(_rows(tuple(t.shape)), -1)
            if rows.shape[1]:
                scale = rows.abs().amax(dim=1) / QMAX
            else:
                scale = torch.zeros(rows.shape[0])
            # a zero row (or one so small its scale underflows) divides by 1 and rounds to 0
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(rows / divisor[:, None]).clamp_(-QMAX, QMAX)
            out[n] = q.to(torch.int8).reshape(t.shape)
            out[n + SCALE] = scale
        return out

    def _decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        out = {}
        for n, s in shapes.items():
            q, scale = wire[n], wire[n + SCALE]
            if not all_finite(scale) or bool((scale < 0).any()):
                raise MessageError(f"int8 payload: {n}{SCALE} holds a negative or non-finite scale")
            if bool((q == -QMAX - 1).any()):
                raise MessageError(f"int8 payload: {n} holds -128, outside [-127, 127]")
            rows = q.reshape(_rows(s), -1).float() * scale[:, None]
            out[n] = rows.reshape(s)
        return out


GROUP = 64  # int4: values per scale
QMAX4 = 7


def _groups(shape: tuple[int, ...]) -> int:
    """How many int4 groups (and scales) a tensor of ``shape`` has."""
    return -(-_numel(shape) // GROUP)


class Int4Codec(Codec):
    name = "int4"

    def layout(self, shapes: Shapes) -> Expected:
        out: Expected = {}
        for n, s in shapes.items():
            out[n] = ((_groups(s) * GROUP // 2,), torch.uint8)
            out[n + SCALE] = ((_groups(s),), torch.float32)
        return out

    def encode(self, tensors: Tensors) -> Tensors:
        out = {}
        for n, t in tensors.items():
            flat = t.detach().float().reshape(-1)
            groups = _groups(tuple(t.shape))
            padded = torch.zeros(groups * GROUP)
            padded[: flat.numel()] = flat
            g = padded.reshape(groups, GROUP)
            scale = g.abs().amax(dim=1) / QMAX4 if groups else torch.zeros(0)
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(g / divisor[:, None]).clamp_(-QMAX4, QMAX4).to(torch.uint8) + 8
            q = q.reshape(-1, 2)
            out[n] = q[:, 0] | (q[:, 1] << 4)
            out[n + SCALE] = scale
        return out

    def _decode(self, wire: Tensors, shapes: Shapes) -> Tensors:
        out = {}
        for n, s in shapes.items():
            packed, scale = wire[n], wire[n + SCALE]
            if not all_finite(scale) or bool((scale < 0).any()):
                raise MessageError(f"int4 payload: {n}{SCALE} holds a negative or non-finite scale")
            q = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1)
            if bool((q == 0).any()):
                raise MessageError(f"int4 payload: {n} holds -8, outside [-7, 7]")
            numel = _numel(s)
            if bool((q[numel:] != 8).any()):
                raise MessageError(f"int4 payload: {n} has non-zero padding after its values")
            values = (q.float() - 8).reshape(-1, GROUP) * scale[:, None]
            out[n] = values.reshape(-1)[:numel].reshape(s)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


CODECS: Registry[Codec] = Registry("link.compression")
for _codec in (NoCodec(), Bf16Codec(), Int8Codec(), Int4Codec()):
    CODECS.add(_codec.name, _codec)


class ErrorFeedback:
    """Per block, what ``codec`` dropped from the last delta of that block, added to the next.

    ``encode`` quantises ``delta + residual`` and keeps ``(delta + residual) - decoded`` as the
    block's new residual; ``encode_aside`` computes both without keeping the residual (the server
    keeps it only once the aggregate it belongs to has been checked and applied).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residuals: dict[int, Tensors] = {}

    def encode_aside(self, block: int, delta: Tensors) -> tuple[Tensors, Tensors]:
        kept = self.residuals.get(block)
        x = {n: t.float() + kept[n] if kept else t.float() for n, t in delta.items()}
        wire = self.codec.encode(x)
        back = self.codec._decode(wire, {n: tuple(t.shape) for n, t in x.items()})
        return wire, {n: x[n] - back[n] for n in x}

    def encode(self, block: int, delta: Tensors) -> Tensors:
        wire, residual = self.encode_aside(block, delta)
        self.residuals[block] = residual
        return wire

    def keep(self, block: int, residual: Tensors) -> None:
        self.residuals[block] = residual
