"""The one client assembly: a simulated client and a networked site's client, built the two ways
the code used to build them, come out the same, because both take their settings from the join."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from conftest import tiny_config
from parablock.backends.assembly import assemble
from parablock.run.build import prepare
from parablock.run.site import SiteOptions, placement
from parablock.transport.inprocess import InProcessConnection


def _client(p, server):
    return assemble(p, InProcessConnection(server, p.client_id, p.uplink, p.downlink))


def test_a_simulated_client_and_a_sites_client_are_built_alike(tiny_model_dir, tmp_path):
    from parablock.data.sources import reasoning_gym_records

    files = []
    for i in range(2):
        path = tmp_path / f"site{i}.jsonl"
        with open(path, "w") as f:
            for r in reasoning_gym_records("gsm_symbolic", 10, seed=40 + i):
                f.write(json.dumps({"question": r.prompt, "answer": f"{r.response} #### 1"}) + "\n")
        files.append(f"gsm8k:{path}")
    cfg = tiny_config(
        tiny_model_dir,
        str(tmp_path / "run"),
        data={"partition": "per_client", "client_sources": ";".join(files)},
        federation={"local_steps_max": 3, "duplex": True, "server_lr": 0.5},
        link={"compression": "int8"},
    )
    fed = prepare(cfg)
    # the simulator's way: a placement from the config, with the examples the run encoded
    simulated, reply = _client(fed.placements[0], fed.server)
    # the networked way: what `parablock client --id 0 --data ...` gives, reading its own file
    site = SiteOptions(
        "localhost:0", 0, "unused.token", files[0], model=tiny_model_dir, out=str(tmp_path / "s")
    )
    networked, site_reply = _client(replace(placement(site, None), uplink=None), fed.server)
    assert site_reply.settings == reply.settings
    for c in (simulated, networked):
        c.join(reply)  # takes the plan, as run_client does
    a, b = simulated, networked
    assert a.settings == b.settings and a.seed == b.seed and a.pad_id == b.pad_id
    assert a.settings.steps == cfg.federation.local_steps and a.settings.lr == cfg.federation.lr
    assert (a.overlap, a.codec.name, a.server_lr) == (b.overlap, b.codec.name, b.server_lr)
    assert a.overlap.local_steps_max == 3 and a.overlap.duplex and a.codec.name == "int8"
    assert a.server_lr == 0.5 and type(a.correction) is type(b.correction)
    assert a.plan == b.plan == fed.server.plan
    assert [x.param_names for x in a.blocks] == [x.param_names for x in b.blocks]
    assert [(e.input_ids, e.labels) for e in a.data] == [(e.input_ids, e.labels) for e in b.data]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    for c in (a, b):
        c.close()
