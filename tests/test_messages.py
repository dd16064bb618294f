"""Typed messages: round trips, corruption detection, and no aliasing across the link."""

from __future__ import annotations

import pytest
import torch

from parablock.transport.link import Link, LinkSpec
from parablock.wire.messages import BlockUpdate, BlockValue, MessageError


def _update(**kw) -> BlockUpdate:
    args = dict(
        client=1,
        round=3,
        block=2,
        base_version=-1,
        num_examples=8,
        train_loss=1.5,
        tensors={"w": torch.randn(4, 3), "b": torch.randn(3)},
    )
    args.update(kw)
    return BlockUpdate(**args)


def test_block_update_round_trip():
    u = _update()
    v = BlockUpdate.deserialize(u.serialize())
    assert (v.client, v.round, v.block, v.base_version, v.num_examples, v.train_loss) == (
        1,
        3,
        2,
        -1,
        8,
        1.5,
    )
    for n in u.tensors:
        assert torch.equal(u.tensors[n], v.tensors[n])
        assert v.tensors[n].data_ptr() != u.tensors[n].data_ptr()


def test_block_value_round_trip_through_a_link_does_not_alias():
    t = {"w": torch.randn(16, 16)}
    val = BlockValue(block=0, version=4, tensors=t)
    got = BlockValue.deserialize(Link(LinkSpec(float("inf"))).transmit(val.serialize()))
    assert got.version == 4 and torch.equal(got.tensors["w"], t["w"])
    got.tensors["w"].add_(1.0)
    assert not torch.equal(got.tensors["w"], t["w"])  # the sender's tensor is untouched


def test_corrupt_and_truncated_payloads_are_rejected():
    payload = bytearray(_update().serialize())
    payload[-3] ^= 0xFF  # flip bits in tensor data
    with pytest.raises(MessageError, match="checksum"):
        BlockUpdate.deserialize(bytes(payload))
    with pytest.raises(MessageError):
        BlockUpdate.deserialize(_update().serialize()[:40])
    with pytest.raises(MessageError, match="wrong message kind"):
        BlockUpdate.deserialize(BlockValue(0, 1, {"w": torch.ones(2)}).serialize())


def test_invalid_messages_fail_on_construction():
    with pytest.raises(MessageError, match="NaN or Inf"):
        _update(tensors={"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(MessageError, match="num_examples"):
        _update(num_examples=0)
    with pytest.raises(MessageError, match="no tensors"):
        _update(tensors={})
