"""What the built-in model families share: the shape of a dense decoder checkpoint (its
parameter count computed from the published ``config.json`` numbers), a catalog row, and a
``Family`` that turns rows into ``BaseModelSpec``s with its template (shipped in this package),
context length and stand-in. A family module is then data: a ``Family``, architectures, rows.
No torch: the light services read the catalog."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

from tuneforge.training import ALL_LORA_MODULES, BaseModelSpec, StandinShape, TokenizerRecipe


@dataclasses.dataclass(frozen=True)
class DenseArchitecture:
    """A Llama-style decoder (RMSNorm, grouped-query attention, gated MLP), as its config.json
    gives it. ``qkv_bias``: the q/k/v projections have biases (Qwen2), o_proj never does."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    vocab_size: int
    qkv_bias: bool = False

    @property
    def parameter_count(self) -> int:
        h = self.hidden_size
        kv_dim = h // self.num_attention_heads * self.num_key_value_heads
        attention = 2 * h * h + 2 * h * kv_dim  # q, o + k, v
        if self.qkv_bias:
            attention += h + 2 * kv_dim
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attention + mlp + norms) + embeddings + h  # + final norm


@functools.cache
def packaged_template(resource: str) -> str:
    """A training chat template (``*.jinja``) shipped in this package."""
    return resources.files(__package__).joinpath(resource).read_text(encoding="utf-8")


ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# The stand-ins' tiny size (a family adds its own norm epsilon, rope base, ...): the real
# architecture class and grouped-query attention at a width that trains in seconds on a CPU.
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # 1/sqrt(hidden_size). The usual 0.02 suits widths of ~1k: at width 64 it leaves embedding rows
    # of norm ~0.16, so after the final RMSNorm no logit can move by more than ~1.3 and a LoRA on
    # the attention cannot lower the loss visibly (measured: 8.01 -> 7.68 in 10 steps at lr 1e-2).
    "initializer_range": 0.125,
}


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One row of a family's catalog."""

    id: str
    display_name: str
    source: str  # where the real weights come from (Hugging Face repo id)
    architecture: DenseArchitecture
    description: str
    capabilities: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """What every catalog entry of a family shares: the transformers architecture, the training
    chat template (a ``.jinja`` in this package), the context length, the stand-in's tokenizer
    recipe and tiny config. ``spec(entry)`` turns a row into a ``BaseModelSpec``."""

    name: str  # BaseModelSpec.family
    model_type: str  # transformers model_type of the checkpoints and of the stand-in
    template_resource: str
    context_length: int
    tokenizer: TokenizerRecipe
    standin_config: Mapping[str, Any]
    default_lora_modules: tuple[str, ...] = ATTENTION_MODULES

    def training_chat_template(self) -> str:
        return packaged_template(self.template_resource)

    def standin_shape(self, architecture: DenseArchitecture) -> StandinShape:
        """The real architecture class and tying, at a tiny size, with the family's tokenizer."""
        config = {**self.standin_config, "tie_word_embeddings": architecture.tie_word_embeddings}
        return StandinShape(self.model_type, config, tokenizer=self.tokenizer)

    def spec(self, entry: CatalogEntry) -> BaseModelSpec:
        return BaseModelSpec(
            id=entry.id,
            display_name=entry.display_name,
            description=entry.description,
            family=self.name,
            source=entry.source,
            parameter_count=entry.architecture.parameter_count,
            context_length=self.context_length,
            lora_target_modules=ALL_LORA_MODULES,
            default_lora_target_modules=self.default_lora_modules,
            training_chat_template=self.training_chat_template(),
            capabilities=entry.capabilities,
            standin=self.standin_shape(entry.architecture),
        )
