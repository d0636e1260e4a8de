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
padded batch's mean over its loss tokens (tested in ``tests/test_packed.py``). With several
processes (:mod:`tuneforge_builtin.distributed`) that count is the step's over all ranks and each
rank's loss is multiplied by the number of ranks (DDP averages the gradients), so the gradient and
the logged loss are the one-process ones (``PackedTrainer.scales_loss_across_ranks``).

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


def all_ranks_sum(value: int) -> int:
    """``value`` summed over the ranks of a multi-process run (a collective); itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    import torch
    from accelerate import PartialState

    total = torch.tensor([int(value)], dtype=torch.long, device=PartialState().device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


class GhostableDataset:
    """A map-style dataset whose index ``len + i`` is example ``i`` with no loss token: what a rank
    trains on when the last batch of an epoch has fewer examples than there are ranks (every rank
    must take part in the step's gradient all-reduce; this one adds nothing to it)."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        n = len(self.base)
        if index < n:
            return self.base[index]
        item = dict(self.base[index - n])
        item["labels"] = [IGNORE] * len(item["labels"])
        return item


def rank_slice(batch: Sequence[int], rank: int, world: int, ghost_offset: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch of example indices, as even as possible
    (17 over 2 ranks: 9 and 8); a rank left without an example gets the first one as a ghost
    (``ghost_offset + index``: :class:`GhostableDataset`, no loss)."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    mine = list(batch[start:start + base + (1 if rank < extra else 0)])
    return mine or [ghost_offset + batch[0]]


@functools.cache
def global_batch_sampler_class() -> type:
    """A batch sampler that yields this rank's :func:`rank_slice` of each global batch of the
    one-process order. It is a transformers ``BatchRebalanceSampler`` by type only: the Trainer then
    passes it as the data loader's batch sampler and keeps accelerate from sharding its batches
    again, and accelerate still swaps in its seeded sampler (``sampler``) — the one-process run's
    shuffle, epoch by epoch."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class GlobalBatchSlices(BatchRebalanceSampler):
        # No ``batch_size`` attribute: accelerate's BatchSamplerShard then takes batches of any size.
        def __init__(self, sampler, global_batch_size: int, rank: int, world: int, ghost_offset: int):
            self.sampler = sampler
            self.global_batch_size = global_batch_size
            self.rank, self.world, self.ghost_offset = rank, world, ghost_offset
            self.drop_last = False
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)

        def __iter__(self):
            batch: list[int] = []
            for index in self.sampler:
                batch.append(int(index))
                if len(batch) == self.global_batch_size:
                    yield rank_slice(batch, self.rank, self.world, self.ghost_offset)
                    batch = []
            if batch:
                yield rank_slice(batch, self.rank, self.world, self.ghost_offset)

        def __len__(self) -> int:
            return -(-len(self.sampler) // self.global_batch_size)

    return GlobalBatchSlices


@functools.cache
def packed_trainer_class() -> type:
    """A ``transformers.Trainer`` that trains and evaluates on packed rows (:class:`PackedCollator`)
    with the loss on loss positions only, and logs ``num_tokens`` (real tokens seen in training)."""
    from transformers import Trainer

    class PackedTrainer(Trainer):
        real_tokens_seen = 0  # this rank's
        # compute_loss below multiplies by the number of ranks itself (tuneforge_builtin.distributed)
        scales_loss_across_ranks = True
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
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # ``num_items_in_batch`` counts the loss tokens of the whole step on all ranks and
                # DDP/FSDP average the ranks' gradients: × ranks gives the one-process gradient
                # and logged loss (what transformers' own compute_loss does). 1 process: × 1.
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

        # Several processes: each rank trains on its slice of the one-process run's batch of every
        # step (get_train_dataloader); False: accelerate's sharding (equal per-rank batches, the last
        # batch of an epoch filled up with examples from its start).
        exact_global_batches = True

        def get_train_dataloader(self):
            """Several processes: every step trains on exactly the examples of the one-process run's
            step — the same seeded shuffle, each rank a contiguous share of the step's batch (a
            partial last batch of 17 over 2 ranks: 9 and 8, where accelerate would train on 32 with
            15 repeated). The loss stays right with uneven shares: it divides by the step's loss
            tokens over all ranks. One process: the trainer's own."""
            world = self.accelerator.num_processes
            if world <= 1 or not self.exact_global_batches:
                return super().get_train_dataloader()
            from torch.utils.data import RandomSampler

            base = self.train_dataset
            sampler_class = global_batch_sampler_class()
            rank, per_rank = self.accelerator.process_index, self._train_batch_size
            return self._get_dataloader(
                dataset=GhostableDataset(base), description="Training", batch_size=per_rank, is_training=True,
                sampler_fn=lambda _: sampler_class(RandomSampler(base), per_rank * world, rank, world, len(base)))

        def get_eval_dataloader(self, eval_dataset=None):
            """Several processes: every rank evaluates the whole test split in the product's batches
            (``batch_size`` examples, in order, as one process does), so every rank computes the
            same losses and the trainer's gathered mean is exactly the one-process eval loss.
            (accelerate's sharding would pad the last batch with repeated examples and average the
            ranks' per-batch means: measured 8.376 vs 8.456 for 12 test examples, batch 32 on 2
            ranks.) It costs each rank the whole evaluation. One process: the trainer's own."""
            if self.accelerator.num_processes <= 1:
                return super().get_eval_dataloader(eval_dataset)
            from torch.utils.data import DataLoader, SequentialSampler

            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            if isinstance(dataset, str):  # a named one of several eval sets
                dataset = self.eval_dataset[dataset]
            batch = self.args.per_device_eval_batch_size * self.accelerator.num_processes
            return DataLoader(dataset, batch_size=batch, sampler=SequentialSampler(dataset),
                              collate_fn=self.data_collator, num_workers=0, pin_memory=False)

        def evaluation_loop(self, *args, **kwargs):
            if self.accelerator.num_processes > 1:
                # Every rank evaluated the whole split (get_eval_dataloader): nothing to gather. (The
                # trainer's gather_for_metrics would also cut the result to the *training* loader's
                # remainder at an epoch's last step: that loader is still the active one.) The
                # trainer puts its own gather function back at the end of the loop.
                self.gather_function = lambda tensors: tensors
            return super().evaluation_loop(*args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs["num_tokens"] = float(self.tokens_seen_all_ranks())
            return super().log(logs, *args, **kwargs)

        def tokens_seen_all_ranks(self) -> int:
            """Real tokens trained on so far by every rank together. A collective with more than
            one process: call it on every rank at the same point (``log`` with a training loss
            is: the trainer gathers the loss of all ranks just before)."""
            return all_ranks_sum(self.real_tokens_seen)

    return PackedTrainer
