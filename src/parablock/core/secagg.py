"""Secure aggregation's arithmetic: the fixed-point encoding of a block delta into integers mod
2^64, and the pairwise masks that cancel in a sum (SecAgg, Bonawitz et al. 2017).

**Encoding.** Every coordinate of a (clipped) delta is clamped to [-R, R], multiplied by
2^b (``privacy.secagg_scale_bits``), rounded to the nearest integer and held as a uint64 in
two's complement. R is the clip bound the client applied (``privacy.clip_norm`` in client mode,
else ``federation.client_clip_norm``): a delta of L2 norm at most C has no coordinate beyond C,
so the clamp changes nothing an honest client sends and caps what any client can add. Each
encoded coordinate is an integer of magnitude at most ``Q = ceil(R * 2^b)``; the sum of n of them
lies in [-nQ, nQ], and it is read back exactly from its value mod 2^64 as long as ``n * Q <
2^63`` (``Encoding.check``: a configuration that could overflow is refused before the run).
Decoding: the sum as a signed integer, / 2^b, / the number of contributors (the mean), in
float64, then float32. Unmasked and masked sums are the same integers, so a run with masks
ends bit for bit equal to the one without (``privacy.secagg_masks = false``).

**Masks.** Clients u and v agree a secret by X25519 (keys from ``cryptography``), derive a
32-byte key from it with HKDF-SHA256 (its info binds the run's session, the purpose and the two
client ids), and expand that key with ChaCha20 into one uint64 per coordinate, for each (round,
block) a fresh stream (the nonce holds the round and the block). Client u adds the stream it
shares with each v > u and subtracts the one with each v < u, so over all clients they cancel
mod 2^64. Nothing here is a hand-written cipher: X25519, HKDF, ChaCha20 and ChaCha20-Poly1305 are
``cryptography``'s (OpenSSL's).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from parablock.errors import ConfigError

MODULUS_BITS = 64  # arithmetic mod 2^64: numpy's uint64 wraps exactly
SIGNED_LIMIT = 1 << 63  # |a decoded sum| must stay below it
KEY_BYTES = 32
DEFAULT_SCALE_BITS = 32
MASK_PURPOSE, SEAL_PURPOSE = b"mask", b"share"

Tensors = dict[str, torch.Tensor]
Layout = list[tuple[str, tuple[int, ...]]]  # (name, shape) in the order the vector holds them


# -- the fixed-point encoding ------------------------------------------------------------------
class Encoding:
    """Fixed point mod 2^64: ``bound`` R (each coordinate clamped to +-R), ``scale_bits`` b."""

    def __init__(self, bound: float, scale_bits: int = DEFAULT_SCALE_BITS) -> None:
        if not (bound > 0 and math.isfinite(bound)) or not 1 <= scale_bits <= 62:
            raise ValueError(f"encoding range {bound!r} / scale bits {scale_bits!r}")
        self.bound, self.scale_bits = float(bound), int(scale_bits)
        self.scale = float(1 << scale_bits)
        self.largest = math.ceil(self.bound * self.scale)  # Q: the largest |encoded coordinate|

    def fits(self, clients: int) -> bool:
        """Whether the sum of ``clients`` encoded deltas can never leave the signed range."""
        return clients * self.largest < SIGNED_LIMIT

    def check(self, clients: int, keys: str) -> None:
        """Refuse (``ConfigError``, one line naming ``keys``) an encoding whose sum could overflow."""
        if not self.fits(clients):
            raise ConfigError(
                f"secure aggregation could overflow: {clients} clients x ceil(R x 2^b) = "
                f"{clients} x {self.largest} >= 2^63 (R = {self.bound:g}, b = {self.scale_bits});"
                f" lower {keys}"
            )

    def encode(self, tensors: Tensors, layout: Layout) -> np.ndarray:
        """The delta as one uint64 vector (the tensors of ``layout`` in its order)."""
        x = np.concatenate(
            [tensors[n].detach().reshape(-1).to(torch.float64).numpy() for n, _ in layout]
        )
        np.clip(x, -self.bound, self.bound, out=x)
        x *= self.scale  # a power of two: exact
        return np.rint(x).astype(np.int64).view(np.uint64)

    def decode(self, total: np.ndarray, count: int, layout: Layout) -> Tensors:
        """The mean of ``count`` encoded deltas whose sum mod 2^64 is ``total``, as float32."""
        if count < 1:
            raise ValueError("a mean of no updates")
        x = total.view(np.int64).astype(np.float64)
        x /= self.scale
        x /= count
        return split(x.astype(np.float32), layout)


def layout_of(shapes: dict[str, tuple[int, ...]]) -> Layout:
    """The order a block's tensors take in the vector: by name."""
    return [(n, tuple(shapes[n])) for n in sorted(shapes)]


