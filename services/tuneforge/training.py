"""The data that plugins exchange with the core: base models, training methods, a run's context.

Nothing here imports torch: the light services read the catalog too. A method's ``train`` imports
its heavy stack inside the function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tuneforge.core.hyperparameters import ResolvedHyperparameters

ALL_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")

DATASET_KIND_CONVERSATIONS = "conversations"
DATASET_KIND_PREFERENCES = "preferences"


@dataclasses.dataclass(frozen=True)
class TokenizerRecipe:
    """How a family's tokenizer is put together: the parts a stand-in must reproduce so that chat
    templates, assistant masks and completion masks behave as with the real model.

    ``AutoTokenizer`` may rebuild a family-specific class whatever class was saved (transformers
    5 does so for ``model_type="qwen2"``: NFC normaliser + Qwen's split regex); a recipe for such a
    family must train the BPE with exactly that pipeline, or token ids change silently on reload.

    Two styles of BPE (``style``):

    * ``"byte_level"`` (GPT-2 / tiktoken lineage: Llama 3, Qwen): the text is split with
      ``split_pattern``, then mapped to bytes; every string is representable without an unknown
      token.
    * ``"metaspace"`` (SentencePiece BPE converted to ``tokenizers``: Llama 2, Mistral, Gemma):
      spaces become ``"▁"``, a ``"▁"`` is prepended to the start of the text only (Metaspace
      ``prepend_scheme="first"``, no splitting), characters outside the vocabulary fall back to
      the ``<0x00>``…``<0xFF>`` byte tokens, and decoding strips the prepended space.
      ``split_pattern`` must be empty.

    ``leading_tokens`` take the first ids in the given order (SentencePiece vocabularies start with
    ``<unk>``, ``<s>``, ``</s>`` and control tokens); in the metaspace style the 256 byte tokens
    follow them, then the learned pieces. ``special_tokens`` are appended after the vocabulary.
    """

    split_pattern: str  # pre-tokenisation regex (byte_level: isolated splits, then bytes; metaspace: "")
    special_tokens: tuple[str, ...]  # appended after the BPE vocabulary, in this order
    bos_token: str | None
    eos_token: str  # end of an assistant turn (what chat generation stops on)
    pad_token: str
    stop_tokens: tuple[str, ...]  # every token that ends generation (generation_config)
    prepend_bos: bool = True  # the post-processor puts BOS in front of a plain encode
    normalizer: str | None = None  # a ``tokenizers.normalizers`` class name, e.g. "NFC"
    vocab_size: int = 3000  # BPE vocabulary before the special tokens (metaspace: with the 256 byte tokens)
    unk_token: str | None = None
    # BPE ``ignore_merges``: a word already in the vocabulary is taken whole. Must match what the
    # family's tokenizer class rebuilds on load (Llama 3: true; Qwen2Tokenizer: false).
    ignore_merges: bool = True
    style: str = "byte_level"  # one of TOKENIZER_STYLES
    leading_tokens: tuple[str, ...] = ()  # special tokens at ids 0, 1, … before the vocabulary

    def __post_init__(self) -> None:
        if self.style not in TOKENIZER_STYLES:
            raise ValueError(f"tokenizer style {self.style!r}: expected one of {', '.join(TOKENIZER_STYLES)}")
        if self.style == "metaspace" and self.split_pattern:
            raise ValueError("the metaspace style splits on spaces only: split_pattern must be empty")
        tokens = (*self.leading_tokens, *self.special_tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("a token is listed twice in leading_tokens + special_tokens")
        named = [self.bos_token, self.eos_token, self.pad_token, self.unk_token, *self.stop_tokens]
        missing = sorted({t for t in named if t is not None} - set(tokens))
        if missing:
            raise ValueError(f"{', '.join(missing)} named but not in leading_tokens or special_tokens")


TOKENIZER_STYLES = ("byte_level", "metaspace")


@dataclasses.dataclass(frozen=True)
class StandinShape:
    """How to build a tiny randomly initialised stand-in of a family (tests, quickstart): the
    real architecture class at a tiny size, and the family's tokenizer recipe."""

    model_type: str  # transformers model_type, e.g. "llama"
    config: dict[str, Any]  # extra config kwargs (hidden_size, num_hidden_layers, …)
    tokenizer: TokenizerRecipe | None = None  # None: no stand-in tokenizer can be made


@dataclasses.dataclass(frozen=True)
class BaseModelSpec:
    """One entry of the base-model catalog."""

    id: str  # catalog id, e.g. "llama-3.2-1b"
    display_name: str  # e.g. "Llama 3.2 1B"
    description: str
    family: str  # architecture family, e.g. "llama"
    source: str  # where real weights come from, e.g. a Hugging Face repo id
    parameter_count: int
    context_length: int
    lora_target_modules: tuple[str, ...]  # modules the model has
    default_lora_target_modules: tuple[str, ...]  # selected by default
    training_chat_template: str  # Jinja chat template with {% generation %} markers
    capabilities: tuple[str, ...] = ()  # e.g. ("tool_calling", "planning", "reasoning")
    standin: StandinShape | None = None
    # Entries of ``lora_target_modules`` that are parameters, not nn.Linear modules (e.g. a
    # mixture of experts' fused 3-D weights, "mlp.experts.gate_up_proj"): a LoRA on them goes
    # through peft's ``target_parameters`` instead of ``target_modules``.
    lora_target_parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.default_lora_target_modules) - set(self.lora_target_modules)
        if unknown:
            raise ValueError(f"{self.id}: default LoRA modules {sorted(unknown)} not in the model")
        unknown = set(self.lora_target_parameters) - set(self.lora_target_modules)
        if unknown:
            raise ValueError(f"{self.id}: LoRA target parameters {sorted(unknown)} must be listed in lora_target_modules")
        if not self.id or not self.id.replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"catalog id {self.id!r} must be letters, digits, '-' and '.'")


