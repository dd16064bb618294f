"""A bundle's frames as a Flower record: one uint8 ``Array`` per frame, in order (Flower chunks
large arrays on the wire). Imports flwr and numpy only, so the ClientApp starts fast."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

RECORD = "parablock"
MAX_FRAMES = 65  # bundle.MAX_FRAMES (kept here too: this module must not import torch)


def to_record(frames: list[bytes]) -> RecordDict:
    arrays = {f"f{i:03d}": Array(np.frombuffer(f, dtype=np.uint8)) for i, f in enumerate(frames)}
    return RecordDict({RECORD: ArrayRecord(arrays)})


def from_record(content: RecordDict) -> list[bytes]:
    """The frames, or ValueError for content that is not a bundle."""
    record = content.array_records.get(RECORD) if content is not None else None
    if record is None:
        raise ValueError(f"the message has no {RECORD!r} array record")
    keys = sorted(record.keys())
    if len(keys) > MAX_FRAMES or keys != [f"f{i:03d}" for i in range(len(keys))]:
        raise ValueError("the message's frames are not f000, f001, ... (at most 65)")
    frames = []
    for k in keys:
        a = record[k]
        if a.dtype != "uint8" or len(a.shape) != 1:
            raise ValueError(f"frame {k} is not a flat uint8 array")
        frames.append(a.numpy().tobytes())
    return frames
