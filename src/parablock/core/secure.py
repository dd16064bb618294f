"""Secure aggregation of block deltas (``privacy.secure_aggregation``): the server holds only
masked updates and their sum (docs/privacy.md, "Secure aggregation").

- ``SecureClient`` (a client's side): its X25519 key pair (made before the join, its public half
  sent in ``JoinRequest.secagg_key``), the one exchange after the join (``setup``: every
  client's public key from the server; its private key Shamir-shared with threshold t, each
  share sealed for its receiver with ChaCha20-Poly1305 under a key only the two of them derive,
  so the server relays shares it cannot read), and ``mask``: encode a clipped delta in fixed
  point and add the pairwise masks of (round, block). Masks come from keys agreed once, so a
  round without a dropout costs no extra round trip.
- ``Mask``: that masking as a stage of the client's delta pipeline (``core/pipeline.py``), after
  clipping and noise, before the codec (compression is refused with secure aggregation).
- ``SecureSum`` (the server's side, a role of ``core.server.Server`` through ``SecureRole``):
  the registered keys and sealed shares, the sum mod 2^64 of a round's masked updates, and
  dropout recovery. A client that dropped before its upload leaves its pairwise masks in the
  others' updates: the server asks the round's contributors (``AggregateReady.reveal``) to open
  their shares of that client's key, reconstructs it from t of them, removes the dangling
  masks and decodes the mean. Fewer than t contributors, or shares that do not arrive before
  the round's deadline: the round fails, the global model unchanged. A key the server has
  reconstructed is spent: its owner can neither upload nor rejoin again.

The threat model is an honest-but-curious server that does not lie about who dropped: nothing
here stops a server that claims a live client dropped from asking for its shares (SecAgg's
self-mask, which would, is left out). Survivors only ever open shares of the clients the server
names as dropped, never their own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from parablock.core import secagg, shamir
from parablock.errors import MessageError, Refused
from parablock.wire.messages import BlockUpdate
from parablock.wire.protocol import PrivacySettings, SecAggCall, SecAggReply

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
RANGE_KEYS = "privacy.secagg_scale_bits or the clip bound (privacy.clip_norm / client_clip_norm)"


def _private_int(key: X25519PrivateKey) -> int:
    return int.from_bytes(secagg.private_bytes(key), "big")


def _key_of(secret: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(secret.to_bytes(secagg.KEY_BYTES, "big"))


class SecureClient:
    """One client's keys and masking (see the module)."""

    def __init__(
        self,
        client: int,
        key: X25519PrivateKey,
        settings: PrivacySettings,
        clients: int,
        client_clip_norm: float = 0.0,
    ) -> None:
        self.id, self.key, self.clients = client, key, clients
        self.encoding = secagg.Encoding(
            settings.secagg_range(client_clip_norm), settings.secagg_scale_bits
        )
        self.masks, self.threshold = settings.secagg_masks, settings.secagg_threshold
        self.connection = None  # the client's ServerConnection, set by the client
        self.session = b""
        self.mask_keys: dict[int, bytes] = {}
        self.seal_keys: dict[int, bytes] = {}
        self.setup_bytes = 0  # what the exchange sent and received (the benchmark reads it)
        self._lock = threading.Lock()

    def setup(self) -> None:
        """The exchange, once: every client's key, then this key's sealed shares."""
        with self._lock:
            if self.session or not self.masks:
                return
            roster = self.connection.secagg(SecAggCall("roster"))
            keys = {c: bytes.fromhex(k) for c, k in roster.keys.items()}
            if sorted(keys) != list(range(self.clients)) or keys[self.id] != self.public:
                raise MessageError(
                    f"client {self.id}: the server's roster does not hold this client's key "
                    f"or every one of the {self.clients} clients"
                )
            session = bytes.fromhex(roster.session)
            for peer, pub in keys.items():
                if peer == self.id:
                    continue
                self.mask_keys[peer] = secagg.pair_key(
                    self.key, pub, session, self.id, peer, secagg.MASK_PURPOSE
                )
                self.seal_keys[peer] = secagg.pair_key(
                    self.key, pub, session, self.id, peer, secagg.SEAL_PURPOSE
                )
            shares = shamir.split(_private_int(self.key), self.clients, self.threshold)
            sealed = {
                peer: secagg.seal(k, shamir.to_bytes(shares[peer]), session, self.id, peer).hex()
                for peer, k in self.seal_keys.items()
            }
            call = SecAggCall("shares", sealed=sealed)
            self.connection.secagg(call)
            self.setup_bytes = len(roster.to_bytes()) + len(call.to_bytes())
            self.session = session

    @property
    def public(self) -> bytes:
        return secagg.public_bytes(self.key)

    def mask(self, delta: Tensors, round: int, block: int) -> Tensors:
        """The delta encoded in fixed point and masked (int64 tensors holding uint64 bits)."""
        layout = secagg.layout_of({n: tuple(t.shape) for n, t in delta.items()})
        vector = self.encoding.encode(delta, layout)
        if self.masks:
            self.setup()
            vector = secagg.mask(vector, self.id, self.mask_keys, round, block)
        return secagg.as_wire(vector, layout)

    def reveal(self, round: int, sealed: dict[int, str]) -> SecAggCall:
        """Open the shares the server asks for: of clients it says dropped, never this one's."""
        if self.id in sealed:
            raise MessageError(f"client {self.id}: the server asked for its own share")
        shares = {}
        for gone, text in sorted(sealed.items()):
            if gone not in self.seal_keys:
                raise MessageError(f"client {self.id}: no client {gone} in the roster")
            try:
                share = secagg.open_sealed(
                    self.seal_keys[gone], bytes.fromhex(text), self.session, gone, self.id
                )
            except (InvalidTag, ValueError):
                raise MessageError(
                    f"client {self.id}: client {gone}'s sealed share does not open"
                ) from None
            shares[gone] = share.hex()
        log.info(
            "client %d: reveals its shares of clients %s (round %d)", self.id, sorted(sealed), round
        )
        return SecAggCall("reveal", round, shares=shares)


