"""The training forward: every saving (bf16, prefix cache, response-only and chunked logits) gives
the loss and gradients of the model's own forward, and the cache is dropped when a layer below
changes."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, tiny_config
from parablock.core.schedule import WHOLE_MODEL
from parablock.data.examples import collate
from parablock.model import forward as fw
from parablock.model.blocks import Block, block_state, freeze_all_but, model_blocks, set_block
from parablock.model.forward import BlockForward, first_trained_layer, resolve_precision
from parablock.model.train import TrainSettings, train_block
from parablock.run.runner import run


@pytest.fixture
def tiny(tiny_examples, tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), layers=4)
    return model, model_blocks(model), tiny_examples, tiny_tokenizer.pad_token_id


def _loss_and_grads(model, blocks, b, forward, data, idx, pad):
    params = freeze_all_but(model, blocks[b])
    loss = forward.loss(data, idx, pad)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return loss.detach(), grads


def _reference(model, blocks, b, data, idx, pad):
    params = freeze_all_but(model, blocks[b])
    loss = model(**collate([data[i] for i in idx], pad)).loss
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return loss.detach(), grads


def _close(a, b, rtol):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=rtol, atol=0), (la, lb)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * y.abs().max()), (x - y).abs().max()


@pytest.mark.parametrize("response_logits", [True, False])
@pytest.mark.parametrize("chunk", [0, 3])
def test_fp32_loss_and_gradients_equal_the_models_own(tiny, response_logits, chunk):
    model, blocks, data, pad = tiny
    idx = [0, 5, 9]
    want = _reference(model, blocks, 2, data, idx, pad)
    f = BlockForward(model, 0, response_logits=response_logits, loss_chunk=chunk)
    _close(_loss_and_grads(model, blocks, 2, f, data, idx, pad), want, 1e-5)


def _whole_model_block(model):
    """fedavg_full's one block of every parameter (the tied head is the embedding, once)."""
    return Block(0, WHOLE_MODEL, tuple(n for n, _ in model.named_parameters()))


@pytest.mark.parametrize("chunk", [3, 128])
def test_a_trained_tied_head_gets_its_gradient_through_the_recomputed_chunks(tiny, chunk):
    """fedavg_full trains every parameter, the LM head too (SmolLM2's is tied to the
    embeddings): the chunks recomputed in backward must pass the head its gradient."""
    model, _, data, pad = tiny
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    blocks = [_whole_model_block(model)]
    idx = [0, 5, 9]
    want = _reference(model, blocks, 0, data, idx, pad)
    f = BlockForward(model, 0, loss_chunk=chunk)
    got = _loss_and_grads(model, blocks, 0, f, data, idx, pad)
    _close(got, want, 1e-5)
    head = blocks[0].param_names.index("model.embed_tokens.weight")
    assert got[1][head].abs().sum() > 0


def test_bf16_chunks_give_a_trained_head_the_gradient_of_one_piece(tiny):
    model, _, data, pad = tiny
    blocks = [_whole_model_block(model)]
    idx = [0, 5, 9]
    one = _loss_and_grads(
        model, blocks, 0, BlockForward(model, 0, precision="bf16"), data, idx, pad
    )
    f = BlockForward(model, 0, precision="bf16", loss_chunk=3)
    _close(_loss_and_grads(model, blocks, 0, f, data, idx, pad), one, 2e-2)


def test_cached_prefix_matches_the_full_forward_and_computes_each_example_once(tiny):
    model, blocks, data, pad = tiny
    calls = []
    model.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    f = BlockForward(model, 2, prefix_cache_mb=64)
    assert f.cache is not None and f.cache.start == 2
    for b, idx in [(2, [0, 1, 2]), (3, [1, 2, 3]), (2, [0, 3, 1])]:
        want = _reference(model, blocks, b, data, idx, pad)
        _close(_loss_and_grads(model, blocks, b, f, data, idx, pad), want, 1e-5)
    # the reference runs layer 0 on every batch (3 rows each); the cache on 3 + 1 new examples
    assert sum(calls) == 3 * 3 + 4
    assert 0 < f.cache_mb < 64


def test_a_change_below_drops_the_cache(tiny):
    model, blocks, data, pad = tiny
    f = BlockForward(model, 2, prefix_cache_mb=64)
    f.loss(data, [0, 1], pad)
    assert f.cache.nbytes > 0
    state = block_state(model, blocks[1])
    set_block(model, blocks[1], {n: t + 0.01 for n, t in state.items()})  # layer 1 < 2
    want = _reference(model, blocks, 3, data, [0, 1], pad)
    _close(_loss_and_grads(model, blocks, 3, f, data, [0, 1], pad), want, 1e-5)
    set_block(model, blocks[3], block_state(model, blocks[3]))  # above: the cache stays
    before = f.cache.nbytes
    f.cache.check()
    assert f.cache.nbytes == before


