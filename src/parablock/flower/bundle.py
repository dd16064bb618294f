"""What one Flower message carries between the ServerApp and a client's worker.

A bundle is a list of typed ``Item``s (requests one way, their answers the other) and the byte
payloads they point at (a serialized update or block, a join request or reply, a report). It
crosses as *frames*: frame 0 is the strict JSON manifest, frame ``i + 1`` is payload ``i``. Flower
carries the frames as uint8 arrays of an ``ArrayRecord`` (chunked by Flower); between the
ClientApp and its worker they are the messages of one gRPC stream each way. Neither side trusts
the other's frames further than ``Manifest.from_bytes`` and the payload's own parser.

An answer has the same *key* as the request it answers (``kind``, round, block, version, base),
so the server may also send answers before they are asked for: after an accepted upload, the
round's ``wait`` and ``download`` answers come with the upload's, in one message per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parablock.errors import MessageError
from parablock.wire.protocol import Message

# client -> server requests; the server answers each with an item of the same kind and key
JOIN, UPLOAD, WAIT, DOWNLOAD = "join", "upload", "wait", "download"
REPORT = "report"  # client -> server, answered by nothing
DONE = "done"  # client -> server: the client has finished (its final report is in the bundle)
# server -> client: the server lost this client's session (a message failed): every request it
# had not answered is void, and the client joins again (from its checkpoint) to take part again
REJOIN = "rejoin"
KINDS = (JOIN, UPLOAD, WAIT, DOWNLOAD, REPORT, DONE, REJOIN)
MAX_ITEMS = 64  # an honest bundle holds a handful
MAX_FRAMES = MAX_ITEMS + 1

Key = tuple[str, int, int, int, int | None]


@dataclass(frozen=True)
class Item(Message):
    kind: str
    round: int = -1
    block: int = -1
    version: int = -1
    base: int | None = None
    payload: int = -1  # index of its bytes among the bundle's payloads; -1: none
    error: str = ""  # an answer that is an error: the exception the caller gets (ERRORS)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown item kind {self.kind!r}")
        if self.payload < -1 or self.payload >= MAX_ITEMS:
            raise ValueError("payload index out of range")

    def key(self) -> Key:
        """What an answer shares with its request (a ``wait`` answer adds block and version,
        an ``upload`` request tells its base: neither is part of the key)."""
        if self.kind == DOWNLOAD:
            return (self.kind, -1, self.block, self.version, self.base)
        if self.kind in (UPLOAD, WAIT):
            return (self.kind, self.round, -1, -1, None)
        return (self.kind, -1, -1, -1, None)


@dataclass(frozen=True)
class Manifest(Message):
    items: list[Item]


@dataclass
class Bundle:
    items: list[Item] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    def add(self, item: Item, payload: bytes | None = None) -> None:
        if payload is not None:
            item = Item(**{**item.__dict__, "payload": len(self.payloads)})
            self.payloads.append(payload)
        self.items.append(item)

    def payload(self, item: Item) -> bytes:
        if item.payload < 0:
            raise MessageError(f"{item.kind} item carries no payload")
        return self.payloads[item.payload]

    def frames(self) -> list[bytes]:
        return [Manifest(self.items).to_bytes(), *self.payloads]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> Bundle:
        if not frames or len(frames) > MAX_FRAMES:
            raise MessageError(f"a bundle has 1..{MAX_FRAMES} frames, got {len(frames)}")
        manifest = Manifest.from_bytes(frames[0])
        payloads = list(frames[1:])
        if len(manifest.items) > MAX_ITEMS:
            raise MessageError(f"a bundle holds at most {MAX_ITEMS} items")
        used = [i.payload for i in manifest.items if i.payload >= 0]
        if sorted(used) != list(range(len(payloads))):
            raise MessageError("a bundle's items must point at each payload exactly once")
        return cls(list(manifest.items), payloads)
