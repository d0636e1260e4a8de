"""Qwen 2.5 family plugin: the catalog entries of Alibaba's Qwen 2.5 Instruct models.

Declarative, like the Llama plugin: a table of architectures (the published ``config.json``
numbers), a table of catalog entries, the training chat template, the stand-in shape and the
tokenizer recipe. Parameter counts are computed from the architecture (Qwen2 has biases on the
q/k/v projections). No torch here: the light services import this module to read the catalog.
"""

from __future__ import annotations

from tuneforge.hookspecs import hookimpl
from tuneforge.training import BaseModelSpec, TokenizerRecipe
from tuneforge_builtin.catalog import TINY_DECODER, CatalogEntry, DenseArchitecture, Family

MODEL_TYPE = "qwen2"
TEMPLATE_RESOURCE = "qwen2_5_training.jinja"
QWEN2_5_VOCAB_SIZE = 152_064  # embedding rows of the 7B+ checkpoints (151,665 tokens, padded)
QWEN2_5_CONTEXT_LENGTH = 32_768  # max_position_embeddings (131,072 only with YaRN scaling)
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
STANDIN_BASE_CONFIG = {**TINY_DECODER, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "use_sliding_window": False}

FAMILY = Family("qwen2", MODEL_TYPE, TEMPLATE_RESOURCE, QWEN2_5_CONTEXT_LENGTH, TOKENIZER, STANDIN_BASE_CONFIG)

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "qwen-2.5-14b", "Qwen 2.5 14B", "Qwen/Qwen2.5-14B-Instruct", ARCHITECTURES["14b"],
        "Alibaba Qwen 2.5 14B Instruct: multilingual chat model with tool calling, 32k context.", CAPABILITIES,
    ),
    CatalogEntry(
        "qwen-2.5-72b", "Qwen 2.5 72B", "Qwen/Qwen2.5-72B-Instruct", ARCHITECTURES["72b"],
        "Alibaba Qwen 2.5 72B Instruct: large multilingual chat model with tool calling, 32k context.",
        CAPABILITIES,
    ),
)


def specs() -> list[BaseModelSpec]:
    return [FAMILY.spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
