"""Trainer pools: which workers can hold a job, and the work subject each pool's items go to.

A *pool* is a class of trainer worker by what it can hold: ``small`` (any worker, a CPU one
included), ``gpu-24g`` (one GPU of at least 24 GB), ``gpu-80g`` (one of at least 80 GB),
``gpu-4x80g`` and ``gpu-8x80g`` (4 or 8 of them: the job trains as that many FSDP processes).
The job-scheduler sizes a job when it queues it (:func:`pool_for`: the smallest pool whose
memory holds the estimate, a single GPU before several) and publishes its work item on the
pool's subject (:func:`work_subject`); every worker takes items from each pool its hardware holds
(:func:`pools_for_hardware`), or from the pools an operator names (``TUNEFORGE_TRAINER_POOLS``,
:func:`parse_pool_list`). So a 70B job only ever reaches a machine that can hold it, and waits in
QUEUED (with the reason) while no such machine is registered.

The memory estimate (:func:`estimate_training_memory`) is for LoRA training as tuneforge does it,
in bytes, all devices together:

* frozen base weights: 2 bytes a parameter in bf16; with the method option ``quantization`` =
  ``"4bit"`` (QLoRA: NF4 with double quantisation) ~0.5625 bytes a parameter (4 bits + the
  quantisation constants), the embeddings and the LM head staying in bf16;
* the adapter: LoRA parameters (rank × (in + out) per targeted module and layer) at 16 bytes each
  (fp32 weight, gradient, and Adam's two moments);
* activations with gradient checkpointing (the trainer turns it on for every GPU pool,
  :func:`needs_gradient_checkpointing`; the method option ``gradient_checkpointing`` overrides it): each layer's bf16 input is kept (2 bytes × hidden a
  token a layer) and one layer at a time is recomputed (~34 bytes × hidden a token: Korthikanti
  et al. 2022, with a fused attention that keeps no sequence² scores);
* logits: bf16 logits plus their fp32 copy for the loss, 6 bytes × vocabulary a token (an upper
  bound: the packed trainer computes them only where the loss is);
* +10 % for allocator fragmentation. The CUDA context and communication buffers are not training
  memory: a pool's capacity is its GPUs' memory less ``PROCESS_OVERHEAD_GIB`` each.

The tokens of one forward pass: ``batch_size`` examples of the dataset's 95th-percentile length
(at least its longest example; DPO: chosen and rejected, twice that), capped at the packed
trainer's ``MAX_TOKENS_PER_FORWARD`` (16,384: a bigger batch trains as several forwards) and at
the context length. Without token counts (no tokenizer, or ValidateJob without a dry run)
``DEFAULT_EXAMPLE_TOKENS`` an example is assumed, and the basis says so.

What is sized: a model in the model store that is a stand-in (``tuneforge_standin.json`` beside
its ``config.json``) by its real, tiny size (its safetensors headers and config), so the
quickstart and the tests route to ``small``; any other model by its catalog entry's parameter
count, with hidden size, layers and vocabulary from its ``config.json`` when the store holds one
(estimated from the parameter count otherwise).

No torch here: the job-scheduler and the trainer both use it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024 ** 3
STANDIN_MARKER = "tuneforge_standin.json"  # = trainer.standin.STANDIN_MARKER (no trainer import here)
PROCESS_OVERHEAD_GIB = 1.5  # per GPU: CUDA context, cuBLAS/NCCL workspaces; not training memory
FRAGMENTATION = 1.10
DEFAULT_EXAMPLE_TOKENS = 1024  # tokens an example, assumed without the dataset's token counts
MAX_TOKENS_PER_FORWARD = 16384  # = tuneforge_builtin.packed.MAX_TOKENS_PER_FORWARD's default
DEFAULT_VOCAB = 128_256  # without a config.json: Llama 3's (at most; see model_size)
BF16_BYTES = 2.0
NF4_BYTES = 0.5625  # 4 bits + double-quantised block constants (~0.127 bits) + slack
LORA_STATE_BYTES = 16  # fp32 weight, gradient, Adam m and v
CHECKPOINT_BYTES = 2  # bf16 layer input kept per layer (gradient checkpointing)
LAYER_BYTES = 34  # one layer's activations while it is recomputed (per token per hidden unit)
LOGIT_BYTES = 6  # bf16 logits + fp32 copy for the cross-entropy
ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


@dataclasses.dataclass(frozen=True)
class Pool:
    """A class of trainer worker by what it can hold."""

    name: str
    gpus: int  # GPUs a worker of the pool has; 0: any worker, a CPU one included
    gpu_memory_gb: int  # nominal memory of each (what the description says); 0 for ``small``
    min_reported_gib: float  # what each GPU must report (an "80 GB" A100 reports 79.2 GiB)
    capacity_gib: float  # training memory a worker of the pool holds, all its devices together
    description: str

    @property
    def processes(self) -> int:
        """Processes (one a GPU) a job of this pool trains as."""
        return max(1, self.gpus)


def _gpu_pool(name: str, gpus: int, nominal_gb: int, min_reported_gib: float) -> Pool:
    what = "1 GPU" if gpus == 1 else f"{gpus} GPUs"
    each = "" if gpus == 1 else " each"
    return Pool(name, gpus, nominal_gb, min_reported_gib,
                capacity_gib=gpus * (min_reported_gib - PROCESS_OVERHEAD_GIB),
                description=f"{what} with at least {nominal_gb} GB{each}" + (" (FSDP)" if gpus > 1 else ""))


SMALL = Pool("small", 0, 0, 0.0, capacity_gib=6.0,
             description="any worker, a CPU one included (training needs at most 6 GiB)")
# Smallest first: pool_for takes the first that holds the job (one GPU before several).
POOLS: tuple[Pool, ...] = (
    SMALL,
    _gpu_pool("gpu-24g", 1, 24, 22.0),  # A10G/L4 report ~22.2-22.5 GiB, RTX 3090/4090 24 GiB
    _gpu_pool("gpu-80g", 1, 80, 78.0),  # A100/H100 80 GB report 79.1-80 GiB; H200 141 GiB
    _gpu_pool("gpu-4x80g", 4, 80, 78.0),
    _gpu_pool("gpu-8x80g", 8, 80, 78.0),
)
POOLS_BY_NAME = {p.name: p for p in POOLS}
POOL_NAMES = tuple(POOLS_BY_NAME)


def get_pool(name: str) -> Pool:
    try:
        return POOLS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown trainer pool {name!r}; the pools are {', '.join(POOL_NAMES)}") from None


def processes_for_pool(name: str) -> int:
    """Processes (GPUs) a job of pool ``name`` trains as; 1 for an unknown or empty name."""
    pool = POOLS_BY_NAME.get(name)
    return pool.processes if pool else 1


def work_subject(pool: str) -> str:
    """The work-queue subject of ``pool``'s items: ``tuneforge.training.run.requested.<pool>``."""
    from tuneforge.core import subjects

    return subjects.work_subject(get_pool(pool).name)


