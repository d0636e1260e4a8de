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
from tuneforge.training import BaseModelSpec, TokenizerRecipe
from tuneforge_builtin import llama, qwen
from tuneforge_builtin.catalog import CatalogEntry, Family

FAMILY_NAME = "deepseek-r1-distill"
TEMPLATE_RESOURCE = "deepseek_r1_training.jinja"
CONTEXT_LENGTH = 131_072  # max_position_embeddings of all three distills
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


# One family name, two bases: the architecture class, stand-in and tokenizer pipeline are the
# base's, the template and context length DeepSeek's.
LLAMA_BASED = dataclasses.replace(llama.FAMILY, name=FAMILY_NAME, template_resource=TEMPLATE_RESOURCE,
                                  context_length=CONTEXT_LENGTH, tokenizer=LLAMA_TOKENIZER)
QWEN_BASED = dataclasses.replace(qwen.FAMILY, name=FAMILY_NAME, template_resource=TEMPLATE_RESOURCE,
                                 context_length=CONTEXT_LENGTH, tokenizer=QWEN_TOKENIZER)

CATALOG: tuple[tuple[Family, CatalogEntry], ...] = (
    (LLAMA_BASED, CatalogEntry(
        "deepseek-r1-distill-llama-70b", "Deepseek R1 - Llama 3.3 70B Distil",
        "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", llama.ARCHITECTURES["70b"],
        "DeepSeek R1 reasoning distilled into Llama 3.3 70B Instruct: thinks in <think> blocks, 128k context.",
        CAPABILITIES,
    )),
    (QWEN_BASED, CatalogEntry(
        "deepseek-r1-distill-qwen-1.5b", "Deepseek R1 - Qwen 1.5B Distill",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", QWEN_MATH_1_5B,
        "DeepSeek R1 reasoning distilled into Qwen 2.5 Math 1.5B: small reasoning model, 128k context.",
        CAPABILITIES,
    )),
    (QWEN_BASED, CatalogEntry(
        "deepseek-r1-distill-qwen-14b", "Deepseek R1 - Qwen 14B Distill",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", qwen.ARCHITECTURES["14b"],
        "DeepSeek R1 reasoning distilled into Qwen 2.5 14B: reasoning model, 128k context.", CAPABILITIES,
    )),
)


def specs() -> list[BaseModelSpec]:
    return [family.spec(entry) for family, entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
