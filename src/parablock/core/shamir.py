"""Shamir secret sharing over the prime field GF(2^521 - 1), for secure aggregation's dropout
recovery (``core/secure.py``): a client's X25519 private key (a 256-bit integer) is split into n
shares, any ``threshold`` of which give it back and fewer of which say nothing about it.

Why a module of our own: the libraries at hand do not fit. PyCryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` shares 16-byte secrets over GF(2^128) only (a 32-byte key
would have to travel as two unrelated sharings), and ``cryptography`` has no secret sharing. This
is the textbook scheme: a random polynomial of degree ``threshold - 1`` with the secret as its
constant term, evaluated at x = 1..n; Lagrange interpolation at 0 recovers it. The coefficients
come from ``secrets`` (the operating system's generator). Only field arithmetic is written here;
the key agreement, key derivation and ciphers of secure aggregation are ``cryptography``'s.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1  # a Mersenne prime: every 256-bit key is an element of the field
SHARE_BYTES = 66  # a field element, big-endian (521 bits round up to 66 bytes)

Share = tuple[int, int]  # (x, y): the polynomial's value y at x (x = 1..n)


class ShamirError(ValueError):
    """Shares that cannot give a secret back: too few, repeated or out of the field."""


def split(secret: int, n: int, threshold: int) -> list[Share]:
    """``n`` shares of ``secret`` (0 <= secret < PRIME), any ``threshold`` of which recover it."""
    if not 0 <= secret < PRIME:
        raise ShamirError("the secret is not an element of GF(2^521 - 1)")
    if not 1 <= threshold <= n:
        raise ShamirError(f"threshold {threshold} must be within 1..{n} shares")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, _evaluate(coefficients, x)) for x in range(1, n + 1)]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def combine(shares: Sequence[Share], threshold: int) -> int:
    """The secret from at least ``threshold`` shares with distinct x (the first ``threshold`` are
    used). Fewer raise ``ShamirError``: interpolating them would give a wrong value silently."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} share(s), the threshold is {threshold}")
    use = list(shares)[:threshold]
    xs = [x for x, _ in use]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("shares must have distinct x within the field")
    if any(not 0 <= y < PRIME for _, y in use):
        raise ShamirError("a share's value is outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(use):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def to_bytes(share: Share) -> bytes:
    """A share as 2 + 66 bytes: x (big-endian 16 bits), y."""
    x, y = share
    return x.to_bytes(2, "big") + y.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> Share:
    if len(data) != 2 + SHARE_BYTES:
        raise ShamirError(f"a share is {2 + SHARE_BYTES} bytes, got {len(data)}")
    x, y = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
    if not 0 < x or not y < PRIME:
        raise ShamirError("a share's x or value is outside the field")
    return x, y
