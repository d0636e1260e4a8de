"""Llama 3.x family plugin: the catalog entries of Meta's Llama 3.1, 3.2 and 3.3 instruct models.

Declarative: one table of architectures (the published configs), one table of catalog entries,
and small builders that turn them into ``BaseModelSpec``s. Parameter counts are computed from the
architecture (they match the published safetensors totals). No torch here: the light services
import this module to read the catalog.
"""

from __future__ import annotations

import dataclasses

from tuneforge.hookspecs import hookimpl
from tuneforge.training import ALL_LORA_MODULES, BaseModelSpec, StandinShape, TokenizerRecipe
from tuneforge_builtin.catalog import DenseArchitecture, packaged_template

FAMILY = "llama"
MODEL_TYPE = "llama"
TEMPLATE_RESOURCE = "llama3_training.jinja"
LLAMA3_VOCAB_SIZE = 128_256
LLAMA3_CONTEXT_LENGTH = 131_072
DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
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
STANDIN_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    # 1/sqrt(hidden_size). The usual 0.02 suits widths of ~1k: at width 64 it leaves embedding rows
    # of norm ~0.16, so after the final RMSNorm no logit can move by more than ~1.3 and a LoRA on
    # the attention cannot lower the loss visibly (measured: 8.01 -> 7.68 in 10 steps at lr 1e-2).
    "initializer_range": 0.125,
}


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    id: str
    display_name: str
    source: str
    architecture: str  # key of ARCHITECTURES
    capabilities: tuple[str, ...]
    description: str


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "llama-3.1-8b", "Llama 3.1 8B", "meta-llama/Llama-3.1-8B-Instruct", "8b", TOOL_CAPABILITIES,
        "Meta Llama 3.1 8B Instruct: multilingual chat model with function calling, 128k context.",
    ),
    CatalogEntry(
        "llama-3.1-70b", "Llama 3.1 70B", "meta-llama/Llama-3.1-70B-Instruct", "70b", TOOL_CAPABILITIES,
        "Meta Llama 3.1 70B Instruct: large multilingual chat model with function calling, 128k context.",
    ),
    CatalogEntry(
        "llama-3.2-1b", "Llama 3.2 1B", "meta-llama/Llama-3.2-1B-Instruct", "1b", (),
        "Meta Llama 3.2 1B Instruct: lightweight multilingual chat model for on-device use, 128k context.",
    ),
    CatalogEntry(
        "llama-3.2-3b", "Llama 3.2 3B", "meta-llama/Llama-3.2-3B-Instruct", "3b", (),
        "Meta Llama 3.2 3B Instruct: lightweight multilingual chat model, 128k context.",
    ),
    CatalogEntry(
        "llama-3.3-70b", "Llama 3.3 70B", "meta-llama/Llama-3.3-70B-Instruct", "70b", TOOL_CAPABILITIES,
        "Meta Llama 3.3 70B Instruct: text-only 70B chat model with function calling, 128k context.",
    ),
)


def training_chat_template() -> str:
    """The Llama 3 training chat template (with generation markers), shipped with this package."""
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
        context_length=LLAMA3_CONTEXT_LENGTH,
        lora_target_modules=ALL_LORA_MODULES,
        default_lora_target_modules=DEFAULT_LORA_MODULES,
        training_chat_template=training_chat_template(),
        capabilities=entry.capabilities,
        standin=standin_shape(arch),
    )


def specs() -> list[BaseModelSpec]:
    return [build_spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
