"""Typed messages that cross a link, and their byte format (safetensors + metadata + checksum).

Blocks always travel as bytes, never as shared tensors: ``deserialize`` builds fresh tensors, so a
client's tensors and the server's never alias. A payload whose checksum, header, names or values do
not check out raises ``MessageError`` and is never applied.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from parablock.errors import MessageError, Refused  # noqa: F401

_FORMAT = "parablock/1"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(_bytes_view(tensors[name]))
    return h.hexdigest()


def _bytes_view(t: torch.Tensor):
    """The tensor's bytes without a copy (a uint8 numpy view of a contiguous CPU tensor)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # 0-dim too


def _check_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    if not tensors:
        raise MessageError(f"{what} carries no tensors")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise MessageError(f"{what}: {name} is not a tensor")
        if t.is_floating_point() and not all_finite(t):
            raise Refused("not_finite", f"{what}: {name} holds NaN or Inf")


def parse_json(text: bytes | str, what: str) -> Any:
    """A peer's JSON, or ``MessageError`` saying why not: malformed, not UTF-8, or nested too deep
    for the parser (which would otherwise escape as a ``RecursionError``)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MessageError(f"{what}: JSON nested too deeply") from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise MessageError(f"{what}: not JSON ({type(e).__name__}: {str(e)[:80]})") from None


def all_finite(t: torch.Tensor, step: int = 1 << 20) -> bool:
    """``isfinite(t).all()`` a million elements at a time: its temporaries (a float copy and
    masks) would otherwise cost several times a large block's size."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


# -- the byte format, as a stream of chunks ----------------------------------------------------
# A message is a safetensors file: 8-byte little-endian header length, a JSON header (tensor
# names, dtypes, shapes, byte offsets, and our metadata), then the tensors' bytes in name order.
# It can be produced and consumed chunk by chunk, so a block of any size crosses a network with
# one chunk in flight at a time, and the receiver writes the bytes straight into tensors it
# allocated from a header it has already checked.

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB message limit
MAX_HEADER_BYTES = 1 << 20
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}

# What a receiver expects: tensor name -> (shape, dtype). A stream whose header differs is
# refused before anything is allocated for it.
Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


def encode(
    kind: str, meta: dict, tensors: dict[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The message as chunks of at most ``chunk_bytes`` (the header comes first, alone)."""
    names = sorted(tensors)
    entries, offset = {}, 0
    for n in names:
        t = tensors[n]
        if t.dtype not in _CODES:
            raise MessageError(f"{kind}: {n} has unsupported dtype {t.dtype}")
        size = t.numel() * t.element_size()
        entries[n] = {
            "dtype": _CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    entries["__metadata__"] = {
        "format": _FORMAT,
        "kind": kind,
        "meta": json.dumps(meta),
        "digest": _digest(tensors),
    }
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    yield len(header).to_bytes(8, "little") + header
    for n in names:
        view = _bytes_view(tensors[n])
        for pos in range(0, len(view), chunk_bytes):
            yield view[pos : pos + chunk_bytes].tobytes()


def decode(
    kind: str,
    chunks: Iterable[bytes],
    expected: Callable[[dict], Expected | None] | None = None,
    max_bytes: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a message from its chunks; returns (metadata, fresh tensors).

    ``expected(meta)`` may name the exact tensors the receiver will accept for this metadata;
    otherwise ``max_bytes`` bounds what the header may claim. Anything malformed, truncated,
    oversized, unexpected or whose checksum fails raises ``MessageError``.
    """
    it = iter(chunks)
    buf = bytearray()
    try:
        while len(buf) < 8:
            buf += _next_chunk(it, kind)
        size = int.from_bytes(buf[:8], "little")
        if size > MAX_HEADER_BYTES:
            raise MessageError(f"{kind}: header of {size} bytes is too large")
        while len(buf) < 8 + size:
            buf += _next_chunk(it, kind)
    except MessageError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"{kind}: unreadable header ({type(e).__name__}: {e})") from None
    header = parse_json(bytes(buf[8 : 8 + size]), f"{kind}: header")
    meta, layout, digest = _parse_header(kind, header)
    if expected is not None:
        want = expected(meta)
        if want is not None:
            got = {n: (shape, dtype) for n, (shape, dtype, _, _) in layout.items()}
            if got != want:
                raise MessageError(
                    f"{kind}: tensors {_describe(got)} do not match {_describe(want)}"
                )
    total = max((end for *_, end in layout.values()), default=0)
    if max_bytes is not None and total > max_bytes:
        raise MessageError(f"{kind}: {total} bytes exceed the limit of {max_bytes}")
    tensors = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype, _, _) in layout.items()}
    order = sorted(layout, key=lambda n: layout[n][2])
    pos = 0  # bytes of data received so far
    pending = memoryview(buf)[8 + size :]
    for n in order:
        view = _bytes_view(tensors[n]) if tensors[n].numel() else None
        start, end = layout[n][2], layout[n][3]
        if start != pos:
            raise MessageError(f"{kind}: tensor {n} does not start where the previous one ended")
        filled = 0
        while filled < end - start:
            if not len(pending):
                pending = memoryview(_next_chunk(it, kind))
                continue
            take = min(len(pending), end - start - filled)
            view[filled : filled + take] = pending[:take]
            pending, filled = pending[take:], filled + take
        pos = end
    if len(pending) or next(it, None):
        raise MessageError(f"{kind}: bytes after the last tensor")
    if _digest(tensors) != digest:
        raise MessageError(f"{kind}: checksum mismatch (corrupted in transit)")
    return meta, tensors


def _next_chunk(it: Iterator[bytes], kind: str) -> bytes:
    chunk = next(it, None)
    if chunk is None:
        raise MessageError(f"{kind}: payload is truncated")
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise MessageError(f"{kind}: a chunk is not bytes")
    return chunk


