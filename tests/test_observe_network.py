"""The networked server's Prometheus endpoint during a tiny real federation: a `parablock server`
and two `parablock client` processes on 127.0.0.1 (each stopped by PID), scraped while they run.
The server's TensorBoard files hold the clients' reported rounds."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from parablock.backends.exporter import METRICS
from parablock.errors import ConnectError
from parablock.tools.status import status
from parablock.transport.auth import read_token
from parablock.wire.protocol import PROTOCOL, JoinRequest
from test_network import (  # noqa: F401  (site: the module's fixture)
    _client_args,
    _config_file,
    _conn,
    _server_sets,
    _start,
    _start_server,
    _stop,
    _wait,
    site,  # noqa: F811
)
from test_observe import documented, scalars


def _samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_the_endpoint_serves_the_documented_metrics_and_they_move(
    site,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    fed = {"rounds": 6, "round_timeout_s": 30.0, "min_clients": 1}
    config = _config_file(tmp_path, tiny_model_dir, "fed", federation=fed)
    extra = {"server.metrics_address": "0", "run.tensorboard": "true", "eval.source": ""}
    sets = _server_sets(site, tmp_path / "srv", **extra)
    slow = ("--emulate-latency-ms", "150")
    log = tmp_path / "server.log"
    procs, bodies = [], []
    try:
        server, port = _start_server(config, sets, log)
        procs.append(server)
        deadline = time.monotonic() + 30
        while not (
            m := re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log.read_text())
        ):
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.05)
        url = m.group(1)
        assert "loopback only" in log.read_text()
        bodies.append(urllib.request.urlopen(url, timeout=10).read().decode())
        with pytest.raises(ConnectError, match="unknown token"):
            _conn(site, port, "not-a-token").join(JoinRequest(PROTOCOL, 0, "base"))
        faults = [(), ("--faults", "nan@1:1")]
        for i in range(2):
            args = _client_args(site, port, i, tiny_model_dir, tmp_path / f"site{i}", *slow)
            procs.append(_start([*args, *faults[i]], tmp_path / f"client{i}.log"))
        while server.poll() is None:  # scrape until the endpoint closes with the rounds' end
            try:
                bodies.append(urllib.request.urlopen(url, timeout=10).read().decode())
            except OSError:
                break
            time.sleep(0.1)
        for p, name in [(procs[1], "client0"), (procs[2], "client1"), (server, "server")]:
            assert _wait(p, tmp_path / f"{name}.log") == 0, (tmp_path / f"{name}.log").read_text()
    finally:
        _stop(*procs)
    # every documented name is served, from the first scrape on (before any client joined)
    names = documented("Prometheus", r"^\| `(parablock_[a-z_]+)")
    assert names == set(METRICS)
    for name in names:
        kind = "histogram" if name == "parablock_round_seconds" else r"(counter|gauge)"
        assert re.search(rf"^# TYPE {name} {kind}$", bodies[0], re.M), name
    seen = [_samples(b) for b in bodies]
    first = seen[0]
    assert first["parablock_rounds_done"] == 0 and first["parablock_rounds_planned"] == 6
    # they move while the clients train
    done = [s["parablock_rounds_done"] for s in seen]
    assert done == sorted(done) and max(done) >= 2, done
    received = [s["parablock_bytes_received_total"] for s in seen]
    assert received == sorted(received) and received[-1] > received[0]
    last = seen[-1]
    assert last["parablock_bytes_sent_total"] > 0
    assert last["parablock_client_joins_total"] == 2 and last["parablock_clients_active"] == 2
    assert last['parablock_calls_refused_total{reason="unknown_token"}'] == 1
    assert last['parablock_updates_rejected_total{reason="not_finite"}'] == 1
    assert last["parablock_updates_accepted_total"] >= 2 * max(done) - 1
    assert last["parablock_round_seconds_count"] == last["parablock_rounds_done"]
    assert last["parablock_last_round_seconds"] > 0
    for c in (0, 1):
        assert f'parablock_client_wait_seconds_total{{client="{c}"}}' in last
    assert "parablock_privacy_epsilon" not in last  # no privacy: no sample
    # no token, no peer address in any scrape
    tokens = [read_token(site / "creds" / f"client-{i}.token") for i in range(2)]
    for body in bodies:
        assert not any(t in body for t in tokens) and "ipv4:" not in body
        assert "Bearer" not in body and "not-a-token" not in body
    # the server's event files hold both networked clients' rounds, from their reports
    tags = scalars(tmp_path / "srv" / "tb")
    for c in (0, 1):
        assert [s for s, _ in tags[f"train_loss/client_{c}"]] == [1, 2, 3, 4, 5, 6]
    assert sum(v for _, v in tags["round/updates_rejected"]) == 1
    # the server ends with the table, and status reads its run directory
    out = log.read_text()
    assert "done:" in out and "remote" in out and "1 rejected" in out
    srv = status(tmp_path / "srv")
    assert srv["state"] == "finished" and srv["updates_rejected"] == 1
    assert set(srv["clients_seen"]) == {"0", "1"}