class Mask:
    """The client pipeline's masking stage (``SecureClient.mask``)."""

    name = "secagg mask"

    def __init__(self, secure: SecureClient) -> None:
        self.secure = secure

    def __call__(self, delta: Tensors, at) -> Tensors:
        return self.secure.mask(delta, at.round, at.block)


class SecureSum:
    """The server's side: keys, sealed shares, sums and recovery (its ``SecureRole`` holds the
    server's lock around every call)."""

    def __init__(
        self,
        settings: PrivacySettings,
        clients: int,
        client_clip_norm: float,
        shapes: Callable[[int], dict],
    ) -> None:
        self.encoding = secagg.Encoding(
            settings.secagg_range(client_clip_norm), settings.secagg_scale_bits
        )
        self.encoding.check(clients, RANGE_KEYS)
        self.clients, self.masks = clients, settings.secagg_masks
        self.threshold = settings.secagg_threshold
        self.shapes = shapes
        self.session = os.urandom(16)
        self.keys: dict[int, bytes] = {}  # client -> public key, from its join
        self.sealed: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> sealed share
        self.recovered: dict[int, bytes] = {}  # dropped client -> its private key (spent)
        self.asked: dict[int, tuple[frozenset[int], float]] = {}  # round -> (gone, since)
        self.revealed: dict[int, dict[int, dict[int, bytes]]] = {}  # round -> gone -> holder

    # -- the exchange ------------------------------------------------------------------------
    def register(self, client: int, key_hex: str) -> None:
        """A client's public key, from its join; a key cannot change once the exchange began."""
        if self.spent(client):
            raise Refused(
                "secagg_spent",
                f"client {client}'s secure-aggregation key was reconstructed after it dropped; "
                "it cannot take part again in this run",
            )
        if not key_hex:
            raise MessageError(f"client {client} sent no secure-aggregation key (secagg_key)")
        key = bytes.fromhex(key_hex)
        secagg.load_public(key)
        held = self.keys.get(client)
        if held is not None and held != key and self.sealed:
            raise MessageError(
                f"client {client} rejoins with another secure-aggregation key; keys are agreed "
                "once per run (a restarted client cannot rejoin a secure-aggregation run)"
            )
        self.keys[client] = key

    def roster(self) -> SecAggReply:
        return SecAggReply(self.session.hex(), {c: k.hex() for c, k in self.keys.items()})

    def post(self, client: int, sealed: dict[int, str]) -> None:
        """``client``'s sealed shares, one for every other client, sent once."""
        others = set(range(self.clients)) - {client}
        if set(sealed) != others:
            raise MessageError(
                f"client {client}: sealed shares for clients {sorted(sealed)[:8]}, expected one "
                f"for each of {sorted(others)[:8]}"
            )
        if client in self.sealed:
            raise MessageError(f"client {client} already sent its sealed shares")
        self.sealed[client] = {v: bytes.fromhex(h) for v, h in sealed.items()}

    def ready(self) -> bool:
        return len(self.sealed) == self.clients

    def spent(self, client: int) -> bool:
        return client in self.recovered or any(client in g for g, _ in self.asked.values())

    # -- dropouts ----------------------------------------------------------------------------
    def gone(self, contributors: set[int]) -> frozenset[int]:
        """Clients whose masks stay in the contributors' sum and whose key is not recovered."""
        if not self.masks:
            return frozenset()
        return frozenset(set(range(self.clients)) - contributors - set(self.recovered))

    def request(self, round: int, client: int) -> dict[int, str]:
        """What ``client`` must open for ``round``: its sealed shares of the dropped clients
        whose key is still missing ({} when none, or once it has answered)."""
        asked = self.asked.get(round)
        if asked is None or client in asked[0]:
            return {}
        done = self.revealed.get(round, {})
        return {
            g: self.sealed[g][client].hex()
            for g in sorted(asked[0])
            if g not in self.recovered and client not in done.get(g, {})
        }

    def reveal(self, round: int, client: int, shares: dict[int, str]) -> None:
        """``client``'s opened shares for ``round``; reconstruct every key that has t."""
        asked = self.asked.get(round)
        if asked is None or set(shares) - asked[0]:
            raise MessageError(
                f"client {client}: shares for clients {sorted(shares)[:8]} in round {round}, "
                "which the server did not ask for"
            )
        done = self.revealed.setdefault(round, {})
        for gone, text in shares.items():
            try:
                x, y = shamir.from_bytes(bytes.fromhex(text))
            except shamir.ShamirError as e:
                raise MessageError(f"client {client}: share of client {gone}: {e}") from None
            if x != client + 1:
                raise MessageError(f"client {client}: sent a share that is not its own")
            done.setdefault(gone, {})[client] = (x, y)
        for gone in sorted(asked[0]):
            held = list(done.get(gone, {}).values())
            if gone in self.recovered or len(held) < self.threshold:
                continue
            key = _key_of(shamir.combine(held, self.threshold))
            if secagg.public_bytes(key) != self.keys[gone]:
                raise MessageError(
                    f"the shares of client {gone} revealed in round {round} do not rebuild its key"
                )
            self.recovered[gone] = secagg.private_bytes(key)
            log.warning("secure aggregation: client %d's key recovered (round %d)", gone, round)

    def missing(self, round: int) -> list[int]:
        asked = self.asked.get(round)
        return [] if asked is None else sorted(asked[0] - set(self.recovered))

    # -- the sum -------------------------------------------------------------------------------
    def aggregate(self, updates: list[BlockUpdate], weights, trim_fraction=0.0, at=None) -> Tensors:
        """The pipeline's aggregator: the sum mod 2^64 of the masked updates, the dangling masks
        of recovered clients removed, decoded as the unweighted mean (float32)."""
        layout = secagg.layout_of(self.shapes(at.block))
        total = None
        for u in sorted(updates, key=lambda u: u.client):
            vector = secagg.from_wire(u.tensors, layout)
            total = vector.copy() if total is None else total.__iadd__(vector)
        contributors = {u.client for u in updates}
        for gone in sorted(set(range(self.clients)) - contributors) if self.masks else []:
            key = X25519PrivateKey.from_private_bytes(self.recovered[gone])
            pair = {
                s: secagg.pair_key(key, self.keys[s], self.session, gone, s, secagg.MASK_PURPOSE)
                for s in contributors
            }
            total -= secagg.dangling(
                sorted(contributors), gone, pair, at.round, at.block, len(total)
            )
        return self.encoding.decode(total, len(updates), layout)