def test_the_cache_stays_within_its_budget_and_the_rest_is_computed(tiny):
    model, blocks, data, pad = tiny
    one = BlockForward(model, 2, prefix_cache_mb=64)
    one.loss(data, [0], pad)
    budget = one.cache.nbytes * 2.5  # room for about two examples
    f = BlockForward(model, 2, prefix_cache_mb=budget / 1e6)
    for idx in ([0, 1, 2, 3], [4, 5, 6]):
        want = _reference(model, blocks, 2, data, idx, pad)
        _close(_loss_and_grads(model, blocks, 2, f, data, idx, pad), want, 1e-5)
    assert 0 < f.cache.nbytes <= budget and 0 < len(f.cache._states) < 7


def test_bf16_keeps_fp32_weights_and_deltas_and_a_close_loss(tiny):
    model, blocks, data, pad = tiny
    batches = [[0, 1], [2, 3]]
    settings = TrainSettings(2, 2, 1e-3)
    ref = make_model(model.config.vocab_size, layers=4)
    r32 = train_block(ref, model_blocks(ref)[2], data, batches, settings, pad)
    f = BlockForward(model, 0, precision="bf16")
    r16 = train_block(model, blocks[2], data, batches, settings, pad, f)
    assert f.precision == "bf16"
    assert all(t.dtype == torch.float32 for t in r16.delta.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert r16.loss == pytest.approx(r32.loss, rel=0.02)
    for n in r32.delta:  # the same direction of update
        cos = torch.nn.functional.cosine_similarity(
            r16.delta[n].flatten(), r32.delta[n].flatten(), dim=0
        )
        assert cos > 0.9, n


def test_auto_precision_is_bf16_exactly_where_it_is_fast(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(fw, "bf16_is_fast", lambda d: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(fw, "bf16_is_fast", lambda d: False)
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("fp16", cpu)


def test_first_trained_layer(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), layers=4)
    blocks = model_blocks(model, "embed,norm")  # layers 0-3, embed 4, norm 5
    assert first_trained_layer(model, blocks, {2, 3}) == 2
    assert first_trained_layer(model, blocks, {3, 5}) == 3
    assert first_trained_layer(model, blocks, {5}) == 4  # only the norm: no layer runs twice
    assert first_trained_layer(model, blocks, {3, 4}) == 0  # the embeddings train


def test_a_run_with_the_cache_ends_close_to_one_without(tiny_model_dir, tmp_path):
    runs = []
    for mb in (0.0, 64.0):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / f"cache{mb}"),
            model={"blocks": "top:2"},
            train={"precision": "fp32", "prefix_cache_mb": mb},
        )
        runs.append(run(cfg))
    off, on = runs
    assert on["final_eval_loss"] == pytest.approx(off["final_eval_loss"], rel=1e-4)
    assert on["final_eval_loss"] < on["initial_eval_loss"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recompute_gives_the_same_loss_and_gradients_as_keeping_activations(tiny, precision):
    model, blocks, data, pad = tiny
    idx = [0, 5, 9]
    for start in (0, 1):  # the full forward, and the tail after a cached prefix
        kept = BlockForward(model, start, precision=precision, prefix_cache_mb=8 if start else 0)
        want = _loss_and_grads(model, blocks, 1, kept, data, idx, pad)
        again = make_model(model.config.vocab_size, layers=4)  # the same seed: the same weights
        f = BlockForward(
            again, start, precision=precision, prefix_cache_mb=8 if start else 0, recompute=True
        )
        assert all(layer.gradient_checkpointing for layer in again.model.layers)
        got = _loss_and_grads(again, model_blocks(again), 1, f, data, idx, pad)
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1], want[1], strict=True):
            assert torch.equal(a, b)


def test_a_run_that_recomputes_ends_bit_equal_to_one_that_keeps(tiny_model_dir, tmp_path):
    fingerprints = []
    for recompute in (False, True):
        cfg = tiny_config(
            tiny_model_dir,
            str(tmp_path / f"recompute{recompute}"),
            model={"blocks": "top:3"},
            train={"precision": "bf16", "recompute": recompute},
        )
        s = run(cfg)
        assert s["recompute"] is recompute
        fingerprints.append(s["final_model_fingerprint"])
    assert fingerprints[0] == fingerprints[1]
