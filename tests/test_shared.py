"""Clients of the local backend share the weights no one trains, and train exactly as before."""

from __future__ import annotations

import torch

from conftest import tiny_config
from parablock.backends.shared import FrozenShare
from parablock.core.blocks import model_blocks
from parablock.runner import run


def test_only_the_trained_blocks_are_a_clients_own(tiny_model_dir):
    share = FrozenShare()
    a = share.model(tiny_model_dir, "", (2, 3))
    b = share.model(tiny_model_dir, "", (2, 3))
    blocks = model_blocks(a)
    own = set(blocks[2].param_names + blocks[3].param_names)
    pb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert (p.data_ptr() == pb[n].data_ptr()) == (n not in own), n
        assert torch.equal(p, pb[n])
    assert a.lm_head.weight is a.model.embed_tokens.weight  # ties survive the copy


def test_a_run_with_shared_frozen_weights_equals_one_without(tiny_model_dir, tmp_path, monkeypatch):
    cfg = dict(model={"blocks": "top:2"}, train={"precision": "fp32"})
    shared = run(tiny_config(tiny_model_dir, str(tmp_path / "shared"), **cfg))
    monkeypatch.setattr(FrozenShare, "model", lambda self, *a: None)  # each client loads its own
    alone = run(tiny_config(tiny_model_dir, str(tmp_path / "alone"), **cfg))
    assert shared["final_model_fingerprint"] == alone["final_model_fingerprint"]
    assert shared["final_eval_loss"] < shared["initial_eval_loss"]
