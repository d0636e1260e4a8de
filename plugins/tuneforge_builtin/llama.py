"""Llama 3.x family plugin: the catalog entries of Meta's Llama 3.1, 3.2 and 3.3 instruct models.

Declarative: one table of architectures (the published configs), the family (template, context,
stand-in, tokenizer recipe) and one table of catalog entries; ``catalog.Family.spec`` turns a row
into a ``BaseModelSpec``. Parameter counts are computed from the
architecture (they match the published safetensors totals). No torch here: the light services
import this module to read the catalog.
"""

from __future__ import annotations

from tuneforge.hookspecs import hookimpl
from tuneforge.training import BaseModelSpec, TokenizerRecipe
from tuneforge_builtin.catalog import TINY_DECODER, CatalogEntry, DenseArchitecture, Family

MODEL_TYPE = "llama"
TEMPLATE_RESOURCE = "llama3_training.jinja"
LLAMA3_VOCAB_SIZE = 128_256
LLAMA3_CONTEXT_LENGTH = 131_072
TOOL_CAPABILITIES = ("tool_calling", "planning")


def architecture(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, *, tie_word_embeddings: bool) -> DenseArchitecture:
    """A Llama 3 checkpoint's shape (from its config.json): no biases, Llama 3's vocabulary."""
    return DenseArchitecture(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                             num_key_value_heads, tie_word_embeddings, vocab_size=LLAMA3_VOCAB_SIZE)


ARCHITECTURES: dict[str, DenseArchitecture] = {
    "1b": architecture(2048, 8192, 16, 32, 8, tie_word_embeddings=True),
    "3b": architecture(3072, 8192, 28, 24, 8, tie_word_embeddings=True),
    "8b": architecture(4096, 14336, 32, 32, 8, tie_word_embeddings=False),
    "70b": architecture(8192, 28672, 80, 64, 8, tie_word_embeddings=False),
}

# Llama 3's pre-tokenisation regex (tiktoken cl100k style). `\s*[\r\n]+` keeps runs of newlines
# together wherever they occur, so "\n\n" tokenises alike mid-text and at the end of a prompt.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The real Llama 3 tokenizer's special tokens that the chat template and generation use, in the
# order of the real vocabulary (ids 128000...).
TOKENIZER = TokenizerRecipe(
    split_pattern=LLAMA3_SPLIT_PATTERN,
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
)

# The stand-in keeps the real architecture class and tying, at a tiny size.
STANDIN_BASE_CONFIG = {**TINY_DECODER, "rms_norm_eps": 1e-5}

FAMILY = Family("llama", MODEL_TYPE, TEMPLATE_RESOURCE, LLAMA3_CONTEXT_LENGTH, TOKENIZER, STANDIN_BASE_CONFIG)
ARCH = ARCHITECTURES  # short for the table below

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "llama-3.1-8b", "Llama 3.1 8B", "meta-llama/Llama-3.1-8B-Instruct", ARCH["8b"],
        "Meta Llama 3.1 8B Instruct: multilingual chat model with function calling, 128k context.",
        TOOL_CAPABILITIES,
    ),
    CatalogEntry(
        "llama-3.1-70b", "Llama 3.1 70B", "meta-llama/Llama-3.1-70B-Instruct", ARCH["70b"],
        "Meta Llama 3.1 70B Instruct: large multilingual chat model with function calling, 128k context.",
        TOOL_CAPABILITIES,
    ),
    CatalogEntry(
        "llama-3.2-1b", "Llama 3.2 1B", "meta-llama/Llama-3.2-1B-Instruct", ARCH["1b"],
        "Meta Llama 3.2 1B Instruct: lightweight multilingual chat model for on-device use, 128k context.",
    ),
    CatalogEntry(
        "llama-3.2-3b", "Llama 3.2 3B", "meta-llama/Llama-3.2-3B-Instruct", ARCH["3b"],
        "Meta Llama 3.2 3B Instruct: lightweight multilingual chat model, 128k context.",
    ),
    CatalogEntry(
        "llama-3.3-70b", "Llama 3.3 70B", "meta-llama/Llama-3.3-70B-Instruct", ARCH["70b"],
        "Meta Llama 3.3 70B Instruct: text-only 70B chat model with function calling, 128k context.",
        TOOL_CAPABILITIES,
    ),
)


def specs() -> list[BaseModelSpec]:
    return [FAMILY.spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
