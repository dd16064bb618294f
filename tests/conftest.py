"""Shared fixtures: a tiny Llama (hidden 64, 4 layers) with a tiny BPE tokenizer, built in the test.

Nothing here touches the network or the embedded 135M model; a training step takes milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from parablock.config import Config  # noqa: E402
from parablock.data.examples import Record, encode_all  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    from parablock.data.sources import reasoning_gym_records

    recs = reasoning_gym_records("gsm_symbolic", 64, seed=123)
    return [r.prompt + " " + r.response for r in recs]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


def make_model(vocab: int, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_examples(tiny_tokenizer):
    from parablock.data.sources import reasoning_gym_records

    recs = reasoning_gym_records("gsm_symbolic", 32, seed=7)
    return encode_all(recs, tiny_tokenizer, 320, "tiny")


def tiny_config(model_dir: str, out: str, **sections) -> Config:
    """A config that runs in about a second: tiny model, few rounds, fast links."""
    base = {
        "model": {"name_or_path": model_dir, "blocks": "all"},
        # the data and accuracy size tests were written for, whatever the defaults become
        "data": {"source": "reasoning_gym:gsm_symbolic", "train_size": 32, "max_length": 320},
        "federation": {
            "clients": 2,
            "rounds": 4,
            "local_steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "round_timeout_s": 60.0,
        },
        "link": {"up_mbps": 200.0, "down_mbps": 200.0, "latency_ms": 5.0},
        "eval": {"size": 8, "batch_size": 4, "accuracy_size": 8},
        "run": {"out": out, "seed": 0, "threads": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    from parablock.config import from_dict

    return from_dict(base)


def slow_run_sets(model_dir: str, out) -> list[str]:
    """``--set`` items of a CLI run long enough (30 rounds, paced links) to signal mid-way."""
    return [
        f"model.name_or_path={model_dir}",
        "model.blocks=all",
        "data.source=reasoning_gym:gsm_symbolic",
        "data.train_size=24",
        "data.max_length=320",
        "federation.rounds=30",
        "federation.batch_size=2",
        "link.latency_ms=30",
        "eval.size=4",
        "eval.accuracy_size=8",
        f"run.out={out}",
        "run.threads=1",
    ]


def build_client(placement, server, **settings):
    """A client assembled as every backend assembles one (``backends/assembly.py``), joined to the
    in-process ``server``; ``settings``: fields of the ``RunSettings`` the server hands out
    that this test changes first."""
    from dataclasses import replace

    from parablock.backends.assembly import assemble
    from parablock.transport.inprocess import InProcessConnection

    if settings:
        server.settings = replace(server.settings, **settings)
    link = InProcessConnection(server, placement.client_id, placement.uplink, placement.downlink)
    return assemble(placement, link)[0]


__all__ = ["Record", "build_client", "make_model", "make_tokenizer", "slow_run_sets", "tiny_config"]


_LEAKS: list[str] = []


@pytest.fixture(autouse=True)
def _no_leaked_threads(request):
    """A non-daemon thread that outlives its test keeps the test process alive after the suite
    (a server waiting out a round deadline once held CI for 20 minutes): report it by test."""
    import threading

    before = set(threading.enumerate())
    yield
    for t in set(threading.enumerate()) - before:
        if not t.daemon or _busy_pool_worker(t):
            t.join(timeout=5.0)
            if t.is_alive() and (not t.daemon or _busy_pool_worker(t)):
                _LEAKS.append(f"{request.node.nodeid}: thread {t.name!r} still runs")


def _busy_pool_worker(t) -> bool:
    """A concurrent.futures worker inside a task: the interpreter joins it at exit (daemon or
    not), so a task that never ends keeps the process alive; an idle worker waits in its queue."""
    import sys
    from concurrent.futures import thread as pool

    if t not in pool._threads_queues:
        return False
    frame = sys._current_frames().get(t.ident)
    while frame is not None:
        if frame.f_code.co_name == "_worker":
            return False  # reached the worker loop without passing a task's frame
        if frame.f_back is not None and frame.f_back.f_code.co_name == "_worker":
            return frame.f_code.co_name != "get"  # in work_queue.get: idle
        frame = frame.f_back
    return False


def pytest_terminal_summary(terminalreporter):
    if _LEAKS:
        terminalreporter.write_line("threads left running by tests:")
        for line in _LEAKS:
            terminalreporter.write_line("  " + line)
