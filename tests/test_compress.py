"""link.compression: codec error bounds, error feedback, the server's checks of compressed
payloads, and federations that end with every client bit-equal to the server on fewer bytes."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.backends.local import run_local
from parablock.config import ConfigError
from parablock.core.aggregation import KEEP_AGGREGATES
from parablock.core.server import Server
from parablock.model.blocks import block_state, model_blocks
from parablock.run.rundir import _free
from parablock.run.runner import prepare
from parablock.wire.compress import CODECS, SCALE, ErrorFeedback
from parablock.wire.messages import BlockUpdate, BlockValue, MessageError, encode


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 10, generator=g) * 1e-3,
        "b": torch.randn(10, generator=g) * 1e-2,
        "zero": torch.zeros(3, 4),
    }


def _shapes(tensors):
    return {n: tuple(t.shape) for n, t in tensors.items()}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- codecs ------------------------------------------------------------------------------------
def test_codecs_round_trip_within_their_error_bounds_and_shrink_the_bytes():
    x = _delta()
    none = CODECS.get("none")
    back = none.decode(none.encode(x), _shapes(x))
    assert all(torch.equal(back[n], x[n]) for n in x)

    bf16 = CODECS.get("bf16")
    wire = bf16.encode(x)
    back = bf16.decode(wire, _shapes(x))
    assert {t.dtype for t in wire.values()} == {torch.bfloat16}
    assert _nbytes(wire) * 2 == _nbytes(x)
    for n in x:  # bf16 keeps 8 significant bits: relative error at most 2^-9 (round to nearest)
        assert back[n].dtype == torch.float32
        assert ((back[n] - x[n]).abs() <= x[n].abs() * 2**-8).all(), n

    int8 = CODECS.get("int8")
    wire = int8.encode(x)
    back = int8.decode(wire, _shapes(x))
    assert wire["w"].dtype == torch.int8 and wire["w" + SCALE].shape == (6,)  # one per row
    assert wire["b" + SCALE].shape == (1,)  # 1-D: one scale for the tensor
    # a byte per value and four per row: about a quarter of float32 for any real block
    assert _nbytes(wire) == sum(t.numel() for t in x.values()) + 4 * (6 + 1 + 3)
    for n in ("w", "b"):
        rows = x[n].reshape(wire[n + SCALE].shape[0], -1)
        half_step = (rows.abs().amax(1) / 127 / 2)[:, None] * (1 + 1e-5)
        err = (back[n] - x[n]).reshape(rows.shape).abs()
        assert (err <= half_step).all(), n
        assert (err > 0).any()  # lossy: the test would notice a codec that sent floats
    assert torch.equal(back["zero"], x["zero"]) and torch.equal(
        wire["zero" + SCALE], torch.zeros(3)
    )


def test_int4_packs_two_values_a_byte_with_a_scale_per_64_and_rounds_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    x = {
        "w": torch.randn(5, 100, generator=g) * 1e-3,  # 500 values: 8 groups, the last short
        "b": torch.randn(64, generator=g),
        "zero": torch.zeros(3, 4),
        "one": torch.tensor(-2.0),
    }
    int4 = CODECS.get("int4")
    wire = int4.encode(x)
    back = int4.decode(wire, _shapes(x))
    assert wire["w"].dtype == torch.uint8 and wire["w"].shape == (8 * 32,)
    assert wire["w" + SCALE].shape == (8,) and wire["b" + SCALE].shape == (1,)
    # 32 bytes of nibbles and 4 of scale per 64 values: 0.5625 bytes a value
    assert _nbytes({n: wire[n] for n in ("b", "b" + SCALE)}) == 64 * 0.5625
    assert _nbytes(wire) == (8 + 1 + 1 + 1) * 36
    for n in ("w", "b"):
        flat = torch.cat([x[n].reshape(-1), torch.zeros(-x[n].numel() % 64)]).reshape(-1, 64)
        half_step = (flat.abs().amax(1) / 7 / 2)[:, None] * (1 + 1e-5)
        err = torch.cat([(back[n] - x[n]).reshape(-1), torch.zeros(-x[n].numel() % 64)])
        assert (err.reshape(-1, 64).abs() <= half_step).all(), n
        assert (err.abs() > 0).any()
        assert back[n].dtype == torch.float32 and back[n].shape == x[n].shape
    assert torch.equal(back["zero"], x["zero"]) and torch.equal(back["one"], x["one"])
    # refused on decode: nibble 0 (-8), non-zero padding, bad scales, another layout
    bad = {
        "nibble 0": {**wire, "b": torch.zeros(32, dtype=torch.uint8)},
        "padding": {**wire, "one": torch.full((32,), 0x11, dtype=torch.uint8)},
        "nan scale": {**wire, "w" + SCALE: torch.full((8,), float("nan"))},
        "negative scale": {**wire, "b" + SCALE: torch.tensor([-1.0])},
        "int8 values": {**wire, "b": torch.zeros(32, dtype=torch.int8)},
        "too short": {**wire, "w": wire["w"][:-1]},
    }
    for what, w in bad.items():
        with pytest.raises(MessageError):
            int4.decode(w, _shapes(x))
            pytest.fail(f"{what} was accepted")


def test_int4_error_feedback_keeps_what_quantisation_dropped_as_the_blocks_residual():
    step = torch.tensor([1.0] + [0.02] * 63)  # 0.02 < half an int4 step (1/7/2): rounds to 0
    codec = CODECS.get("int4")
    fb = ErrorFeedback(codec)
    sent, true = torch.zeros(64), torch.zeros(64)
    for t in range(40):
        delta = {"w": step * (1 + 0.01 * t)}
        true += delta["w"]
        got = codec.decode(fb.encode(3, delta), {"w": (64,)})["w"]
        sent += got
        torch.testing.assert_close(true - sent, fb.residuals[3]["w"], rtol=0, atol=1e-5)
        assert (fb.residuals[3]["w"].abs() <= 1.5 / 7 / 2 + 1e-6).all()
    assert (codec.decode(codec.encode({"w": step}), {"w": (64,)})["w"][1:] == 0).all()
    assert (true - sent).abs().max() < 0.11  # without feedback 0.02 x 40 = 0.8 would be lost


def test_error_feedback_carries_what_quantisation_dropped_into_the_next_round():
    """A delta whose small entries int8 rounds to zero every round: without feedback they are
    lost for good; with it the sum of what crossed tracks the sum of the true deltas."""
    step = torch.tensor([[1.0] + [0.003] * 9])  # 0.003 < half a step (1/127/2): rounds to 0
    codec = CODECS.get("int8")
    fb = ErrorFeedback(codec)
    sent_with, sent_without, true = torch.zeros_like(step), torch.zeros_like(step), 0
    for t in range(50):
        delta = {"w": step * (1 + 0.01 * t)}
        true = true + delta["w"]
        sent_with += codec.decode(fb.encode(7, delta), {"w": (1, 10)})["w"]
        sent_without += codec.decode(codec.encode(delta), {"w": (1, 10)})["w"]
        # the gap is exactly the residual kept for the block, bounded by one round's error
        torch.testing.assert_close(true - sent_with, fb.residuals[7]["w"], rtol=0, atol=1e-5)
        assert (fb.residuals[7]["w"].abs() <= 1.5 / 127 / 2 + 1e-6).all()
    assert (sent_without[0, 1:] == 0).all()  # never sent: the error grew with every round
    assert (true - sent_without).abs().max() > 0.1
    assert (true - sent_with).abs().max() < 0.01
    assert set(fb.residuals) == {7}  # per block


def test_decode_refuses_anything_but_the_codecs_own_layout():
    x = _delta()
    int8 = CODECS.get("int8")
    good = int8.encode(x)
    bad = {
        "missing scale": {n: t for n, t in good.items() if n != "w" + SCALE},
        "float values": {**good, "w": good["w"].float()},
        "nan scale": {**good, "w" + SCALE: torch.full((6,), float("nan"))},
        "inf scale": {**good, "w" + SCALE: torch.full((6,), float("inf"))},
        "negative scale": {**good, "w" + SCALE: -good["w" + SCALE]},
        "scale per tensor": {**good, "w" + SCALE: good["w" + SCALE][:1]},
        "-128": {**good, "w": torch.full((6, 10), -128, dtype=torch.int8)},
        "extra": {**good, "x": torch.zeros(1)},
    }
    for what, wire in bad.items():
        with pytest.raises(MessageError):
            int8.decode(wire, _shapes(x))
            pytest.fail(f"{what} was accepted")
    bf16 = CODECS.get("bf16")
    inf = {**bf16.encode(x), "b": torch.full((10,), float("inf"), dtype=torch.bfloat16)}
    with pytest.raises(MessageError, match="not finite"):
        bf16.decode(inf, _shapes(x))


def test_compression_is_a_checked_setting_that_a_resume_cannot_change(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="link.compression='zip'.*valid: bf16, int4, int8, none"):
        tiny_config(tiny_model_dir, str(tmp_path), link={"compression": "zip"})
    assert not _free("link.compression") and _free("link.up_mbps")


def test_a_compressed_change_round_trips_as_a_block_value_and_a_whole_value_is_unchanged():
    wire = CODECS.get("int8").encode(_delta())
    v = BlockValue.deserialize(BlockValue(2, 5, wire, base_version=1).serialize())
    assert (v.block, v.version, v.base_version) == (2, 5, 1)
    assert all(torch.equal(v.tensors[n], wire[n]) for n in wire)
    whole = BlockValue(2, 5, _delta())
    assert whole.meta() == {"block": 2, "version": 5}  # no new field on the wire without it
    assert BlockValue.deserialize(whole.serialize()).base_version is None
    with pytest.raises(MessageError, match="base version"):
        BlockValue(2, 5, wire, base_version=5)


# -- the server --------------------------------------------------------------------------------
def _server(compression: str, **kw):
    model = make_model(vocab=64, layers=3)
    blocks = model_blocks(model)
    return Server(model, blocks, [1, 2, 1, 2, 1, 2], clients=2, compression=compression, **kw)


def _block_delta(server, b: int, scale: float = 1e-3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = block_state(server.model, server.blocks[b])
    return {n: torch.randn(t.shape, generator=g) * scale for n, t in state.items()}


def _send_wire(server, client, round, block, wire, base=-1):
    meta = BlockUpdate(client, round, block, base, 1, 0.5, {"x": torch.zeros(1)}).meta()
    return server.receive_update(b"".join(encode("BlockUpdate", meta, wire)), client)


def test_the_server_rejects_malformed_compressed_updates_and_never_applies_them():
    server = _server("int8", min_clients=1)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    good = CODECS.get("int8").encode(_block_delta(server, 1))
    name = sorted(n for n in good if not n.endswith(SCALE))[0]
    rows = good[name + SCALE].shape[0]
    bad = {
        "float32 values": {**good, name: good[name].float()},
        "missing scale": {n: t for n, t in good.items() if n != name + SCALE},
        "nan scale": {**good, name + SCALE: torch.full((rows,), float("nan"))},
        "inf scale": {**good, name + SCALE: torch.full((rows,), float("inf"))},
        "negative scale": {**good, name + SCALE: torch.full((rows,), -1.0)},
        "wrong scale shape": {**good, name + SCALE: torch.ones(rows + 1)},
        "wrong value shape": {**good, name: good[name].flatten()},
        "-128": {**good, name: torch.full_like(good[name], -128)},
        "decodes to inf": {**good, name + SCALE: torch.full((rows,), 3e38)},
        "uncompressed": _block_delta(server, 1),
    }
    for i, (what, wire) in enumerate(bad.items()):
        ok, reason = _send_wire(server, i % 2, 0, 1, wire)
        assert not ok, what
    assert len(server.stats.rejected) == len(bad)
    assert server.next_round == 0 and server.versions[1] == -1
    for n, p in server.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    bf16 = _server("bf16", min_clients=1)
    wire = CODECS.get("bf16").encode(_block_delta(bf16, 1))
    nan = {**wire, name: torch.full_like(wire[name], float("nan"))}
    assert not _send_wire(bf16, 0, 0, 1, nan)[0]
    assert not _send_wire(bf16, 0, 0, 1, _block_delta(bf16, 1))[0]  # float32 to a bf16 server
    assert len(bf16.stats.rejected) == 2


def test_the_server_applies_the_decoded_aggregate_and_sends_it_compressed_to_a_matching_base():
    server = _server("int8")
    codec = CODECS.get("int8")
    base = block_state(server.model, server.blocks[1])
    deltas = [_block_delta(server, 1, seed=s) for s in (1, 2)]
    for c, d in enumerate(deltas):
        assert _send_wire(server, c, 0, 1, codec.encode(d))[0]
    assert server.versions[1] == 0
    change = server.block_value(1, 0, base=-1)
    assert change.base_version == -1 and change.tensors.keys() == codec.encode(base).keys()
    # applied with the clients' formula to the same base: the server's value, bit for bit
    decoded = codec.decode(change.tensors, _shapes(base))
    now = block_state(server.model, server.blocks[1])
    assert all(torch.equal(base[n] + 1.0 * decoded[n], now[n]) for n in base)
    # and close to the true mean of the decoded updates (what was dropped is kept for later)
    mean = {n: sum(codec.decode(codec.encode(d), _shapes(d))[n] for d in deltas) / 2 for n in base}
    residual = server.feedback.residuals[1]
    assert all(torch.allclose(decoded[n] + residual[n], mean[n], atol=1e-7) for n in base)
    # a client holding another version (or none: a join) gets the whole value
    for other in (None, 3):
        whole = server.block_value(1, 0, base=other)
        assert whole.base_version is None and all(
            torch.equal(whole.tensors[n], now[n]) for n in now
        )
    # the compressed aggregates are kept as long as the whole ones
    for r in range(1, KEEP_AGGREGATES + 1):
        b, v = server.plan[r], server.versions[server.plan[r]]
        for c in (0, 1):
            assert _send_wire(server, c, r, b, codec.encode(_block_delta(server, b)), base=v)[0]
    with pytest.raises(MessageError, match="no longer held"):
        server.block_value(1, 0, base=-1)
    r = KEEP_AGGREGATES
    assert server.block_value(server.plan[r], r, base=r - 2).base_version == r - 2


# -- whole federations -------------------------------------------------------------------------
def _federate(cfg):
    fed = prepare(cfg)
    clients = {}

    def hook(client, t):
        clients[client.id] = client

    logs = run_local(fed.placements, fed.server, threads=1, on_barrier=hook)
    return fed, [clients[i] for i in sorted(clients)], logs


def _bytes(logs) -> tuple[int, int]:
    return (
        sum(r.bytes_up for lg in logs for r in lg.rounds),
        sum(r.bytes_down for lg in logs for r in lg.rounds),
    )


@pytest.mark.parametrize("algorithm", ["parablock", "fedbcd"])
def test_compressed_federations_end_with_every_client_equal_to_the_server_on_fewer_bytes(
    tiny_model_dir, tmp_path, algorithm
):
    results = {}
    for compression in ("none", "bf16", "int8", "int4"):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / compression),
            federation={"algorithm": algorithm, "rounds": 5, "server_lr": 0.7},
            link={"compression": compression},
        )
        fed, clients, logs = _federate(cfg)
        glob = dict(fed.model.named_parameters())
        assert len(clients) == 2
        for c in clients:
            for n, p in c.model.named_parameters():
                assert torch.equal(p, glob[n]), (compression, c.id, n)
        assert fed.server.stats.accepted == 2 * 5 and len(fed.server.stats.rejected) == 0
        results[compression] = (_bytes(logs), {n: p.detach().clone() for n, p in glob.items()})
    (up0, down0), none_model = results["none"]
    (up1, down1), bf16_model = results["bf16"]
    (up2, down2), int8_model = results["int8"]
    (up3, down3), int4_model = results["int4"]
    assert up3 < up2 < up1 < up0 and down3 < down2 < down1 < down0
    assert up2 < 0.3 * up0 and down2 < 0.3 * down0
    assert up3 < 0.2 * up0 and down3 < 0.2 * down0  # 0.14 of the values, plus the headers
    # lossy, but the same training: the models differ from none's and stay close to it
    for lossy in (int8_model, int4_model):
        drift = max((lossy[n] - none_model[n]).abs().max().item() for n in none_model)
        assert 0 < drift < 1e-2


def test_faulty_compressed_uploads_are_rejected_and_the_run_ends_equal(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path),
        federation={"rounds": 4, "min_clients": 1},
        link={"compression": "int8"},
        run={"faults": "nan@0:1,shape@1:2"},
    )
    fed, clients, _ = _federate(cfg)
    assert len(fed.server.stats.rejected) == 2
    reasons = " ".join(fed.server.stats.rejected.recent)
    assert "NaN or Inf" in reasons and "do not match" in reasons
    glob = dict(fed.model.named_parameters())
    for c in clients:
        assert all(torch.equal(p, glob[n]) for n, p in c.model.named_parameters())
