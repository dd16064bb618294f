"""The training loss of a batch, computed no more expensively than it has to be.

Three savings over ``model(**batch).loss``, each with a switch in ``[train]``:

- **precision**: the forward runs under bf16 autocast where the device does bf16 fast (CPUs with
  AVX-512-bf16 or AMX, CUDA GPUs with bf16); weights, gradients, optimizer state and the block's
  delta stay fp32 (``resolve_precision``).
- **prefix cache**: the layers below the lowest block that ever trains never change, so the hidden
  states entering that layer are a function of the example alone. They are computed once per
  example (the first time it is used), kept up to ``prefix_cache_mb``, and every later forward
  starts there (``PrefixCache``). The cache is dropped the moment any prefix parameter is written.
- **response logits**: the LM head runs only where the loss is (labels != -100), in chunks of at
  most ``loss_chunk`` positions whose logits are recomputed in backward instead of kept.

And one saving of memory for time, off by default: ``recompute`` keeps only each decoder layer's
input and recomputes the layer in backward (transformers' activation checkpointing); the step's
results are the same, its activations a fraction.

The model's own ``forward`` runs every layer that does run (its masks, rotary embeddings and
attention kernels), on a shallow view of the decoder whose skipped layers pass hidden states
through: nothing here re-implements a decoder layer.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from parablock.data.examples import IGNORE, Example, collate
from parablock.model.blocks import Block

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# Decoders whose forward feeds ``inputs_embeds`` to the first layer unchanged (Gemma scales it,
# Phi-3 applies dropout), so cached hidden states can enter there.
PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (not emulated, hence faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 exactly where the device does it fast."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}; valid: {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return requested


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        # No cast cache: it would share one bf16 copy of a trained weight (only those are
        # cached) between the head's chunks, summing their gradients in bf16, and the cache is
        # process-wide, so whether two chunks share it depended on the other clients' threads
        # (a trained head's result was not reproducible). Each use casts its own copy instead.
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def postprocessed_logits(model: nn.Module) -> bool:
    """Whether the model changes its head's output (soft-capping, scaling) before the loss: such
    models keep their own ``forward`` for the loss."""
    cfg = model.config
    return any(
        getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")
    )


def first_trained_layer(model: nn.Module, blocks: list[Block], trained: set[int]) -> int:
    """The decoder layer below which nothing ever trains: 0 if the embeddings (or anything else
    that runs before layer 0) train, e.g. in a block of every parameter; the number of layers if
    only the final norm or the head train. Read from the parameter names, not the block names."""
    lowest = len(model.model.layers)
    for b in trained:
        for n in blocks[b].param_names:
            if n.startswith("model.layers."):
                lowest = min(lowest, int(n.split(".")[2]))
            elif not n.startswith(("model.norm.", "lm_head.")):
                return 0
    return lowest


class _PassThrough(nn.Module):
    """Stands in for a decoder layer that is skipped: hidden states pass through unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):  # models that pick a mask per layer read it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _decoder_view(decoder: nn.Module, keep: range, final_norm: bool) -> nn.Module:
    """A shallow copy of ``decoder`` (sharing every parameter) that runs only the layers in
    ``keep`` and, without ``final_norm``, returns the hidden states before the final norm."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    layers = decoder.layers
    view._modules["layers"] = nn.ModuleList(
        [layers[j] if j in keep else _PassThrough(layers[j]) for j in range(len(layers))]
    )
    if not final_norm:
        view._modules["norm"] = nn.Identity()
    return view


class PrefixCache:
    """Hidden states entering layer ``start``, per training example, within a byte budget."""

    def __init__(self, model: nn.Module, start: int, budget_bytes: int) -> None:
        self.start = start
        self.budget = budget_bytes
        self.nbytes = 0
        self.full_logged = False
        self._states: dict[int, torch.Tensor] = {}
        decoder = model.model
        self._prefix_params = [
            p
            for n, p in decoder.named_parameters()
            if not n.startswith("layers.") or int(n.split(".")[1]) < start
        ]
        self._key = self._versions()
        self.view = _decoder_view(decoder, range(start), final_norm=False)

    def _versions(self) -> tuple[int, ...]:
        # A tensor's version counter moves on every in-place write (set_block, an optimizer step).
        return tuple(p._version for p in self._prefix_params)

    def check(self) -> None:
        """Drop everything if any parameter below ``start`` was written since it was cached."""
        key = self._versions()
        if key != self._key:
            if self._states:
                log.info("prefix cache: a layer below %d changed; dropped", self.start)
            self._states.clear()
            self.nbytes = 0
            self._key = key

    def states(self, data: list[Example], idx: list[int], pad_id: int) -> list[torch.Tensor]:
        """The hidden states entering layer ``start`` for each example (computed if missing)."""
        self.check()
        missing = [i for i in idx if i not in self._states]
        fresh: dict[int, torch.Tensor] = {}
        # Each example alone and unpadded: its cached state must not depend on which examples
        # shared its first batch (padding changes the kernels' shapes, hence the last bits), or a
        # resumed run, whose batches first meet the cache in another order, would not be bit-exact.
        device = next(self.view.parameters()).device
        for i in missing:
            batch = collate([data[i]], pad_id)
            with torch.no_grad():
                hidden = self.view(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).last_hidden_state
            fresh[i] = hidden[0].clone()
            self._keep(i, fresh[i])
        return [self._states.get(i, fresh.get(i)) for i in idx]

    def _keep(self, i: int, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if self.nbytes + size > self.budget:
            if not self.full_logged:
                log.info(
                    "prefix cache full at %.1f MB (%d examples); train.prefix_cache_mb bounds it",
                    self.nbytes / 1e6,
                    len(self._states),
                )
                self.full_logged = True
            return
        self._states[i] = state
        self.nbytes += size


def response_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    *,
    response_only: bool = True,
    chunk: int = 0,
    per_example: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens, and their count.

    ``hidden`` is the final (normed) hidden state; position p predicts ``labels[p + 1]``. With
    ``response_only`` the head sees only the positions that have a label; ``chunk`` > 0 splits
    them into pieces whose logits are recomputed in backward rather than kept. With
    ``per_example`` each token counts 1 / its example's response tokens, so the sum is the sum of
    the examples' own mean losses (what per-example gradients of DP-SGD differentiate).
    """
    h = hidden[:, :-1]
    y = labels[:, 1:]
    mask = y != IGNORE
    per_row = mask.sum(dim=1, keepdim=True).clamp_min(1)
    w = (1.0 / per_row).expand_as(y).to(torch.float32)
    if response_only:
        h, y, w = h[mask], y[mask], w[mask]
    else:
        h, y, w = h.reshape(-1, h.size(-1)), y.reshape(-1), w.reshape(-1)
    count = int((y != IGNORE).sum())
    if h.size(0) == 0:
        return hidden.sum() * 0.0, 0

    def piece(hp: torch.Tensor, yp: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
        if not per_example:
            return nn.functional.cross_entropy(
                head(hp).float(), yp, ignore_index=IGNORE, reduction="sum"
            )
        ce = nn.functional.cross_entropy(
            head(hp).float(), yp, ignore_index=IGNORE, reduction="none"
        )
        return (ce * wp).sum()

    if chunk <= 0 or h.size(0) <= chunk:
        return piece(h, y, w), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for hp, yp, wp in zip(h.split(chunk), y.split(chunk), w.split(chunk), strict=True):
        if hp.requires_grad:
            total = total + checkpoint(
                piece, hp, yp, wp, use_reentrant=False, preserve_rng_state=False
            )
        else:
            total = total + piece(hp, yp, wp)
    return total, count


class BlockForward:
    """The loss of a batch for a client whose trained blocks all lie at or above ``start``."""

    def __init__(
        self,
        model: nn.Module,
        start: int,
        *,
        precision: str = "fp32",
        prefix_cache_mb: float = 0.0,
        response_logits: bool = True,
        loss_chunk: int = 0,
        recompute: bool = False,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.response_logits = response_logits
        self.loss_chunk = loss_chunk
        self.head = model.get_output_embeddings()
        self.plain = postprocessed_logits(model)
        if recompute:  # transformers' own activation checkpointing of every decoder layer
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} cannot recompute its layers")
            model.activation_checkpointing_enable({"use_reentrant": False})
        cacheable = model.config.model_type in PREFIX_MODEL_TYPES and start > 0
        self.cache = (
            PrefixCache(model, start, int(prefix_cache_mb * 1e6))
            if cacheable and prefix_cache_mb > 0 and not self.plain
            else None
        )
        self.tail = (
            _decoder_view(model.model, range(start, len(model.model.layers)), final_norm=True)
            if self.cache is not None
            else model.model
        )

    def loss(
        self, data: list[Example], idx: list[int], pad_id: int, per_example: bool = False
    ) -> torch.Tensor:
        """Mean response-token loss of the batch ``idx`` (indices into ``data``); with
        ``per_example``, the sum over the batch of each example's own mean loss."""
        batch = {k: v.to(self.device) for k, v in collate([data[i] for i in idx], pad_id).items()}
        with autocast(self.precision, self.device):
            if self.plain:
                return self.model(**batch).loss
            if self.cache is not None:
                states = self.cache.states(data, idx, pad_id)
                width = batch["input_ids"].size(1)
                embeds = states[0].new_zeros((len(idx), width, states[0].size(-1)))
                for row, s in enumerate(states):
                    embeds[row, : s.size(0)] = s
                hidden = self.tail(
                    inputs_embeds=embeds, attention_mask=batch["attention_mask"]
                ).last_hidden_state
            else:
                hidden = self.tail(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).last_hidden_state
            total, count = response_loss(
                hidden,
                batch["labels"],
                self.head,
                response_only=self.response_logits,
                chunk=self.loss_chunk,
                per_example=per_example,
            )
        return total if per_example else total / max(count, 1)

    @property
    def cache_mb(self) -> float:
        return 0.0 if self.cache is None else self.cache.nbytes / 1e6
