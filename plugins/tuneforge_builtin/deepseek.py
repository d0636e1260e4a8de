"""DeepSeek R1 distills plugin: R1 reasoning distilled into Llama 3.3 70B and Qwen 2.5 models.

The architectures are the base models' (the Llama and Qwen plugins' tables); the tokenizer keeps
the base vocabulary with DeepSeek's special tokens, and the chat template is DeepSeek's
(``<｜User｜>``/``<｜Assistant｜>`` turns). For training, reasoning stays in the trained turn (see
``deepseek_r1_training.jinja``): an assistant message's ``reasoning`` field or a ``<think>`` block
in its content. No torch here: the light services import this module to read the catalog.
"""

from __future__ import annotations

import dataclasses

from tuneforge.hookspecs import hookimpl
from tuneforge.training import ALL_LORA_MODULES, BaseModelSpec, StandinShape, TokenizerRecipe
from tuneforge_builtin import llama, qwen
from tuneforge_builtin.catalog import DenseArchitecture, packaged_template

FAMILY = "deepseek-r1-distill"
TEMPLATE_RESOURCE = "deepseek_r1_training.jinja"
CONTEXT_LENGTH = 131_072  # max_position_embeddings of all three distills
DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CAPABILITIES = ("reasoning",)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# The tokens DeepSeek added to both bases' vocabularies (the template and generation use them).
DEEPSEEK_TOKENS = (
    BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)

# Llama-based: Llama 3's byte-level pipeline. Qwen-based: the pipeline Qwen2Tokenizer rebuilds
# on load (NFC, Qwen's split, no ignore_merges). Both put BOS in front (add_bos_token).
LLAMA_TOKENIZER = TokenizerRecipe(
    split_pattern=llama.LLAMA3_SPLIT_PATTERN,
    special_tokens=DEEPSEEK_TOKENS,
    bos_token=BOS,
    eos_token=EOS,
    pad_token=PAD,
    stop_tokens=(EOS,),
)
QWEN_TOKENIZER = dataclasses.replace(
    qwen.TOKENIZER, special_tokens=("<|endoftext|>", *DEEPSEEK_TOKENS), bos_token=BOS, eos_token=EOS,
    pad_token=PAD, stop_tokens=(EOS,), prepend_bos=True,
)

QWEN_MATH_1_5B = qwen.architecture(1536, 8960, 28, 12, 2, tie_word_embeddings=False, vocab_size=151_936)


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    id: str
    display_name: str
    source: str
    base: str  # "llama" or "qwen2": whose architecture, stand-in and tokenizer pipeline
    architecture: DenseArchitecture
    description: str


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "deepseek-r1-distill-llama-70b", "Deepseek R1 - Llama 3.3 70B Distil",
        "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama", llama.ARCHITECTURES["70b"],
        "DeepSeek R1 reasoning distilled into Llama 3.3 70B Instruct: thinks in <think> blocks, 128k context.",
    ),
    CatalogEntry(
        "deepseek-r1-distill-qwen-1.5b", "Deepseek R1 - Qwen 1.5B Distill",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2", QWEN_MATH_1_5B,
        "DeepSeek R1 reasoning distilled into Qwen 2.5 Math 1.5B: small reasoning model, 128k context.",
    ),
    CatalogEntry(
        "deepseek-r1-distill-qwen-14b", "Deepseek R1 - Qwen 14B Distill",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "qwen2", qwen.ARCHITECTURES["14b"],
        "DeepSeek R1 reasoning distilled into Qwen 2.5 14B: reasoning model, 128k context.",
    ),
)


def training_chat_template() -> str:
    """The R1 distill training chat template (with generation markers), shipped with this package."""
    return packaged_template(TEMPLATE_RESOURCE)


def standin_shape(entry: CatalogEntry) -> StandinShape:
    if entry.base == "llama":
        return llama.standin_shape(entry.architecture, tokenizer=LLAMA_TOKENIZER)
    return qwen.standin_shape(entry.architecture, tokenizer=QWEN_TOKENIZER)


def build_spec(entry: CatalogEntry) -> BaseModelSpec:
    return BaseModelSpec(
        id=entry.id,
        display_name=entry.display_name,
        description=entry.description,
        family=FAMILY,
        source=entry.source,
        parameter_count=entry.architecture.parameter_count,
        context_length=CONTEXT_LENGTH,
        lora_target_modules=ALL_LORA_MODULES,
        default_lora_target_modules=DEFAULT_LORA_MODULES,
        training_chat_template=training_chat_template(),
        capabilities=CAPABILITIES,
        standin=standin_shape(entry),
    )


def specs() -> list[BaseModelSpec]:
    return [build_spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
