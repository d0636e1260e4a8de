"""Padding-free training: the fast path every tuneforge method trains through.

A batch of ``batch_size`` examples (the product's meaning: examples per optimiser step) becomes
one row: the examples' tokens one after another, ``position_ids`` restarting at 0 for each, and the
boundaries as ``cu_seq_lens`` (cumulative lengths, the flash-attention "varlen" convention). No
padding token is ever processed, and attention stays inside each example:

* on a GPU with ``flash_attn`` installed, transformers' ``flash_attention_2`` reads the boundaries;
* everywhere else the ``tuneforge_varlen`` attention registered here runs PyTorch's
  ``scaled_dot_product_attention`` (``is_causal``) once per example on its slice of the row — the
  same arithmetic as a batch of one, at the cost of a loop over examples per layer instead of a
  ``L × L`` mask (which is what transformers' own packed-sequence path builds for ``sdpa``).

The loss is computed only where it is defined: :func:`loss_positions` selects the positions whose
next token carries the loss, the model's ``logits_to_keep`` runs the LM head on those positions
only (with a 49k–150k vocabulary the head is a large share of the FLOPs), and the cross-entropy is
summed and divided by the number of loss tokens of the whole optimiser step — the same loss as a
padded batch's mean over its loss tokens (tested in ``tests/test_packed.py``).

Anything else (generation, an unpacked padded batch) goes through the plain ``sdpa`` path with its
usual masks. torch/transformers are imported inside functions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "tuneforge_varlen"
IGNORE = -100
# A batch with more tokens than this trains as several forwards (gradients accumulated, the same
# loss); the fastest setting for batches below it is one row (measured on CPU).
MAX_TOKENS_PER_FORWARD = int(os.environ.get("TUNEFORGE_MAX_TOKENS_PER_FORWARD", "16384"))
CU_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Set while a packed forward builds its masks: the varlen attention needs none, so the mask
# function answers None instead of building an L × L packed-sequence mask.
_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("tuneforge_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward() -> Iterator[None]:
    token = _PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _PACKED_FORWARD.reset(token)


# ----------------------------------------------------------------------------------------------
# Attention.


def _lengths(cu) -> list[int]:
    bounds = cu.tolist()
    return [b - a for a, b in zip(bounds, bounds[1:])]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention within each example of a packed row (``cu_seq_lens_q`` in ``kwargs``);
    transformers' ``sdpa`` for anything else. Shapes as transformers passes them: query
    ``[1, heads, L, dim]``, key/value ``[1, kv_heads, L, dim]``; returns ``[1, L, heads, dim]``."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        rest = {k: v for k, v in kwargs.items() if k not in CU_KEYS}
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **rest)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    lengths = _lengths(cu)
    if len(lengths) == 1:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=p, scale=scaling,
                                                               is_causal=True)
    else:
        # ``split`` (not one slice per example): its backward is one concatenation, where slices
        # would each write a full-size zero gradient.
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scaling, is_causal=True)
            for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2),
                               strict=True)
        ], dim=2)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register_attention() -> str:
    """Register ``tuneforge_varlen`` with transformers (attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        if _PACKED_FORWARD.get():
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, mask)
    return VARLEN_ATTENTION


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """What the fast path switched on for this device (named in the job's log and metrics)."""

    attention: str  # "flash_attention_2" (GPU with flash_attn) or "tuneforge_varlen"
    bf16: bool

    def describe(self) -> str:
        return (f"padding-free batches (attention {self.attention}), LM head on loss positions only, "
                f"{'bf16' if self.bf16 else 'fp32'}")

    def metrics(self) -> dict[str, float]:
        return {"speed_padding_free": 1.0, "speed_loss_positions_only": 1.0,
                "speed_flash_attention": 1.0 if self.attention == "flash_attention_2" else 0.0,
                "speed_bf16": 1.0 if self.bf16 else 0.0}


def choose_attention(use_cuda: bool) -> str:
    if use_cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return register_attention()


# ----------------------------------------------------------------------------------------------
# Batches.


def pack(features: Sequence[dict[str, Any]], label_key: str = "labels") -> dict[str, Any]:
    """One padding-free row of ``features`` (each with ``input_ids`` and ``labels``, ``-100`` where
    no loss): input ids, labels (the first token of every example gets ``-100``, so no position
    predicts across a boundary), restarting position ids and the cumulative lengths."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu = [0]
    for feature in features:
        x = list(feature["input_ids"])
        if not x:
            continue
        y = list(feature[label_key])
        y[0] = IGNORE
        ids += x
        labels += y
        positions += range(len(x))
        cu.append(cu[-1] + len(x))
    longest = max(b - a for a, b in zip(cu, cu[1:])) if len(cu) > 1 else 0
    cu_tensor = torch.tensor(cu, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu_tensor,
        "cu_seq_lens_k": cu_tensor,
        "max_length_q": longest,
        "max_length_k": longest,
    }


class PackedCollator:
    """``DataCollator`` for the Trainer: :func:`pack`."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return pack(features)