def _parse_header(kind: str, header) -> tuple[dict, dict, str]:
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise MessageError(f"{kind}: header without metadata")
    info = header["__metadata__"]
    if info.get("format") != _FORMAT or info.get("kind") != kind:
        raise MessageError(f"{kind}: wrong message kind {info.get('kind')!r}")
    if not isinstance(info.get("meta"), str):
        raise MessageError(f"{kind}: metadata is not JSON")
    meta = parse_json(info["meta"], f"{kind}: metadata")
    if not isinstance(meta, dict) or not isinstance(info.get("digest"), str):
        raise MessageError(f"{kind}: metadata must be an object with a digest")
    layout = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(e, dict)
            and e.get("dtype") in _DTYPES
            and isinstance(e.get("shape"), list)
            and all(type(d) is int and 0 <= d < 1 << 40 for d in e["shape"])
            and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2
            and all(type(o) is int and o >= 0 for o in e["data_offsets"])
        )
        if not ok:
            raise MessageError(f"{kind}: malformed header entry for {name!r}")
        dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
        start, end = e["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise MessageError(f"{kind}: {name} offsets do not match its shape")
        layout[name] = (shape, dtype, start, end)
    return meta, layout, info["digest"]


def _describe(tensors: Expected) -> str:
    items = [
        f"{n}{list(s)}:{str(d).removeprefix('torch.')}" for n, (s, d) in sorted(tensors.items())
    ]
    return "{" + ", ".join(items[:3]) + (", ..." if len(items) > 3 else "") + "}"


def _pack(kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(encode(kind, meta, tensors, chunk_bytes=1 << 62))


def _unpack(kind: str, payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    return decode(kind, [payload])


_UPDATE_FIELDS = ("client", "round", "block", "base_version", "num_examples", "train_loss")


def _strict_meta(kind: str, meta: dict, ints: tuple[str, ...], floats: tuple[str, ...] = ()):
    """Exactly these fields, integers as JSON integers and floats as finite numbers."""
    if set(meta) != set(ints) | set(floats):
        raise MessageError(f"{kind}: metadata fields {sorted(meta)} != {sorted(ints + floats)}")
    for k in ints:
        if type(meta[k]) is not int or abs(meta[k]) > 1 << 62:
            raise MessageError(f"{kind}: {k} must be an integer, got {meta[k]!r:.40}")
    for k in floats:
        if type(meta[k]) not in (int, float) or not math.isfinite(meta[k]):
            raise MessageError(f"{kind}: {k} must be a finite number, got {meta[k]!r:.40}")
    return meta


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

    def meta(self) -> dict:
        return {k: getattr(self, k) for k in _UPDATE_FIELDS}

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        return encode("BlockUpdate", self.meta(), self.tensors, chunk_bytes)

    def serialize(self) -> bytes:
        return _pack("BlockUpdate", self.meta(), self.tensors)

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[bytes], expected: Callable[[dict], Expected | None] | None = None
    ) -> BlockUpdate:
        def check(meta: dict) -> Expected | None:
            _strict_meta("BlockUpdate", meta, _UPDATE_FIELDS[:-1], ("train_loss",))
            return expected(meta) if expected is not None else None

        meta, tensors = decode("BlockUpdate", chunks, check)
        return cls(tensors=tensors, **meta)

    @classmethod
    def deserialize(cls, payload: bytes) -> BlockUpdate:
        return cls.from_chunks([payload])


@dataclass(frozen=True)
class BlockValue:
    """The server's global value of one block, at ``version`` (the round that last changed it).

    With a lossy ``link.compression`` a round's aggregate can come instead as the change from
    ``base_version``: ``tensors`` are then that change in the codec's wire form, and the client
    applies it to its own copy of the block at ``base_version`` with the server's formula.
    ``base_version`` is None for a whole value (and then absent from the bytes, as before).
    """

    block: int
    version: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    base_version: int | None = None

    def __post_init__(self) -> None:
        if self.block < 0 or self.version < -1:
            raise MessageError(f"BlockValue: bad block/version in {self}")
        if self.base_version is not None and not -1 <= self.base_version < self.version:
            raise MessageError(f"BlockValue: bad base version in {self}")
        _check_tensors(self.tensors, f"BlockValue(block {self.block})")

    def meta(self) -> dict:
        meta = {"block": self.block, "version": self.version}
        if self.base_version is not None:
            meta["base_version"] = self.base_version
        return meta

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        return encode("BlockValue", self.meta(), self.tensors, chunk_bytes)

    def serialize(self) -> bytes:
        return _pack("BlockValue", self.meta(), self.tensors)

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[bytes], expected: Callable[[dict], Expected | None] | None = None
    ) -> BlockValue:
        def check(meta: dict) -> Expected | None:
            ints = ("block", "version") + (("base_version",) if "base_version" in meta else ())
            _strict_meta("BlockValue", meta, ints)
            return expected(meta) if expected is not None else None

        meta, tensors = decode("BlockValue", chunks, check)
        return cls(tensors=tensors, **meta)

    @classmethod
    def deserialize(cls, payload: bytes) -> BlockValue:
        return cls.from_chunks([payload])


def expecting(
    expected: Expected | Callable[[dict], Expected | None] | None,
) -> Callable[[dict], Expected | None] | None:
    """A receiver's expectation as ``decode`` takes it: a function of the metadata (a whole block
    value and a compressed change of it have different layouts), or one layout for any."""
    if expected is None or callable(expected):
        return expected
    return lambda meta: expected


# The same checked envelope (safetensors + JSON metadata + digest) serves checkpoint files.
pack = _pack
unpack = _unpack
