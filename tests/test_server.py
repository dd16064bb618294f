"""Server aggregation against a hand computation, and rejection of bad or late updates."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_model
from parablock.core.server import RoundFailedError, Server
from parablock.errors import MessageError
from parablock.model.blocks import block_state, model_blocks
from parablock.wire.messages import BlockUpdate
from parablock.wire.protocol import PROTOCOL, AggregateReady, JoinRequest


def _server(**kw):
    model = make_model(vocab=64, layers=3)
    blocks = model_blocks(model)
    args = dict(clients=2)
    args.update(kw)
    return Server(model, blocks, [1, 2, 1], **args), blocks


def _delta(blocks, b, value):
    return {
        n: torch.full_like(t, value) for n, t in block_state(_server()[0].model, blocks[b]).items()
    }


def _send(server, client, round, block, delta, n=1, base=-1, claim=None):
    claimed = client if claim is None else claim
    update = BlockUpdate(claimed, round, block, base, n, 0.5, delta)
    return server.receive_update(update.serialize(), client)


def test_weighted_aggregation_with_server_lr_equals_hand_computation():
    server, blocks = _server(server_lr=0.5)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    d0, d1 = _delta(blocks, 1, 1.0), _delta(blocks, 1, 4.0)
    assert _send(server, 0, 0, 1, d0, n=3) == (True, "accepted")
    assert server.next_round == 0  # waits for client 1
    assert _send(server, 1, 0, 1, d1, n=1)[0]
    # (3*1 + 1*4) / 4 = 1.75, times server_lr 0.5 = 0.875
    after = dict(server.model.named_parameters())
    for n, p in after.items():
        if n in blocks[1].param_names:
            torch.testing.assert_close(p.detach(), before[n] + 0.875)
        else:
            assert torch.equal(p.detach(), before[n]), n
    assert server.versions[1] == 0 and server.versions[2] == -1
    assert server.wait_aggregate(0) == AggregateReady(1, 0)
    value = server.block_value(1, 0)
    assert value.version == 0 and torch.equal(
        value.tensors[blocks[1].param_names[0]], after[blocks[1].param_names[0]].detach()
    )


def test_bad_updates_are_rejected_logged_and_never_applied(caplog):
    server, blocks = _server(min_clients=1)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    caplog.set_level(logging.WARNING)
    wrong_shape = {n: torch.zeros(2) for n in blocks[1].param_names}
    assert not _send(server, 0, 0, 1, wrong_shape)[0]
    assert not _send(server, 0, 0, 2, _delta(blocks, 2, 1.0))[0]  # not the round's block
    assert not _send(server, 5, 0, 1, _delta(blocks, 1, 1.0))[0]  # unknown client
    assert not _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), base=3)[0]  # wrong base
    corrupt = bytearray(BlockUpdate(0, 0, 1, -1, 1, 0.1, _delta(blocks, 1, 1.0)).serialize())
    corrupt[-1] ^= 1
    assert not server.receive_update(bytes(corrupt), 0)[0]
    assert len(server.stats.rejected) == 5
    assert "rejected an update" in caplog.text and "checksum" in caplog.text
    for n, p in server.model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    # client 0 forfeited round 0 with its rejected updates: a good one comes too late for it
    ok, reason = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    assert not ok and "earlier update of this round was rejected" in reason
    assert server.stats.rejected.by_client == {0: 5, 5: 1}
    # so round 0 aggregates as soon as client 1's update is in, without waiting for client 0
    assert _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))[0]
    assert server.next_round == 1 and server.stats.participants[0] == [1]
    ok, reason = _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))
    assert not ok and "late" in reason


def test_deadline_aggregates_with_min_clients_or_fails_clearly():
    server, blocks = _server(min_clients=1, round_timeout_s=0.2)
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    server.wait_aggregate(0)
    assert server.stats.participants[0] == [0]
    strict, blocks = _server(min_clients=2, round_timeout_s=0.2)
    _send(strict, 0, 0, 1, _delta(blocks, 1, 1.0))
    with pytest.raises(RoundFailedError, match="1 update"):
        strict.wait_aggregate(0)


def test_join_sends_only_blocks_whose_version_differs():
    server, blocks = _server()
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))
    reply = server.join(JoinRequest(PROTOCOL, 0, "", {b.index: -1 for b in blocks}), 0)
    assert reply.settings.plan == [1, 2, 1] and reply.stale == {1: 0}
    assert server.join(JoinRequest(PROTOCOL, 0, "", {0: -1, 1: 0, 2: -1}), 0).stale == {}


def test_identity_comes_from_the_caller_and_only_the_open_round_is_accepted():
    server, blocks = _server()
    ok, reason = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), claim=1)
    assert not ok and "claims to come from client 1" in reason
    ok, reason = _send(server, 0, 2, 1, _delta(blocks, 1, 1.0))  # a future round
    assert not ok and "round 0 is the open round" in reason
    assert server.stats.accepted == 0 and server.versions[1] == -1


def test_join_refuses_another_protocol_or_base_model():
    server, _ = _server(fingerprint="abc")
    with pytest.raises(MessageError, match="protocol mismatch"):
        server.join(JoinRequest(PROTOCOL + 1, 0, "abc"), 0)
    with pytest.raises(MessageError, match="base model differs"):
        server.join(JoinRequest(PROTOCOL, 0, "xyz"), 0)
    with pytest.raises(MessageError, match="not one of this run"):
        server.join(JoinRequest(PROTOCOL, 7, "abc"), 7)
    assert server.join(JoinRequest(PROTOCOL, 0, "abc"), 0).start_round == 0


def test_rejoin_keeps_a_pending_delta_for_the_open_round_and_drops_a_late_one():
    server, blocks = _server(min_clients=1, round_timeout_s=0.1)
    # client 1 restarts at its barrier of round 0: its round-0 delta is still wanted
    reply = server.join(JoinRequest(PROTOCOL, 1, "", {1: -1}, 1, 0, [1]), 1)
    assert reply.keep_pending and reply.start_round == 1 and reply.stale == {}
    # round 0 closes without client 1 (deadline): it is dropped
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    server.wait_aggregate(0)
    assert server.stats.dropped == [1] and server.stats.participants[0] == [0]
    # now its pending delta is late: drop it, catch up on block 1, start at the open round
    reply = server.join(JoinRequest(PROTOCOL, 1, "", {1: -1}, 1, 0, [1]), 1)
    assert not reply.keep_pending and reply.start_round == 1 and reply.stale == {1: 0}
    assert 1 not in server._dropped
    ok, reason = _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))
    assert not ok and "late" in reason


def test_dropped_client_is_no_longer_waited_for_but_min_clients_still_holds():
    server, blocks = _server(clients=3, min_clients=1, round_timeout_s=60.0)
    _send(server, 2, 0, 1, _delta(blocks, 1, 1.0))  # the client that will drop had uploaded
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    server.drop_client(2, "its actor died")
    assert server.next_round == 0  # client 1 is alive and has not uploaded: keep waiting
    _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))
    assert server.stats.participants[0] == [0, 1, 2]  # an update sent before the drop counts
    _send(server, 0, 1, 2, _delta(blocks, 2, 1.0))
    server.drop_client(1, "did not answer")  # every live client has sent: aggregate now
    assert server.next_round == 2 and server.stats.participants[1] == [0]
    assert server.stats.dropped == [2, 1]
    # below min_clients a round still does not aggregate, and fails at its deadline
    strict, blocks = _server(clients=3, min_clients=2, round_timeout_s=0.2)
    strict.drop_client(1, "x")
    strict.drop_client(2, "x")
    _send(strict, 0, 0, 1, _delta(blocks, 1, 1.0))
    assert strict.next_round == 0
    with pytest.raises(RoundFailedError, match="min_clients needs 2"):
        strict.wait_aggregate(0)


def test_server_pickles_with_its_state_and_a_fresh_lock():
    import pickle

    server, blocks = _server()
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0))
    copy = pickle.loads(pickle.dumps(server))
    assert copy._cond is not server._cond and copy.stats.accepted == 1
    _send(copy, 1, 0, 1, _delta(blocks, 1, 1.0))
    assert copy.next_round == 1 and server.next_round == 0
    for (n, p), q in zip(copy.model.named_parameters(), server.model.parameters(), strict=True):
        assert torch.equal(p, q) == (n not in blocks[1].param_names), n


def test_reports_are_kept_per_client_and_bad_ones_refused():
    from parablock.wire.protocol import RecordReport, RoundReport, SpanReport

    server, _ = _server()
    record = RecordReport(0, 1, 1.0, 0.1, 0.2, 0.1, 0.0, 1.5, 10, 20, 2.5, 4, 100.0, 101.5, False)
    server.report(RoundReport(record, [SpanReport(0, "compute", 100.0, 101.0)], final=True), 1)
    assert server.reports[1].rounds[0].client == 1 and server.finished == {1}
    with pytest.raises(MessageError, match="bad round"):
        server.report(RoundReport(record, [SpanReport(0, "mining", 1.0, 2.0)]), 0)
    with pytest.raises(MessageError):  # strict JSON: a string where a number belongs
        RoundReport.from_bytes(b'{"record": {"round": "0"}, "spans": [], "final": false}')


def test_an_aggregate_that_is_not_finite_changes_nothing_and_fails_its_round():
    server, blocks = _server(server_lr=4.0)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    huge = _delta(blocks, 1, 3e38)  # each update is finite; 4 x their mean is not
    assert _send(server, 0, 0, 1, huge)[0] and _send(server, 1, 0, 1, huge, n=3)[0]
    with pytest.raises(RoundFailedError, match="not finite.*unchanged"):
        server.wait_aggregate(0)
    assert server.versions[1] == -1 and server.next_round == 0
    for n, p in server.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def _settings(steps: int, batch: int):
    from parablock.wire.protocol import RunSettings

    return RunSettings(
        "fedbcd",
        "replace",
        [1, 2, 1],
        "",
        steps,
        batch,
        1e-3,
        0.0,
        0,
        "constant",
        0.0,
        0,
        16,
        1,
        "",
    )


def test_only_an_accepted_update_starts_a_rounds_deadline():
    """A client that waits early (its update refused, or a hostile one) cannot close the round
    on the others: with no accepted update the round waits twice the timeout after opening."""
    import threading
    import time

    server, blocks = _server(min_clients=1, round_timeout_s=0.5)
    ok, _ = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), base=0)  # a stale base
    assert not ok  # client 0 forfeits round 0; client 1 is still computing
    # after the old deadline (0.5 s from the wait), well before the new one (1 s from opening)
    late = threading.Timer(0.6, lambda: _send(server, 1, 0, 1, _delta(blocks, 1, 1.0)))
    late.start()
    try:
        start = time.monotonic()
        assert server.wait_aggregate(0) == AggregateReady(1, 0)  # not failed at 0.5 s
        assert time.monotonic() - start >= 0.5
    finally:
        late.join()
    assert server.stats.participants[0] == [1]


def test_a_rejected_update_forfeits_the_round_at_once_instead_of_its_deadline():
    server, blocks = _server(round_timeout_s=600.0)  # min_clients = all
    ok, reason = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), base=0)  # a stale base
    assert not ok and "trained from version 0" in reason
    _send(server, 1, 0, 1, _delta(blocks, 1, 1.0))
    # nothing more can come and min_clients (2) is out of reach: the round fails now, not in 600 s
    with pytest.raises(RoundFailedError, match="no more can come"):
        server.wait_aggregate(0, timeout=5.0)
    assert server.versions[1] == -1


def test_num_examples_is_bounded_by_what_a_round_uses():
    server, blocks = _server(settings=_settings(steps=2, batch=4), min_clients=1)
    ok, reason = _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), n=10**12)
    assert not ok and "exceeds what a round uses (local_steps x batch_size = 8)" in reason
    assert _send(server, 1, 0, 1, _delta(blocks, 1, 1e-3), n=8)[0]


def test_max_client_weight_caps_one_clients_share():
    server, blocks = _server(max_client_weight=0.5)
    before = block_state(server.model, blocks[1])
    _send(server, 0, 0, 1, _delta(blocks, 1, 1.0), n=1000)
    _send(server, 1, 0, 1, _delta(blocks, 1, 3.0), n=1)
    after = block_state(server.model, blocks[1])
    for n in before:  # both shares capped at 0.5: (1 + 3) / 2, not (1000 * 1 + 3) / 1001
        torch.testing.assert_close(after[n], before[n] + 2.0)


@pytest.mark.parametrize("action", ["clip", "reject"])
def test_max_update_norm_clips_or_rejects(action):
    server, blocks = _server(max_update_norm=1.0, update_norm_action=action, min_clients=1)
    before = block_state(server.model, blocks[1])
    big = _delta(blocks, 1, 1e30)
    ok, reason = _send(server, 0, 0, 1, big)
    if action == "reject":
        assert not ok and "exceeds federation.max_update_norm=1" in reason
        _send(server, 1, 0, 1, _delta(blocks, 1, 0.0))
        for n in before:
            assert torch.equal(block_state(server.model, blocks[1])[n], before[n])
        return
    assert ok and server.stats.clipped == 1
    _send(server, 1, 0, 1, _delta(blocks, 1, 0.0))
    after = block_state(server.model, blocks[1])
    moved = torch.cat([(after[n] - before[n]).flatten() for n in before]).norm()
    assert moved.item() == pytest.approx(0.5, rel=1e-3)  # mean of the clipped (norm 1) and 0
