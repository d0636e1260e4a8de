"""Stand-in tokenizers in both recipe styles: byte-level BPE and SentencePiece-style metaspace BPE.

Family-free: the recipes and the catalog entry are made up here. A stand-in is written with
``make_standin`` and reloaded with ``AutoTokenizer``, as the trainer loads it.
"""

from __future__ import annotations

import json

import pytest

from tuneforge.training import BaseModelSpec, StandinShape, TokenizerRecipe

LEADING = ("<unk>", "<s>", "</s>", "<ctl_a>", "<ctl_b>")
TEXTS = (
    "Hello, world!",
    "The weather in Paris is sunny today.",
    'Call {"name": "get_weather", "arguments": {"city": "Oslo"}} now.',
    "def f(x):\n    return x ** 2\n",
    "café 東京 🙂 tabs\tand\r\nCRLF",
    "Line one.\n\nLine two.\n",
)


def metaspace_recipe(**overrides) -> TokenizerRecipe:
    values = dict(
        split_pattern="", style="metaspace", leading_tokens=LEADING, special_tokens=("<extra>",),
        bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>", stop_tokens=("</s>",),
        vocab_size=1500,
    )
    values.update(overrides)
    return TokenizerRecipe(**values)


def spec_with(recipe: TokenizerRecipe, model_id: str) -> BaseModelSpec:
    return BaseModelSpec(
        id=model_id, display_name=model_id, description="test", family="llama", source="none/none",
        parameter_count=1, context_length=512, lora_target_modules=("q_proj",),
        default_lora_target_modules=("q_proj",), training_chat_template="{{ bos_token }}",
        standin=StandinShape("llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 1,
                                       "max_position_embeddings": 512}, tokenizer=recipe),
    )


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory):
    from tuneforge.trainer.standin import make_standin

    return make_standin(spec_with(metaspace_recipe(), "metaspace-test"), tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def metaspace(metaspace_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(metaspace_dir))


def test_metaspace_vocabulary_layout(metaspace):
    from tuneforge.trainer.standin import BYTE_TOKENS

    vocab = metaspace.get_vocab()
    assert [vocab[t] for t in LEADING] == list(range(len(LEADING)))
    assert [vocab[t] for t in BYTE_TOKENS] == list(range(len(LEADING), len(LEADING) + 256))
    assert vocab["<extra>"] == len(metaspace) - 1  # special_tokens come after the vocabulary
    learned = [t for t, i in vocab.items() if len(LEADING) + 256 <= i < vocab["<extra>"]]
    assert 1000 < len(learned) <= 1500 - 256
    assert any(t.startswith("\u2581") for t in learned)
    # SentencePiece never merges across a space: "▁" only ever starts a piece
    assert not [t for t in learned if "\u2581" in t[1:]]
    assert metaspace.bos_token == "<s>" and metaspace.eos_token == "</s>"
    assert metaspace.unk_token == "<unk>" and metaspace.pad_token_id == 0


def test_metaspace_reload_matches_the_saved_tokenizer(metaspace, metaspace_dir):
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(metaspace_dir / "tokenizer.json"))
    assert json.loads(saved.to_str())["pre_tokenizer"]["type"] == "Metaspace"
    assert json.loads(saved.to_str())["model"]["byte_fallback"] is True
    for text in TEXTS:
        ids = metaspace.encode(text, add_special_tokens=False)
        assert ids == saved.encode(text, add_special_tokens=False).ids, text
        assert metaspace.decode(ids) == text
    for token in (*LEADING, "<extra>"):
        assert metaspace.encode(token, add_special_tokens=False) == [metaspace.convert_tokens_to_ids(token)]
    assert metaspace.encode("Hello")[0] == metaspace.bos_token_id  # prepend_bos: BOS on a plain encode


def test_metaspace_prepends_to_the_start_only_and_falls_back_to_bytes(metaspace):
    pieces = metaspace.convert_ids_to_tokens(metaspace.encode("Hello world", add_special_tokens=False))
    assert pieces[0].startswith("\u2581")  # the "▁" prepended to the text's start
    assert "".join(pieces) == "\u2581Hello\u2581world"
    after_special = metaspace.convert_ids_to_tokens(metaspace.encode("<ctl_a>Hello", add_special_tokens=False))
    assert after_special[0] == "<ctl_a>" and "".join(after_special[1:]) == "Hello"  # not prepended mid-text
    spaced = metaspace.convert_ids_to_tokens(metaspace.encode("<ctl_a> Hello", add_special_tokens=False))
    assert "".join(spaced[1:]) == "\u2581Hello"
    # characters the corpus never showed fall back to their UTF-8 bytes
    assert metaspace.convert_ids_to_tokens(metaspace.encode("<ctl_a>東", add_special_tokens=False)) == [
        "<ctl_a>", "<0xE6>", "<0x9D>", "<0xB1>"]
    # offsets point back at the original text, the space included (assistant masks rely on it)
    enc = metaspace("<ctl_a> Hello world", add_special_tokens=False, return_offsets_mapping=True)
    text = "<ctl_a> Hello world"
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text


def test_metaspace_tokenizer_is_deterministic():
    from tuneforge.trainer.standin import _train_tokenizer, builtin_corpus

    corpus = builtin_corpus(1500)
    assert _train_tokenizer(metaspace_recipe(), corpus).to_str() == _train_tokenizer(metaspace_recipe(), corpus).to_str()


def test_byte_level_style_puts_leading_tokens_first(tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.trainer.standin import make_standin

    recipe = TokenizerRecipe(
        split_pattern=r"\s*[\r\n]+|\s?\p{L}+|\s?\p{N}+|\s?[^\s\p{L}\p{N}]+|\s+", leading_tokens=("<pad>",),
        special_tokens=("<bos>", "<eos>"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        stop_tokens=("<eos>",), vocab_size=800,
    )
    assert recipe.style == "byte_level"
    tok = AutoTokenizer.from_pretrained(str(make_standin(spec_with(recipe, "byte-level-test"), tmp_path)))
    assert tok.convert_tokens_to_ids("<pad>") == 0
    assert tok.convert_tokens_to_ids(["<bos>", "<eos>"]) == [len(tok) - 2, len(tok) - 1]
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize(("overrides", "message"), [
    ({"style": "wordpiece"}, "tokenizer style 'wordpiece'"),
    ({"split_pattern": r"\s+"}, "split_pattern must be empty"),
    ({"eos_token": "<eot>", "stop_tokens": ("<eot>",)}, "<eot> named but not in"),
    ({"special_tokens": ("<s>",)}, "listed twice"),
])
def test_recipe_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        metaspace_recipe(**overrides)