def split(vector: np.ndarray, layout: Layout) -> Tensors:
    """One flat vector back into the named tensors of ``layout`` (fresh tensors)."""
    out, pos = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = torch.from_numpy(vector[pos : pos + size].copy()).reshape(shape)
        pos += size
    if pos != len(vector):
        raise ValueError(f"a vector of {len(vector)} values for a layout of {pos}")
    return out


def as_wire(vector: np.ndarray, layout: Layout) -> Tensors:
    """A uint64 vector as the int64 tensors of a ``BlockUpdate`` (the same bits)."""
    return split(vector.view(np.int64), layout)


def from_wire(tensors: Tensors, layout: Layout) -> np.ndarray:
    """An update's int64 tensors back into one uint64 vector."""
    return np.concatenate([tensors[n].reshape(-1).numpy() for n, _ in layout]).view(np.uint64)


# -- keys and masks ------------------------------------------------------------------------------
def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def load_public(data: bytes) -> X25519PublicKey:
    if len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def pair_key(
    key: X25519PrivateKey, peer: bytes, session: bytes, me: int, other: int, purpose: bytes
) -> bytes:
    """The 32-byte key ``me`` and ``other`` both derive (HKDF-SHA256 over their X25519 secret;
    the info binds the session, the purpose and the pair, in ascending order)."""
    shared = key.exchange(load_public(peer))  # raises on a low-order (all-zero) result
    lo, hi = sorted((me, other))
    info = b"parablock-secagg/1|" + purpose + b"|" + session + struct.pack("<II", lo, hi)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


def all_mask_keys(keys: list[X25519PrivateKey], session: bytes) -> list[dict[int, bytes]]:
    """Every party's pairwise mask keys when one process plays all of them (tests, benchmarks):
    entry u maps each other party v to the key u and v share."""
    pub = [public_bytes(k) for k in keys]
    return [
        {
            v: pair_key(keys[u], pub[v], session, u, v, MASK_PURPOSE)
            for v in range(len(keys))
            if v != u
        }
        for u in range(len(keys))
    ]


def keystream(key: bytes, round: int, block: int, count: int) -> np.ndarray:
    """``count`` uint64 of ChaCha20's keystream under ``key`` for (round, block)."""
    nonce = struct.pack("<IQI", 0, round, block)  # a 32-bit block counter from 0, then ours
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * count)), dtype=np.uint64)


def mask(vector: np.ndarray, me: int, keys: dict[int, bytes], round: int, block: int) -> np.ndarray:
    """``vector`` plus the stream shared with every peer v > me, minus every v < me."""
    out = vector.copy()
    for peer, key in sorted(keys.items()):
        stream = keystream(key, round, block, len(out))
        if peer > me:
            out += stream
        else:
            out -= stream
    return out


def dangling(
    survivors: Sequence[int], gone: int, keys: dict[int, bytes], round: int, block: int, n: int
) -> np.ndarray:
    """What the masks of ``gone`` (no update in the sum) leave in the survivors' sum: the sum
    over each survivor s of +stream(s, gone) if gone > s, else -stream. ``keys``: survivor ->
    the pair key of (survivor, gone)."""
    out = np.zeros(n, dtype=np.uint64)
    for s in sorted(survivors):
        stream = keystream(keys[s], round, block, n)
        if gone > s:
            out += stream
        else:
            out -= stream
    return out


# -- sealed shares --------------------------------------------------------------------------------
def _aad(session: bytes, sender: int, receiver: int) -> bytes:
    return b"parablock-secagg/1|seal|" + session + struct.pack("<II", sender, receiver)


def seal(key: bytes, data: bytes, session: bytes, sender: int, receiver: int) -> bytes:
    """``data`` from ``sender`` for ``receiver`` under their pair key (ChaCha20-Poly1305)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, data, _aad(session, sender, receiver))


def open_sealed(key: bytes, sealed: bytes, session: bytes, sender: int, receiver: int) -> bytes:
    """What ``seal`` sealed; ``cryptography``'s ``InvalidTag`` if the key, the parties or the
    bytes are not the ones it was sealed with."""
    if len(sealed) < 12 + 16:
        raise ValueError("a sealed share is too short")
    return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], _aad(session, sender, receiver))
