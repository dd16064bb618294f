"""What a hostile Flower node can send the relay, and the worker's mailbox on its own."""

from __future__ import annotations

import threading

from parablock.errors import ConnectError, RoundFailedError, ServerGone
from parablock.flower.bundle import Bundle, Item
from parablock.flower.mailbox import Mailbox
from parablock.flower.relay import NodeSession
from parablock.wire.messages import BlockUpdate
from parablock.wire.protocol import PROTOCOL, JoinReply, JoinRequest, UploadReply
from test_server import _delta, _server


def _join(client: int) -> Bundle:
    b = Bundle()
    b.add(Item("join"), JoinRequest(PROTOCOL, client, "").to_bytes())
    return b


def _answers(session: NodeSession) -> Bundle:
    return Bundle.from_frames(session.take())


def test_a_node_cannot_take_another_nodes_client_id_or_change_its_own():
    server, _ = _server()
    claims: dict[int, int] = {}
    a, b = NodeSession(11, server, False), NodeSession(22, server, False)
    a.handle(_join(0), claims)
    assert _answers(a).items[0].error == ""
    b.handle(_join(0), claims)  # node 22 claims node 11's client
    got = _answers(b)
    assert got.items[0].error == "ConnectError" and b"already Flower node 11" in got.payloads[0]
    a.handle(_join(1), claims)  # node 11 tries to become client 1
    assert b"is client 0, not 1" in _answers(a).payloads[0]
    b.handle(_join(7), claims)  # out of range
    assert b"not one of this run's" in _answers(b).payloads[0]
    assert claims == {0: 11}


def test_a_lost_node_is_asked_back_and_rejoins_only_as_its_own_client():
    """A failed message drops the node's client; the node is then sent ``rejoin`` (nothing
    else), takes nothing but a join, and its join (the same id) brings the client back. No
    other node can take the lost client's id meanwhile, and a node cannot send ``rejoin``."""
    server, blocks = _server(min_clients=1)
    claims: dict[int, int] = {}
    a, b = NodeSession(11, server, False), NodeSession(22, server, False)
    for s, c in ((a, 0), (b, 1)):
        s.handle(_join(c), claims)
        assert s.ready(started=True)
        _answers(s)
    a.lose("Flower error 0: the node went away")
    assert server.dropped() == {0} and a.lost
    assert not a.ready(started=True)  # asked back after PROBE_S, doubling while that fails
    a.probe_at = 0.0  # as if that time had passed
    assert a.ready(started=True)
    assert [i.kind for i in _answers(a).items] == ["rejoin"]
    thief = NodeSession(33, server, False)
    thief.handle(_join(0), claims)
    assert b"already Flower node 11" in _answers(thief).payloads[0]
    stale = Bundle()  # a request of the lost session: ignored, the worker's mailbox voids it
    stale.add(Item("wait", round=0))
    stale.add(Item("rejoin"))
    a.handle(stale, claims)
    assert not a.out.items and a.lost
    a.handle(_join(1), claims)  # still client 0: refused, and told so with the next rejoin
    a.probe_at = 0.0
    assert a.ready(started=True) and a.lost
    got = _answers(a)
    assert [(i.kind, i.error) for i in got.items] == [("join", "ConnectError"), ("rejoin", "")]
    a.handle(_join(0), claims)
    assert not a.lost and server.dropped() == set() and claims == {0: 11, 1: 22}
    assert _answers(a).items[0].error == ""
    # both are expected in round 0 again: client 0's update alone does not close it
    update = BlockUpdate(0, 0, 1, -1, 1, 0.5, _delta(blocks, 1, 1.0))
    assert server.receive_update(update.serialize(), 0)[0] and server.next_round == 0


def test_requests_before_join_and_malformed_payloads_are_answered_with_errors():
    server, blocks = _server()
    s = NodeSession(5, server, False)
    early = Bundle()
    early.add(Item("wait", round=0))
    s.handle(early, {})
    got = _answers(s)
    assert got.items[0].error == "ConnectError" and b"must join" in got.payloads[0]
    s.handle(_join(0), {})
    _answers(s)
    bad = Bundle()
    bad.add(Item("upload", round=0), b"\x00garbage")
    s.handle(bad, {})
    got = _answers(s)  # the server rejected it; nothing was applied
    assert not UploadReply.from_bytes(got.payloads[0]).accepted
    assert server.stats.rejected and server.versions[1] == -1


