"""Local block training: only the block changes, no gradient below it, seeded and deterministic."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from parablock.data.examples import round_indices
from parablock.model.blocks import BlockError, model_blocks, select_blocks
from parablock.model.train import TrainSettings, train_block

SETTINGS = TrainSettings(
    steps=3, batch_size=2, lr=1e-3, warmup_steps=1, lr_schedule="cosine", grad_clip=1.0
)


def test_gradients_are_not_computed_below_the_trained_block(tiny_examples, tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    blocks = model_blocks(model)
    grad_inputs = {}

    def watch(j):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            grad_inputs[j] = (
                hidden.requires_grad,
                output[0].requires_grad if isinstance(output, tuple) else output.requires_grad,
            )

        return hook

    for j, layer in enumerate(model.model.layers):
        layer.register_forward_hook(watch(j), with_kwargs=True)
    seen = []
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: seen.append(n))
    batches = round_indices(len(tiny_examples), 0, 1, 2, seed=0)
    train_block(model, blocks[2], tiny_examples, batches, SETTINGS, tiny_tokenizer.pad_token_id)
    assert grad_inputs[0] == (False, False) and grad_inputs[1] == (False, False)
    assert grad_inputs[2] == (False, True)  # the graph starts inside block 2
    assert set(seen) == set(blocks[2].param_names)
    assert all(p.grad is None for p in model.parameters())


def test_only_the_block_changes_and_training_is_deterministic(tiny_examples, tiny_tokenizer):
    results = []
    for _ in range(2):
        model = make_model(len(tiny_tokenizer))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        blocks = model_blocks(model)
        batches = round_indices(len(tiny_examples), 4, 3, 2, seed=1)
        r = train_block(
            model, blocks[1], tiny_examples, batches, SETTINGS, tiny_tokenizer.pad_token_id
        )
        for n, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[n])
            assert changed == (n in blocks[1].param_names), n
        assert r.num_examples == 6 and r.loss > 0
        results.append(r)
    for n in results[0].delta:
        assert torch.equal(results[0].delta[n], results[1].delta[n])


def test_block_selection_and_errors(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), layers=4)
    blocks = model_blocks(model, "embed,norm")
    assert [b.name for b in blocks] == ["layer.0", "layer.1", "layer.2", "layer.3", "embed", "norm"]
    assert blocks[4].param_names == ("model.embed_tokens.weight",)
    assert select_blocks(blocks, "top:2") == [2, 3, 4, 5]
    assert select_blocks(blocks, "0-1,3") == [0, 1, 3]
    assert select_blocks(model_blocks(model), "all") == [0, 1, 2, 3]
    with pytest.raises(BlockError, match="selects no valid block"):
        select_blocks(blocks, "9")
    with pytest.raises(BlockError, match="malformed"):
        select_blocks(blocks, "top:x")
    with pytest.raises(BlockError, match="tied to the embeddings"):
        model_blocks(model, "head")
    with pytest.raises(BlockError, match="unknown block 'mlp'"):
        model_blocks(model, "mlp")


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(BlockError, match="GPT2LMHeadModel is not supported yet"):
        model_blocks(gpt2)