def largest_first(names: Iterable[str]) -> list[str]:
    """``names`` from the pool that holds most to the one that holds least (a big machine takes
    big jobs first)."""
    order = {name: i for i, name in enumerate(POOL_NAMES)}
    return sorted(set(names), key=lambda n: order.get(n, -1), reverse=True)


# ----------------------------------------------------------------------------------------------
# Which pools a worker serves.


def pools_for_hardware(device_count: int, device_memory_bytes: int) -> list[str]:
    """Every pool a worker with ``device_count`` GPUs of ``device_memory_bytes`` each (the smallest
    of them) can hold, smallest first; a CPU worker (no GPU, or memory unknown): ``["small"]``."""
    if device_count < 1 or device_memory_bytes <= 0:
        return [SMALL.name]
    gib = device_memory_bytes / GIB
    return [SMALL.name] + [p.name for p in POOLS if p.gpus and p.gpus <= device_count and gib >= p.min_reported_gib]


def parse_pool_list(text: str) -> list[str]:
    """``TUNEFORGE_TRAINER_POOLS``: pool names, comma-separated (spaces ignored), each known;
    ValueError naming the bad ones and the valid ones otherwise. Order kept, repeats dropped."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in POOLS_BY_NAME]
    if unknown:
        raise ValueError(f"TUNEFORGE_TRAINER_POOLS={text!r}: unknown pool(s) {', '.join(map(repr, unknown))}; "
                         f"the pools are {', '.join(POOL_NAMES)} (comma-separated)")
    if not names:
        raise ValueError(f"TUNEFORGE_TRAINER_POOLS={text!r} names no pool; the pools are {', '.join(POOL_NAMES)} "
                         "(leave it unset for the pools the hardware holds)")
    return list(dict.fromkeys(names))


def worker_pools(configured: str | None, device_count: int, device_memory_bytes: int) -> list[str]:
    """The pools a worker takes work from: ``configured`` (the setting) when set, else the pools
    its hardware holds."""
    if configured and configured.strip():
        return parse_pool_list(configured)
    return pools_for_hardware(device_count, device_memory_bytes)


# ----------------------------------------------------------------------------------------------
# Sizing a job.


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model, and where each number came from."""

    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int
    intermediate_size: int
    tied_embeddings: bool
    source: str  # e.g. "catalog", "stand-in in the model store"
    dims_source: str  # e.g. "config.json", "estimated from the parameter count"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    adapter: float
    activations: float
    logits: float
    total: float  # bytes, fragmentation included

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def _read_config(model_dir: Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text_config = config.get("text_config")  # multimodal checkpoints keep the decoder's numbers there
    return text_config if isinstance(text_config, dict) else config if isinstance(config, dict) else None


def safetensors_parameters(model_dir: Path) -> int:
    """Parameters in the ``*.safetensors`` files of ``model_dir``, from their headers only."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"{path.name}: implausible safetensors header ({length} bytes)")
            header = json.loads(fh.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor.get("shape") or [1])
    return total


def _estimated_dims(parameters: int) -> tuple[int, int]:
    """Hidden size and layers of a dense decoder of ``parameters``: P ≈ 12·L·h² with L ≈ h/128
    (Llama 3 8B: 4,408 / 34 for 4,096 / 32; 70B: 9,095 / 71 for 8,192 / 80)."""
    hidden = max(64, round((max(parameters, 1) * 128 / 12) ** (1 / 3)))
    layers = max(1, round(parameters / (12 * hidden * hidden)))
    return hidden, layers


def model_size(spec: Any, model_store: Path | None) -> ModelSize:
    """The size of catalog entry ``spec`` (a ``BaseModelSpec``) for the estimate: a stand-in in
    ``model_store`` by its own files, anything else by the catalog (dimensions from the store's
    ``config.json`` when there is one)."""
    model_dir = Path(model_store) / spec.id if model_store is not None else None
    config = _read_config(model_dir)
    standin = model_dir is not None and config is not None and (model_dir / STANDIN_MARKER).is_file()
    parameters, source = spec.parameter_count, "catalog"
    if standin:
        try:
            counted = safetensors_parameters(model_dir)
        except (OSError, ValueError, struct.error):
            counted = 0
        if counted:
            parameters, source = counted, "stand-in in the model store"
    hidden, layers = _estimated_dims(parameters)
    dims_source = "estimated from the parameter count"
    # A vocabulary whose embeddings would be more than a third of the model is not plausible
    # (SmolLM2-135M: 21 %, Llama 3.2 1B: 21 %): small models get a smaller assumed one.
    vocab = min(DEFAULT_VOCAB, max(1000, parameters // (3 * hidden)))
    intermediate, tied = 0, False
    if config is not None:
        try:
            hidden = int(config.get("hidden_size") or hidden)
            layers = int(config.get("num_hidden_layers") or layers)
            vocab = int(config.get("vocab_size") or vocab)
            intermediate = int(config.get("intermediate_size") or 0)
            tied = bool(config.get("tie_word_embeddings", False))
            dims_source = "config.json"
        except (TypeError, ValueError):
            pass
    return ModelSize(parameters=parameters, hidden_size=hidden, layers=layers, vocab_size=vocab,
                     intermediate_size=intermediate or round(3.5 * hidden), tied_embeddings=tied,
                     source=source, dims_source=dims_source)


def quantization_of(method_options_json: str) -> str:
    """The method option ``quantization`` ("none" or "4bit"; anything unreadable: "none" — the
    method validates its options, this only sizes)."""
    try:
        options = json.loads(method_options_json or "{}")
    except ValueError:
        return "none"
    value = options.get("quantization") if isinstance(options, dict) else None
    return "4bit" if isinstance(value, str) and value.strip().lower() == "4bit" else "none"


def tokens_per_forward(batch_size: int, *, p95_tokens: int = 0, longest_tokens: int = 0,
                       context_length: int = 0, sequences_per_example: int = 1) -> tuple[int, bool]:
    """Tokens of one forward pass, and whether the example length was assumed (no counts)."""
    assumed = longest_tokens <= 0
    longest = DEFAULT_EXAMPLE_TOKENS if assumed else longest_tokens
    if context_length > 0:
        longest = min(longest, context_length)
    typical = min(max(p95_tokens, 1), longest) if not assumed and p95_tokens > 0 else longest
    one = longest * sequences_per_example  # the longest example goes through whole, alone if need be
    batch = max(1, batch_size) * typical * sequences_per_example
    return max(one, min(batch, MAX_TOKENS_PER_FORWARD)), assumed


def _lora_parameters(size: ModelSize, rank: int, modules: Sequence[str]) -> int:
    h, inter = size.hidden_size, size.intermediate_size
    per_layer = 0
    for name in modules or ATTENTION_MODULES:
        per_layer += 2 * h if name in ATTENTION_MODULES else h + inter
    return size.layers * max(1, rank) * per_layer


def estimate_training_memory(size: ModelSize, *, tokens: int, quantization: str = "none", lora_rank: int = 8,
                             lora_modules: Sequence[str] = ()) -> MemoryEstimate:
    """Bytes LoRA training of ``size`` needs, all devices together (see the module's text)."""
    embedding = size.vocab_size * size.hidden_size * (1 if size.tied_embeddings else 2)
    if quantization == "4bit":
        embedding = min(embedding, size.parameters)
        weights = (size.parameters - embedding) * NF4_BYTES + embedding * BF16_BYTES
    else:
        weights = size.parameters * BF16_BYTES
    adapter = _lora_parameters(size, lora_rank, lora_modules) * LORA_STATE_BYTES
    activations = tokens * size.hidden_size * (CHECKPOINT_BYTES * size.layers + LAYER_BYTES)
    logits = tokens * size.vocab_size * LOGIT_BYTES
    total = (weights + adapter + activations + logits) * FRAGMENTATION
    return MemoryEstimate(weights, adapter, activations, logits, total)


@dataclasses.dataclass(frozen=True)
class Sizing:
    """What :func:`pool_for` decided, with the figures behind it."""

    pool: Pool
    need_gib: float
    basis: str
    estimate: MemoryEstimate
    size: ModelSize

    def __iter__(self):  # pool, need_gib, basis = pool_for(...)
        return iter((self.pool, self.need_gib, self.basis))


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def pool_for(spec: Any, *, model_store: Path | None = None, method: str = "sft", method_options_json: str = "{}",
             batch_size: int = 8, lora_rank: int = 8, lora_modules: Sequence[str] = (),
             dataset: Any = None) -> Sizing:
    """The pool a job on catalog entry ``spec`` needs: the smallest whose capacity holds the
    estimate (``pool, need_gib, basis = pool_for(...)``). ``dataset`` is the job's
    ``DatasetSummary`` (its token counts), when known."""
    size = model_size(spec, model_store)
    train_tokens = getattr(dataset, "train_tokens", None)
    p95 = int(getattr(train_tokens, "p95", 0) or 0)
    longest = int(getattr(train_tokens, "max", 0) or 0)
    tokens, assumed = tokens_per_forward(batch_size, p95_tokens=p95, longest_tokens=longest,
                                         context_length=spec.context_length,
                                         sequences_per_example=2 if method == "dpo" else 1)
    quantization = quantization_of(method_options_json)
    estimate = estimate_training_memory(size, tokens=tokens, quantization=quantization, lora_rank=lora_rank,
                                        lora_modules=lora_modules or getattr(spec, "default_lora_target_modules", ()))
    need = estimate.total_gib
    chosen = next((p for p in POOLS if need <= p.capacity_gib), None)
    beyond = ""
    if chosen is None:
        chosen = POOLS[-1]
        beyond = f"; more than the largest pool holds ({chosen.capacity_gib:,.0f} GiB): it may not fit"
    length = (f"{DEFAULT_EXAMPLE_TOKENS:,} tokens an example assumed (no token counts)" if assumed
              else f"longest example {longest:,} tokens, 95th percentile {p95:,}")
    basis = (f"{size.parameters:,} parameters ({size.source}), "
             f"{'4-bit QLoRA' if quantization == '4bit' else 'bf16 LoRA'} r{lora_rank}, "
             f"{tokens:,} tokens a forward ({length}), hidden {size.hidden_size:,} × {size.layers} layers, "
             f"vocabulary {size.vocab_size:,} ({size.dims_source}): weights {_gib(estimate.weights)} + adapter "
             f"and optimizer {_gib(estimate.adapter)} + activations {_gib(estimate.activations)} (gradient "
             f"checkpointing) + logits {_gib(estimate.logits)} GiB, +{FRAGMENTATION - 1:.0%} = {need:,.1f} GiB; "
             f"{chosen.name} holds {chosen.capacity_gib:,.1f} GiB{beyond}")
    return Sizing(chosen, need, basis, estimate, size)


GRADIENT_CHECKPOINTING_OPTION = "gradient_checkpointing"  # the sft/dpo method option (trl_common)


def needs_gradient_checkpointing(pool: str) -> bool:
    """Whether a job routed to ``pool`` trains with gradient checkpointing (the method option's
    default on the worker): every GPU pool is sized with it on (:func:`estimate_training_memory`);
    ``small`` (CPU workers, stand-ins, models of a few GiB), an unsized item (``""``) and one
    queued by the previous release (``legacy``) train without it, as before."""
    return pool in POOLS_BY_NAME and pool != "small"


def waiting_reason(pool: str) -> str:
    """A QUEUED job's ``state_reason`` while no worker of its pool is registered."""
    described = POOLS_BY_NAME.get(pool)
    what = f" ({described.description})" if described else ""
    return f"waiting for a trainer of pool {pool}{what}: no worker of that pool is registered"