@dataclasses.dataclass(frozen=True)
class ProgressReport:
    """A training progress point, turned into a ``training.run.progress`` event by the core."""

    step: int
    total_steps: int
    epoch: float
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    """A checkpoint a method kept (directory holds an adapter in safetensors)."""

    step: int
    path: Path
    eval_loss: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    adapter_dir: Path  # final adapter (adapter_config.json + adapter_model.safetensors)
    steps: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    stopped_early: bool
    cancelled: bool = False
    checkpoints: tuple[CheckpointReport, ...] = ()
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # Did it learn? The base model (adapter disabled) against the fine-tuned one on the test split.
    base_eval_loss: float | None = None  # on the same eval batches as eval_loss (SFT)
    tool_call_accuracy: float | None = None  # greedy generations, calls exactly right; None: no tool calls
    base_tool_call_accuracy: float | None = None
    # Greedy answers side by side: dicts with prompt_json, prompt, reference, base_answer, tuned_answer.
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # Real tokens (no padding) this run trained on over all its epochs, since it started or resumed:
    # the same span as its train time, so tokens / seconds is the throughput. None: not counted.
    trained_tokens: int | None = None


@dataclasses.dataclass
class TrainingContext:
    """Everything a method needs for one run. Paths are local directories."""

    job_id: str
    base_model: BaseModelSpec
    model_dir: Path  # Hugging Face layout, loaded with from_pretrained(model_dir)
    train_file: Path  # universal-format JSONL
    test_file: Path
    output_dir: Path  # the method writes checkpoints and the final adapter under it
    hyperparameters: ResolvedHyperparameters
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 42
    report_progress: Callable[[ProgressReport], None] = lambda report: None
    report_checkpoint: Callable[[CheckpointReport], None] = lambda report: None
    should_stop: Callable[[], bool] = lambda: False  # cancel requested: stop at the next step
    resume_from: Path | None = None  # a checkpoint directory to resume from


class TrainingMethod(Protocol):
    """A training method (``sft``, ``dpo``). Register an instance via ``register_training_methods``."""

    name: str
    display_name: str
    dataset_kind: str  # DATASET_KIND_CONVERSATIONS or DATASET_KIND_PREFERENCES

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Return the options with defaults filled in; raise ValueError for bad ones."""

    def train(self, context: TrainingContext) -> TrainingResult:
        """Run the training; heavy imports happen inside."""


def finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The finite numbers of a metrics dict, keys as strings (bools, NaN and inf left out: a
    proto map would carry them, but no reader can use them)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


# ----------------------------------------------------------------------------------------------
# What chat templates are given. The universal format stores tool-call arguments as JSON strings
# (OpenAI's form); the families' templates render them as the model writes them, from objects
# (`arguments | tojson`: {"city": "Paris"}). The trainer and the dataset builder's token counter
# both render through these helpers, so counts and training see the same text.


def _decoded_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**fn, "arguments": arguments}}


def template_messages(messages: Any) -> Any:
    """``messages`` with every tool call's string ``arguments`` decoded to an object (copies;
    anything else, or arguments that are not a JSON object, unchanged)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            message = {**message, "tool_calls": [_decoded_call(c) for c in message["tool_calls"]]}
        out.append(message)
    return out


def template_row(row: dict[str, Any]) -> dict[str, Any]:
    """A universal-format example (conversation, prompt/completion or preference pair) ready for
    a chat template: tool-call arguments as objects."""
    out = dict(row)
    for key in ("messages", "prompt", "completion", "preferred_output", "non_preferred_output", "chosen", "rejected"):
        if isinstance(out.get(key), list):
            out[key] = template_messages(out[key])
    if isinstance(out.get("input"), dict):
        out["input"] = {**out["input"], "messages": template_messages(out["input"].get("messages"))}
    return out
