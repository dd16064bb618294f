"""What a hostile Flower node can send the relay, and the worker's mailbox on its own."""

from __future__ import annotations

import threading

from parablock.core.messages import BlockUpdate
from parablock.core.protocol import PROTOCOL, JoinReply, JoinRequest, UploadReply
from parablock.errors import RoundFailedError
from parablock.flower.bundle import Bundle, Item
from parablock.flower.mailbox import Mailbox
from parablock.flower.relay import NodeSession
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
