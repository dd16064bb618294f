"""Secure aggregation in the run: configurations it cannot keep are refused in one line, the
server holds only masked updates and sums them exactly, dropouts before and after an upload are
recovered from the survivors' shares, a round below the threshold fails with the model
unchanged, and runs with masks on and off end bit for bit equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from parablock.core import secagg
from parablock.errors import ConfigError
from parablock.run.settings import privacy_settings

SECURE = {"secure_aggregation": True, "mode": "client", "noise_multiplier": 0.0}
FED = {"aggregator": "mean", "update_bound": False, "clients": 4}


def _cfg(tmp_path, privacy=None, federation=None, **sections):
    return tiny_config(
        str(tmp_path),
        str(tmp_path / "out"),
        privacy={**SECURE, **(privacy or {})},
        federation={**FED, **(federation or {})},
        **sections,
    )


def test_a_valid_secure_configuration_reaches_the_clients(tmp_path):
    cfg = _cfg(tmp_path)
    s = privacy_settings(cfg)
    assert s.secure_aggregation and s.secagg_masks and s.secagg_threshold == 3
    assert s.secagg_range(0.0) == 1.0  # privacy.clip_norm
    s = privacy_settings(_cfg(tmp_path, {"mode": "none"}, {"client_clip_norm": 0.5}))
    assert s.secure_aggregation and not s.private and s.secagg_range(0.5) == 0.5


@pytest.mark.parametrize(
    ("privacy", "federation", "sections", "names"),
    [
        ({"mode": "none"}, {}, {}, "federation.client_clip_norm"),
        ({}, {"aggregator": "weighted_mean"}, {}, "federation.aggregator=mean"),
        ({}, {"aggregator": "median"}, {}, "federation.aggregator=median"),
        ({}, {"update_bound": True}, {}, "federation.update_bound=false"),
        ({}, {"max_update_norm": 2.0}, {}, "federation.max_update_norm=2"),
        ({}, {}, {"link": {"compression": "int8"}}, "link.compression=none"),
        ({}, {"clients": 1}, {}, "at least 2 clients"),
        ({}, {"algorithm": "cyclic", "rounds": 8}, {}, "federation.algorithm=cyclic"),
        ({"secagg_threshold": 2}, {}, {}, "privacy.secagg_threshold=2 must be within 3..4"),
        ({"secagg_threshold": 5}, {}, {}, "privacy.secagg_threshold=5"),
        ({}, {"min_clients": 2}, {}, "federation.min_clients=2 is below"),
        ({"secagg_scale_bits": 56, "clip_norm": 1000.0}, {}, {}, "could overflow"),
    ],
)
def test_what_secure_aggregation_cannot_keep_is_refused(
    tmp_path, privacy, federation, sections, names
):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(".", r"\.")) as e:
        _cfg(tmp_path, privacy, federation, **sections)
    assert "\n" not in str(e.value)


def _run_cfg(model_dir, out, masks=True, **over):
    privacy = {**SECURE, "secagg_masks": masks, **over.pop("privacy", {})}
    federation = {**FED, "clients": 3, "rounds": 3, **over.pop("federation", {})}
    return tiny_config(
        model_dir,
        str(out),
        privacy=privacy,
        federation=federation,
        eval={"accuracy_size": 0},
        **over,
    )


def test_masks_on_and_off_end_bit_equal_locally(tiny_model_dir, tmp_path):
    from parablock.run.runner import run

    on = run(_run_cfg(tiny_model_dir, tmp_path / "on"))
    off = run(_run_cfg(tiny_model_dir, tmp_path / "off", masks=False))
    assert on["final_model_fingerprint"] == off["final_model_fingerprint"]


class _Spy:
    """Every unmasked encoding the clients made, every update the server held, every sum."""

    def __init__(self, monkeypatch):
        from parablock.core import secure
        from parablock.core.server import Server

        self.encoded, self.held, self.sums = {}, [], {}
        mask, submit, aggregate = (
            secure.SecureClient.mask,
            Server.submit,
            secure.SecureSum.aggregate,
        )
        spy = self

        def mask_spy(self, delta, round, block):
            layout = secagg.layout_of({n: tuple(t.shape) for n, t in delta.items()})
            spy.encoded[self.id, round] = self.encoding.encode(delta, layout)
            return mask(self, delta, round, block)

        def submit_spy(self, update, client):
            spy.held.append(update)
            return submit(self, update, client)

        def aggregate_spy(self, updates, weights, trim_fraction=0.0, at=None):
            out = aggregate(self, updates, weights, trim_fraction, at)
            spy.sums[at.round] = (sorted(u.client for u in updates), out)
            return out

        monkeypatch.setattr(secure.SecureClient, "mask", mask_spy)
        monkeypatch.setattr(Server, "submit", submit_spy)
        monkeypatch.setattr(secure.SecureSum, "aggregate", aggregate_spy)

    def expected_mean(self, round, clients, encoding, layout):
        total = np.zeros_like(self.encoded[clients[0], round])
        for c in clients:
            total += self.encoded[c, round]
        return encoding.decode(total, len(clients), layout)


def test_the_server_never_holds_an_unmasked_update(tiny_model_dir, tmp_path, monkeypatch):
    from parablock.run.runner import run

    spy = _Spy(monkeypatch)
    run(_run_cfg(tiny_model_dir, tmp_path / "on"))
    assert len(spy.held) == 3 * 3  # every client, every round (the drain included)
    for u in spy.held:
        layout = secagg.layout_of({n: tuple(t.shape) for n, t in u.tensors.items()})
        held = secagg.from_wire(u.tensors, layout)
        for plain in spy.encoded.values():
            assert (held == plain).mean() < 0.01
    # the same spy sees the clear encodings when masks are off: the check can fail
    spy.held.clear()
    run(_run_cfg(tiny_model_dir, tmp_path / "off", masks=False))
    u = spy.held[0]
    layout = secagg.layout_of({n: tuple(t.shape) for n, t in u.tensors.items()})
    assert np.array_equal(secagg.from_wire(u.tensors, layout), spy.encoded[u.client, u.round])


def test_clients_vanishing_before_and_after_their_upload(tiny_model_dir, tmp_path, monkeypatch):
    from parablock.run.runner import run

    spy = _Spy(monkeypatch)
    cfg = _run_cfg(
        tiny_model_dir,
        tmp_path,
        federation={"clients": 5, "rounds": 4, "min_clients": 3, "round_timeout_s": 2.0},
        run={"faults": "vanish@0:1,vanish_after@1:1", "checkpoint": False},
    )
    summary = run(cfg)
    assert [spy.sums[r][0] for r in range(4)] == [
        [0, 1, 2, 3, 4],
        [1, 2, 3, 4],  # client 0 vanished before its upload: its masks recovered
        [2, 3, 4],  # client 1 after its upload: in round 1's sum, recovered in round 2
        [2, 3, 4],  # both keys known now: no reveal, no extra round trip
    ]
    encoding = secagg.Encoding(1.0, 32)
    for r in range(4):
        clients, got = spy.sums[r]
        layout = secagg.layout_of({n: tuple(t.shape) for n, t in got.items()})
        want = spy.expected_mean(r, clients, encoding, layout)
        for n in got:
            assert torch.equal(got[n], want[n])
    assert summary["rounds"] == 4


def _server_and_clients(model_dir, tmp_path, n=4, timeout=1.0):
    """A real server of a secure run and n key-holding clients, joined and set up."""
    import threading

    from parablock.core.secure import SecureClient
    from parablock.run.build import prepare
    from parablock.transport.inprocess import InProcessConnection
    from parablock.wire.protocol import PROTOCOL, JoinRequest

    cfg = _run_cfg(
        model_dir,
        tmp_path,
        federation={"clients": n, "min_clients": 3, "round_timeout_s": timeout},
    )
    server = prepare(cfg).server
    clients = []
    for c in range(n):
        key = secagg.new_key()
        sc = SecureClient(c, key, server.settings.privacy, n)
        sc.connection = InProcessConnection(server, c)
        server.join(JoinRequest(PROTOCOL, c, "", secagg_key=sc.public.hex()), c)
        clients.append(sc)
    threads = [threading.Thread(target=sc.setup) for sc in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return server, clients


def _masked_update(server, sc, round, seed):
    from parablock.wire.messages import BlockUpdate

    block = server.plan[round]
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in server._shapes(block).items()}
    tensors = sc.mask(delta, round, block)
    return BlockUpdate(sc.id, round, block, server.versions[block], 4, 0.0, tensors)


def test_shares_below_the_threshold_fail_the_round_and_leave_the_model(tiny_model_dir, tmp_path):
    from parablock.errors import MessageError, RoundFailedError
    from parablock.model.blocks import block_state
    from parablock.wire.protocol import PROTOCOL, JoinRequest

    server, clients = _server_and_clients(tiny_model_dir, tmp_path)
    block = server.blocks[server.plan[0]]
    before = {n: t.clone() for n, t in block_state(server.model, block).items()}
    for sc in clients[:3]:
        assert server.submit(_masked_update(server, sc, 0, sc.id), sc.id) == (True, "accepted")
    server.drop_client(3, "vanished before its upload")
    ask = server.wait_aggregate(0, client=0)
    assert sorted(ask.reveal) == [3]  # only the dropped client's share, never a survivor's
    with pytest.raises(MessageError, match="own share"):
        clients[3].reveal(0, {3: ask.reveal[3]})
    server.secagg(clients[0].reveal(0, ask.reveal), 0)  # one share of three: not enough
    with pytest.raises(RoundFailedError, match="privacy.secagg_threshold=3"):
        server.wait_aggregate(0, timeout=1.0)  # clients 1 and 2 never answer
    after = block_state(server.model, block)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert server.versions[block.index] == -1 and server.next_round == 0
    with pytest.raises(MessageError, match="cannot take part again"):  # its key is spent
        server.join(JoinRequest(PROTOCOL, 3, "", secagg_key=clients[3].public.hex()), 3)


def test_reveals_recover_the_sum_exactly(tiny_model_dir, tmp_path):
    import threading

    from parablock.model.blocks import block_state

    server, clients = _server_and_clients(tiny_model_dir, tmp_path, timeout=30.0)
    base = block_state(server.model, server.blocks[server.plan[0]])
    base = {n: t.clone() for n, t in base.items()}
    updates = [_masked_update(server, sc, 0, 10 + sc.id) for sc in clients]
    for u in updates[1:]:
        server.submit(u, u.client)
    server.drop_client(0, "vanished before its upload")

    def survivor(sc):
        ready = sc.connection.wait_aggregate(0)
        while ready.reveal:
            sc.connection.secagg(sc.reveal(0, ready.reveal))
            ready = sc.connection.wait_aggregate(0)

    threads = [threading.Thread(target=survivor, args=(sc,)) for sc in clients[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert server.next_round == 1 and server.stats.participants[0] == [1, 2, 3]
    # the aggregate applied equals the mean of the three clients' clear encodings
    enc, block = clients[0].encoding, server.plan[0]
    layout = secagg.layout_of(server._shapes(block))
    total = np.zeros(sum(int(np.prod(s)) for _, s in layout), dtype=np.uint64)
    for sc in clients[1:]:
        g = torch.Generator().manual_seed(10 + sc.id)
        delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in server._shapes(block).items()}
        total += enc.encode(delta, layout)
    want = enc.decode(total, 3, layout)
    got = server._aggregates[0].tensors  # the new block value: the base plus the mean
    assert server.secure.recovered.keys() == {0}
    for n in want:
        assert torch.equal(got[n], base[n] + want[n])


def test_a_secure_run_cannot_be_resumed(tiny_model_dir, tmp_path):
    from parablock.run.runner import run

    with pytest.raises(ConfigError, match="cannot be resumed"):
        run(_run_cfg(tiny_model_dir, tmp_path), resume=True)


def test_flower_refuses_secure_aggregation_in_one_line(tmp_path):
    from parablock.flower.template import refuse_secure_aggregation

    with pytest.raises(ConfigError, match="not supported under Flower") as e:
        refuse_secure_aggregation(_cfg(tmp_path))
    assert "\n" not in str(e.value)


def test_reveals_the_server_did_not_ask_for_or_not_its_own_are_refused(tiny_model_dir, tmp_path):
    from parablock.core import shamir
    from parablock.errors import MessageError
    from parablock.wire.protocol import SecAggCall

    server, clients = _server_and_clients(tiny_model_dir, tmp_path, timeout=30.0)
    for sc in clients[:3]:
        server.submit(_masked_update(server, sc, 0, sc.id), sc.id)
    with pytest.raises(MessageError, match="did not ask"):  # no dropout yet
        server.secagg(SecAggCall("reveal", 0, shares={3: "00" * 68}), 0)
    server.drop_client(3, "vanished")
    with pytest.raises(MessageError, match="did not ask"):  # a survivor's share
        server.secagg(SecAggCall("reveal", 0, shares={2: "00" * 68}), 0)
    with pytest.raises(MessageError, match="no masked update"):  # the dropped client itself
        server.secagg(clients[0].reveal(0, server.wait_aggregate(0, client=0).reveal), 3)
    forged = shamir.to_bytes((2 + 1, 12345)).hex()  # client 2's x, sent by client 0
    with pytest.raises(MessageError, match="not its own"):
        server.secagg(SecAggCall("reveal", 0, shares={3: forged}), 0)
    # honest reveals still complete the round
    for sc in clients[:3]:
        ask = server.wait_aggregate(0, client=sc.id)
        if ask.reveal:
            server.secagg(sc.reveal(0, ask.reveal), sc.id)
    assert server.wait_aggregate(0, timeout=5.0).version == 0 and server.next_round == 1
    server.stop()
