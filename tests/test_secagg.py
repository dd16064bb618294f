"""Secure aggregation's arithmetic: Shamir sharing over GF(2^521 - 1), the fixed-point encoding
and its overflow rule, pairwise masks that cancel exactly mod 2^64, dangling masks removed with a
recovered key, and shares sealed so that only their receiver can open them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from parablock.core import secagg, shamir
from parablock.errors import ConfigError

SESSION = b"s" * 16


def test_shamir_round_trip_any_threshold_subset():
    secret = int.from_bytes(secagg.private_bytes(secagg.new_key()), "big")
    shares = shamir.split(secret, 5, 3)
    assert len({x for x, _ in shares}) == 5
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert shamir.combine([shares[i] for i in subset], 3) == secret
    again = [shamir.from_bytes(shamir.to_bytes(s)) for s in shares]
    assert again == shares


def test_shamir_below_threshold_refused_and_uninformative():
    shares = shamir.split(12345, 5, 3)
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.combine(shares[:2], 3)
    # two shares interpolated as if they were enough give something else than the secret
    assert shamir.combine(shares[:2], 2) != 12345
    with pytest.raises(shamir.ShamirError, match="distinct"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(shamir.ShamirError):
        shamir.split(shamir.PRIME, 3, 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split(1, 3, 4)


def _layout():
    return secagg.layout_of({"a": (3, 4), "b": (5,)})


def _delta(seed: int, scale: float = 1e-3):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn((3, 4), generator=g) * scale,
        "b": torch.randn((5,), generator=g) * scale,
    }


def test_encoding_round_trip_and_clamp():
    enc = secagg.Encoding(1.0, 32)
    d = _delta(0)
    back = enc.decode(enc.encode(d, _layout()), 1, _layout())
    for n in d:
        assert back[n].dtype == torch.float32
        assert torch.allclose(back[n], d[n], atol=2.0**-32)
    # a coordinate beyond R is clamped to R: one client cannot add more than that
    big = {"a": torch.full((3, 4), 7.0), "b": torch.full((5,), -7.0)}
    back = enc.decode(enc.encode(big, _layout()), 1, _layout())
    assert torch.equal(back["a"], torch.ones(3, 4)) and torch.equal(back["b"], -torch.ones(5))


def test_overflow_rule():
    enc = secagg.Encoding(1.0, 40)
    assert enc.fits(2**22) and not enc.fits(2**23)
    enc.check(1024, "privacy.secagg_scale_bits")
    with pytest.raises(ConfigError, match="privacy.secagg_scale_bits"):
        secagg.Encoding(1.0, 60).check(8, "privacy.secagg_scale_bits")
    # the worst case at the limit still decodes: n clients all at +R, and all at -R
    n = (secagg.SIGNED_LIMIT - 1) // enc.largest
    assert enc.fits(n) and not enc.fits(n + 1)
    one = np.full(4, enc.largest, dtype=np.int64).view(np.uint64)
    total = one * np.uint64(n)
    assert (total.view(np.int64) == n * enc.largest).all()
    assert ((-total).view(np.int64) == -n * enc.largest).all()


def _clients(n: int):
    keys = [secagg.new_key() for _ in range(n)]
    pub = [secagg.public_bytes(k) for k in keys]
    pair = secagg.all_mask_keys(keys, SESSION)
    return keys, pub, pair


def test_masks_cancel_exactly_and_hide_each_update():
    n, enc, layout = 4, secagg.Encoding(1.0, 32), _layout()
    _, _, pair = _clients(n)
    assert pair[0][1] == pair[1][0] and pair[0][1] != pair[0][2]  # both ends derive one key
    plain = [enc.encode(_delta(i), layout) for i in range(n)]
    masked = [secagg.mask(plain[u], u, pair[u], 3, 1) for u in range(n)]
    for p, m in zip(plain, masked, strict=True):
        assert not np.array_equal(p, m)
        assert (p == m).mean() < 0.01  # every coordinate is hidden, not just some
    total = np.zeros_like(plain[0])
    for m in masked:
        total += m
    expect = np.zeros_like(plain[0])
    for p in plain:
        expect += p
    assert np.array_equal(total, expect)  # exactly, mod 2^64
    mean = enc.decode(total, n, layout)
    for name in mean:
        ref = torch.stack([_delta(i)[name] for i in range(n)]).double().mean(0).float()
        assert torch.allclose(mean[name], ref, atol=1e-9)
    # another round or block: other masks
    assert not np.array_equal(secagg.mask(plain[0], 0, pair[0], 4, 1), masked[0])
    assert not np.array_equal(secagg.mask(plain[0], 0, pair[0], 3, 2), masked[0])


def test_dangling_masks_of_a_dropped_client_removed_with_its_key():
    n, enc, layout = 4, secagg.Encoding(1.0, 32), _layout()
    keys, pub, pair = _clients(n)
    plain = [enc.encode(_delta(i), layout) for i in range(n)]
    gone, survivors = 1, [0, 2, 3]
    total = np.zeros_like(plain[0])
    for u in survivors:
        total += secagg.mask(plain[u], u, pair[u], 0, 0)
    # the server, holding the recovered key of client 1, derives its pair keys with each survivor
    recovered = secagg.pair_key
    server_keys = {
        s: recovered(keys[gone], pub[s], SESSION, gone, s, secagg.MASK_PURPOSE) for s in survivors
    }
    total -= secagg.dangling(survivors, gone, server_keys, 0, 0, len(total))
    expect = np.zeros_like(total)
    for u in survivors:
        expect += plain[u]
    assert np.array_equal(total, expect)


def test_sealed_share_opens_only_for_its_receiver():
    keys, pub, _ = _clients(3)
    k01 = secagg.pair_key(keys[0], pub[1], SESSION, 0, 1, secagg.SEAL_PURPOSE)
    k10 = secagg.pair_key(keys[1], pub[0], SESSION, 1, 0, secagg.SEAL_PURPOSE)
    k20 = secagg.pair_key(keys[2], pub[0], SESSION, 2, 0, secagg.SEAL_PURPOSE)
    mask_key = secagg.pair_key(keys[0], pub[1], SESSION, 0, 1, secagg.MASK_PURPOSE)
    assert k01 == k10 and mask_key != k01  # purposes are separate keys
    share = shamir.to_bytes(shamir.split(99, 3, 2)[1])
    sealed = secagg.seal(k01, share, SESSION, 0, 1)
    assert share not in sealed and share[2:20] not in sealed
    assert secagg.open_sealed(k10, sealed, SESSION, 0, 1) == share
    with pytest.raises(InvalidTag):  # another client's key
        secagg.open_sealed(k20, sealed, SESSION, 0, 1)
    with pytest.raises(InvalidTag):  # the right key, told it is for someone else
        secagg.open_sealed(k10, sealed, SESSION, 0, 2)
    with pytest.raises(InvalidTag):  # another session
        secagg.open_sealed(k10, sealed, b"t" * 16, 0, 1)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(InvalidTag):
        secagg.open_sealed(k10, tampered, SESSION, 0, 1)