def split_row(batch: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """A packed row cut at example boundaries into rows of at most ``max_tokens`` tokens (an
    example longer than that stays whole, alone), for batches too large for one forward."""
    import torch

    bounds = batch["cu_seq_lens_q"].tolist()
    total = bounds[-1]
    if max_tokens <= 0 or total <= max_tokens:
        return [batch]
    groups: list[tuple[int, int]] = []
    start = bounds[0]
    for a, b in zip(bounds, bounds[1:]):
        if b - start > max_tokens and a > start:
            groups.append((start, a))
            start = a
    groups.append((start, total))
    out = []
    for s, e in groups:
        cu = [b - s for b in bounds if s <= b <= e]
        cu_tensor = torch.tensor(cu, dtype=torch.int32, device=batch["cu_seq_lens_q"].device)
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        out.append({
            "input_ids": batch["input_ids"][:, s:e], "labels": batch["labels"][:, s:e],
            "position_ids": batch["position_ids"][:, s:e], "cu_seq_lens_q": cu_tensor, "cu_seq_lens_k": cu_tensor,
            "max_length_q": longest, "max_length_k": longest,
        })
    return out


def loss_positions(labels):
    """Positions ``t`` of a packed row (``labels`` ``[1, L]``) whose logits predict a loss token
    ``labels[t + 1]``, and those targets."""
    import torch

    nxt = labels[0, 1:]
    positions = torch.nonzero(nxt != IGNORE, as_tuple=True)[0]
    return positions, nxt[positions]


def model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The model-forward arguments of a packed batch (everything but the labels)."""
    kwargs = {k: inputs[k] for k in ("input_ids", "position_ids", *CU_KEYS) if k in inputs}
    kwargs["use_cache"] = False
    return kwargs


def logits_at(model, inputs: dict[str, Any], positions):
    """The model's logits at ``positions`` only (``[len(positions), vocab]``), attention kept
    inside each packed example."""
    with packed_forward():
        out = model(**model_kwargs(inputs), logits_to_keep=positions)
    return out.logits[0]


def token_loss_sum(model, inputs: dict[str, Any]):
    """Summed cross-entropy over a packed row's loss tokens, and their number."""
    import torch

    positions, targets = loss_positions(inputs["labels"])
    if positions.numel() == 0:
        # No loss token in this batch: a zero loss that keeps the graph (and the step) valid.
        logits = logits_at(model, inputs, torch.zeros(1, dtype=torch.long, device=inputs["labels"].device))
        return logits.sum() * 0.0, 0
    logits = logits_at(model, inputs, positions)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(positions.numel())


# ----------------------------------------------------------------------------------------------
# The trainer.


@functools.cache
def packed_trainer_class() -> type:
    """A ``transformers.Trainer`` that trains and evaluates on packed rows (:class:`PackedCollator`)
    with the loss on loss positions only, and logs ``num_tokens`` (real tokens seen in training)."""
    from transformers import Trainer

    class PackedTrainer(Trainer):
        real_tokens_seen = 0
        max_tokens_per_forward = MAX_TOKENS_PER_FORWARD

        def training_step(self, model, inputs, num_items_in_batch=None):
            """A batch larger than ``max_tokens_per_forward`` tokens runs as several forwards and
            backwards (cut at example boundaries), each loss divided by the whole batch's loss-token
            count: the same gradient as one forward, in bounded memory."""
            rows = split_row(inputs, self.max_tokens_per_forward) if "cu_seq_lens_q" in inputs else [inputs]
            if len(rows) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                num_items_in_batch = int((inputs["labels"][:, 1:] != IGNORE).sum())
            return sum(super(PackedTrainer, self).training_step(model, row, num_items_in_batch) for row in rows)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, count = token_loss_sum(model, inputs)
            if model.training:
                self.real_tokens_seen += int(inputs["input_ids"].numel())
            denominator = num_items_in_batch if num_items_in_batch is not None else max(1, count)
            loss = loss / denominator
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs["num_tokens"] = float(self.real_tokens_seen)
            return super().log(logs, *args, **kwargs)

    return PackedTrainer
