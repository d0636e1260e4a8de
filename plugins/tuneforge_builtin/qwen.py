"""Qwen 2.5 family plugin: the catalog entries of Alibaba's Qwen 2.5 Instruct models.

Declarative, like the Llama plugin: a table of architectures (the published ``config.json``
numbers), a table of catalog entries, the training chat template, the stand-in shape and the
tokenizer recipe. Parameter counts are computed from the architecture (Qwen2 has biases on the
q/k/v projections). No torch here: the light services import this module to read the catalog.
"""

from __future__ import annotations

import dataclasses

from tuneforge.hookspecs import hookimpl
from tuneforge.training import ALL_LORA_MODULES, BaseModelSpec, StandinShape, TokenizerRecipe
from tuneforge_builtin.catalog import DenseArchitecture, packaged_template

FAMILY = "qwen2"
MODEL_TYPE = "qwen2"
TEMPLATE_RESOURCE = "qwen2_5_training.jinja"
QWEN2_5_VOCAB_SIZE = 152_064  # embedding rows of the 7B+ checkpoints (151,665 tokens, padded)
QWEN2_5_CONTEXT_LENGTH = 32_768  # max_position_embeddings (131,072 only with YaRN scaling)
DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CAPABILITIES = ("tool_calling",)


def architecture(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, *, tie_word_embeddings: bool,
                 vocab_size: int = QWEN2_5_VOCAB_SIZE) -> DenseArchitecture:
    """A Qwen2 checkpoint's shape (from its config.json): biases on q/k/v."""
    return DenseArchitecture(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                             num_key_value_heads, tie_word_embeddings, vocab_size=vocab_size, qkv_bias=True)


ARCHITECTURES: dict[str, DenseArchitecture] = {
    "14b": architecture(5120, 13824, 48, 40, 8, tie_word_embeddings=False),
    "72b": architecture(8192, 29568, 80, 64, 8, tie_word_embeddings=False),
}

# What Qwen2Tokenizer rebuilds on load for model_type "qwen2", whatever class was saved: NFC,
# then this split (single digits, unlike Llama 3's 1-3), then byte-level; BPE without
# ignore_merges; no BOS. A stand-in trained with any other pipeline changes ids on reload.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The real Qwen 2.5 added tokens the template and generation use (ids 151643...).
TOKENIZER = TokenizerRecipe(
    split_pattern=QWEN2_SPLIT_PATTERN,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    prepend_bos=False,
    normalizer="NFC",
    ignore_merges=False,
)

# The stand-in keeps the real architecture class (q/k/v biases) and tying, at a tiny size.
STANDIN_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "use_sliding_window": False,
    "initializer_range": 0.125,  # see the Llama plugin: 0.02 leaves a tiny model unable to learn
}


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    id: str
    display_name: str
    source: str
    architecture: str  # key of ARCHITECTURES
    description: str


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "qwen-2.5-14b", "Qwen 2.5 14B", "Qwen/Qwen2.5-14B-Instruct", "14b",
        "Alibaba Qwen 2.5 14B Instruct: multilingual chat model with tool calling, 32k context.",
    ),
    CatalogEntry(
        "qwen-2.5-72b", "Qwen 2.5 72B", "Qwen/Qwen2.5-72B-Instruct", "72b",
        "Alibaba Qwen 2.5 72B Instruct: large multilingual chat model with tool calling, 32k context.",
    ),
)


def training_chat_template() -> str:
    """The Qwen 2.5 training chat template (with generation markers), shipped with this package."""
    return packaged_template(TEMPLATE_RESOURCE)


def standin_shape(arch: DenseArchitecture, tokenizer: TokenizerRecipe = TOKENIZER) -> StandinShape:
    return StandinShape(MODEL_TYPE, {**STANDIN_BASE_CONFIG, "tie_word_embeddings": arch.tie_word_embeddings},
                        tokenizer=tokenizer)


def build_spec(entry: CatalogEntry) -> BaseModelSpec:
    arch = ARCHITECTURES[entry.architecture]
    return BaseModelSpec(
        id=entry.id,
        display_name=entry.display_name,
        description=entry.description,
        family=FAMILY,
        source=entry.source,
        parameter_count=arch.parameter_count,
        context_length=QWEN2_5_CONTEXT_LENGTH,
        lora_target_modules=ALL_LORA_MODULES,
        default_lora_target_modules=DEFAULT_LORA_MODULES,
        training_chat_template=training_chat_template(),
        capabilities=CAPABILITIES,
        standin=standin_shape(arch),
    )


def specs() -> list[BaseModelSpec]:
    return [build_spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