def test_an_accepted_upload_is_answered_with_the_rounds_aggregate_in_one_message():
    server, blocks = _server(min_clients=1)
    s = NodeSession(5, server, False)
    s.handle(_join(0), {})
    assert s.ready(started=True)
    _answers(s)
    up = Bundle()
    update = BlockUpdate(0, 0, 1, -1, 1, 0.5, _delta(blocks, 1, 1.0))
    up.add(Item("upload", round=0), update.serialize())
    s.handle(up, {})
    assert not s.ready(started=True)  # held until round 0 is aggregated
    server.drop_client(1, "test")  # client 1 is gone: min_clients=1 aggregates at once
    server.check_deadline()
    server.wait_aggregate(0, timeout=5.0)
    assert s.ready(started=True)
    got = _answers(s)
    assert [i.kind for i in got.items] == ["upload", "wait", "download"]
    assert UploadReply.from_bytes(got.payloads[0]).accepted
    assert (got.items[1].block, got.items[1].version) == (1, 0)


def test_the_mailbox_hands_back_requests_and_keeps_answers_that_came_first():
    box = Mailbox()
    out: dict = {}

    def client():
        out["reply"] = box.join(JoinRequest(PROTOCOL, 0, ""))
        out["ready"] = box.wait_aggregate(3)  # answered ahead of the request

    t = threading.Thread(target=client)
    t.start()
    sent = box.exchange(Bundle(), timeout=5.0)  # returns once the client waits on the join
    assert [i.kind for i in sent.items] == ["join"]
    answer = Bundle()
    reply = JoinReply(PROTOCOL, _server_settings(), 0, False, {})
    answer.add(Item("join"), reply.to_bytes())
    answer.add(Item("wait", round=3, block=2, version=3))
    t2 = threading.Thread(target=box.exchange, args=(answer, 2.0))
    t2.start()
    t.join(5.0)
    t2.join(5.0)
    assert out["reply"].start_round == 0 and out["ready"].block == 2


def test_rejoin_voids_what_the_lost_session_waits_for_but_sends_a_join_again():
    """The server lost the session: a caller waiting on an answer raises ``ServerGone`` (and
    rejoins, as ``run_site`` does); a join waiting on its answer goes out again instead."""
    box = Mailbox()
    errors: list = []

    def waiter():
        try:
            box.wait_aggregate(2)
        except ServerGone as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    assert [i.kind for i in box.exchange(Bundle(), timeout=5.0).items] == ["wait"]
    joined: dict = {}
    j = threading.Thread(target=lambda: joined.update(reply=box.join(JoinRequest(PROTOCOL, 0, ""))))
    j.start()
    assert [i.kind for i in box.exchange(Bundle(), timeout=5.0).items] == ["join"]
    rejoin = Bundle()
    rejoin.add(Item("rejoin"))
    again = box.exchange(rejoin, timeout=5.0)  # the join's request was lost with the session
    t.join(5.0)
    assert errors and "lost this client's session" in str(errors[0])
    assert [i.kind for i in again.items] == ["join"]
    answer = Bundle()
    answer.add(Item("join"), JoinReply(PROTOCOL, _server_settings(), 4, False, {}).to_bytes())
    box.exchange(answer, timeout=0.5)
    j.join(5.0)
    assert joined["reply"].start_round == 4
    refused: list = []

    def joiner():
        try:
            box.join(JoinRequest(PROTOCOL, 0, ""))
        except ConnectError as e:
            refused.append(e)

    j = threading.Thread(target=joiner)
    j.start()
    assert [i.kind for i in box.exchange(Bundle(), timeout=5.0).items] == ["join"]
    no = Bundle()  # refused while lost: the refusal comes with the next rejoin
    no.add(Item("join", error="ConnectError"), b"client 0 is already Flower node 11")
    no.add(Item("rejoin"))
    assert not box.exchange(no, timeout=0.5).items  # answered: not asked again
    j.join(5.0)
    assert refused and "already Flower node 11" in str(refused[0])


def test_an_error_answer_raises_what_a_grpc_connection_would():
    box = Mailbox()
    errors: list = []

    def client():
        try:
            box.wait_aggregate(0)
        except RoundFailedError as e:
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    box.exchange(Bundle(), timeout=5.0)
    answer = Bundle()
    answer.add(Item("wait", round=0, error="RoundFailedError"), b"round 0 failed: too few")
    handing = threading.Thread(target=box.exchange, args=(answer, 1.0))
    handing.start()
    t.join(5.0)
    handing.join(5.0)
    assert errors and "too few" in str(errors[0])


def _server_settings():
    from test_server import _settings

    return _settings(steps=1, batch=1)
