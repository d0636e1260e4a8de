"""Tiny randomly initialised stand-ins of catalog models (tests, quickstart; no download).

``make_standin(spec, store_dir)`` writes ``store_dir/<catalog id>/`` in Hugging Face layout: a
config with the real architecture (``spec.standin.model_type``) shrunk to ``spec.standin.config``,
random weights in safetensors, and a BPE tokenizer trained here on a built-in corpus. The tokenizer
follows the family's recipe (byte-level or SentencePiece-style metaspace BPE, pre-tokenisation
regex, special tokens and where their ids go, BOS handling)
so that chat templates, assistant masks and completion masks behave as with the real model.
``tuneforge_standin.json`` marks the directory as a random stand-in.

Module-level imports stay light (``tokenizers``, torch and transformers load inside the function).
Everything family-specific comes from the plugin: ``spec.standin`` names the architecture and
carries the ``TokenizerRecipe``, so a new family needs no edit here.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tuneforge.training import BaseModelSpec, TokenizerRecipe

STANDIN_MARKER = "tuneforge_standin.json"
STANDIN_NOTE = "randomly initialised stand-in, not real weights"

# ---------------------------------------------------------------------------------------------
# Built-in corpus: varied English, JSON snippets, code and chat-prompt boilerplate. Generated with
# a fixed RNG so the vocabulary is the same for every seed (the seed changes the weights only).

_SUBJECTS = (
    "The assistant", "A customer", "Our team", "The model", "My neighbour", "The weather service",
    "This function", "The user", "Every student", "The manager", "A small company", "The library",
    "The support agent", "Your order", "The database", "The travel agent", "The doctor", "Maria",
    "John", "The research group", "The city council", "A developer", "The printer", "The report",
)
_VERBS = (
    "checks", "returns", "books", "explains", "summarises", "calculates", "finds", "sends",
    "updates", "reads", "writes", "cancels", "schedules", "translates", "answers", "plans",
    "recommends", "compares", "orders", "deletes", "creates", "searches for", "confirms", "lists",
)
_OBJECTS = (
    "the weather in Paris", "a table for two", "the latest invoice", "the meeting notes",
    "a flight to Tokyo", "the shortest route", "the total price", "an email to the team",
    "the account balance", "a short poem", "the error message", "the delivery date",
    "three options", "the user's question", "the temperature in Celsius", "a summary of the book",
    "the exchange rate", "the list of files", "a reminder for tomorrow", "the opening hours",
    "the population of Canada", "a recipe with tomatoes", "the next train", "the project plan",
)
_ADVERBS = (
    "quickly", "carefully", "again", "today", "before noon", "every Monday", "without delay",
    "in detail", "politely", "step by step", "as soon as possible", "for the second time",
)
_QUESTIONS = (
    "What is the weather like in {city} today?", "Can you book a table for {n} people at {time}?",
    "How many days are there until {month} {day}?", "Please convert {n} euros to dollars.",
    "Who wrote the book about {topic}?", "Could you summarise this article in {n} sentences?",
    "What time does the store in {city} open?", "Why is the sky blue?",
    "Write a haiku about {topic}.", "Is it going to rain in {city} tomorrow?",
    "What's the capital of {country}?", "I'd like to cancel my order #{id}.",
    "How do I reverse a list in Python?", "Explain {topic} to a five-year-old.",
)
_ANSWERS = (
    "Sure! Here is what I found.", "The answer is {n}.", "It will be sunny in {city} with {n} degrees.",
    "I've booked the table for {time}.", "Your order #{id} has been cancelled.",
    "The capital of {country} is {city}.", "Of course. First, open the file; then read each line.",
    "I'm sorry, I can't help with that.", "Here are {n} ideas you might like:",
    "Yes, it's likely to rain in the afternoon.", "Let me check that for you.",
)
_CITIES = ("Paris", "Tokyo", "Berlin", "Lagos", "Lima", "Oslo", "Cairo", "Toronto", "Sydney", "Madrid")
_COUNTRIES = ("France", "Japan", "Germany", "Nigeria", "Peru", "Norway", "Egypt", "Canada", "Spain")
_TOPICS = ("photosynthesis", "black holes", "the ocean", "autumn", "gravity", "bread", "music")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_KEYS = ("name", "parameters", "arguments", "city", "location", "unit", "date", "query", "id",
         "status", "result", "temperature", "items", "price", "currency", "count", "type",
         "function", "description", "properties", "required", "email", "time", "value")
_WORDS = tuple("""
about above accept account across action activity actually add address admit adult affect after
again against agency agent agree ahead allow almost alone along already also although always
amount analysis animal another answer anyone anything appear apply approach area argue around
arrive article artist assume attack attention audience author available avoid away baby back bad
bank base beautiful because become bed before begin behaviour behind believe benefit best better
between beyond big bill billion bird black blood blue board body book born both box boy break bring
brother budget build building business buy call camera campaign cancer candidate capital car card
care career carry case catch cause cell center central century certain chair challenge chance
change character charge check child choice choose church citizen claim class clear close coach cold
collection college colour come commercial common community company compare computer concern
condition conference consider consumer contain continue control cost could country couple course
court cover create crime cultural culture cup current customer cut dark data daughter dead deal
death debate decade decide decision deep defence degree democratic describe design despite detail
determine develop difference different difficult dinner direction director discover discuss disease
doctor dog door down draw dream drive drop drug during early east easy economic economy edge
education effect effort eight either election else employee energy enjoy enough enter entire
environment especially establish evening event ever everybody everyone everything evidence exactly
example executive exist expect experience expert explain eye face fact factor fail fall family far
fast father fear federal feel feeling few field fight figure fill film final finally financial find
fine finger finish fire firm first fish five floor fly focus follow food foot force foreign forget
form former forward four free friend front full fund future game garden gas general generation girl
give glass goal good government great green ground group grow growth guess gun guy hair half hand
hang happen happy hard have head health hear heart heat heavy help here herself high himself history
hold home hope hospital hot hotel hour house however huge human hundred husband idea identify image
imagine impact important improve include including increase indeed indicate individual industry
information inside instead institution interest interesting international interview into
investment involve issue item itself join just keep kill kind kitchen know knowledge land language
large last late later laugh lawyer lead leader learn least leave left legal less letter level lie
life light like likely line list listen little live local long look lose loss lot love low machine
magazine main maintain major majority make manage management many market marriage material matter
maybe mean measure media medical meet meeting member memory mention message method middle might
military million mind minute miss mission model modern moment money month more morning most mother
mouth move movement movie much music must myself name nation national natural nature near nearly
necessary need network never news newspaper next nice night none nor north note nothing notice
number occur offer office officer official often once only onto open operation opportunity option
order organization other others outside over own owner page pain painting paper parent part
participant particular particularly partner party pass past patient pattern pay peace people per
perform performance perhaps period person personal phone physical pick picture piece place plan
plant play player point police policy political politics poor popular population position positive
possible power practice prepare present president pressure pretty prevent price private probably
problem process produce product production professional professor program project property protect
prove provide public pull purpose push put quality question quickly quite race radio raise range
rate rather reach ready real reality realize really reason receive recent recently recognize record
reduce reflect region relate relationship religious remain remember remove report represent require
research resource respond response responsibility rest result return reveal rich right rise risk
road rock role room rule run safe same save scene school science scientist score sea season seat
second section security seek seem sell send senior sense series serious serve service seven
several shake share shoot short shot should shoulder show side sign significant similar simple
simply since sing single sister sit site situation six size skill skin small smile social society
soldier some somebody someone something sometimes son song soon sort sound source south southern
space speak special specific speech spend sport spring staff stage stand standard star start state
statement station stay step still stock stop store story strategy street strong structure student
study stuff style subject success successful such suddenly suffer suggest summer support sure
surface system table take talk task teach teacher team technology television tell ten tend term
test than thank theory there these thing think third those though thought thousand threat three
through throughout throw thus together tonight total tough toward town trade traditional training
travel treat treatment tree trial trip trouble true truth try turn type under understand unit until
upon usually value various very victim view violence visit voice vote wait walk wall want watch
water weapon wear week weight well west western what whatever when where whether which while white
whole whom whose wide wife will win wind window wish within without woman wonder word work worker
world worry would write writer wrong yard yeah year yes yet young yourself
""".split())
_FUNCS = ("get_weather", "search_web", "book_table", "send_email", "get_time", "convert_currency",
          "lookup_order", "create_event", "list_files", "calculate")
_BOILERPLATE = (
    "You are a helpful assistant.",
    "Environment: ipython",
    "Cutting Knowledge Date: December 2023",
    "Today Date: 26 Jul 2024",
    "You have access to the following functions. To call a function, please respond with JSON "
    "for a function call.",
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
    "its value}.Do not use variables.",
    "system", "user", "assistant", "ipython", "tool",
)
_CODE = (
    "def {f}(x, y):\n    return x + y\n",
    "for i in range({n}):\n    print(i * {n})\n",
    "if value is None:\n    raise ValueError(\"missing value\")\n",
    "import json\n\ndata = json.loads(text)\nprint(data[\"{k}\"])\n",
    "class {F}:\n    def __init__(self):\n        self.items = []\n",
    "result = [x ** 2 for x in numbers if x % 2 == 0]\n",
    "with open(\"notes.txt\", \"w\") as f:\n    f.write(\"hello world\\n\")\n",
    "SELECT name, price FROM products WHERE price > {n} ORDER BY price;\n",
    "const total = items.reduce((a, b) => a + b.price, 0);\n",
)


def _fill(rng: random.Random, template: str) -> str:
    return template.format(
        city=rng.choice(_CITIES), country=rng.choice(_COUNTRIES), topic=rng.choice(_TOPICS),
        month=rng.choice(_MONTHS), day=rng.randint(1, 28), n=rng.randint(1, 500),
        time=f"{rng.randint(1, 12)}:{rng.choice(('00', '15', '30', '45'))} pm", id=rng.randint(1000, 99999),
        f=rng.choice(_FUNCS), F=rng.choice(_FUNCS).title().replace("_", ""), k=rng.choice(_KEYS),
    )


def _json_snippet(rng: random.Random) -> str:
    keys = rng.sample(_KEYS, rng.randint(1, 4))
    value_makers = (
        lambda: rng.choice(_CITIES), lambda: rng.randint(0, 1000), lambda: round(rng.random() * 100, 2),
        lambda: rng.choice((True, False, None)), lambda: [rng.randint(0, 9) for _ in range(3)],
        lambda: {"unit": rng.choice(("celsius", "fahrenheit"))},
    )
    obj = {k: rng.choice(value_makers)() for k in keys}
    if rng.random() < 0.5:
        obj = {"name": rng.choice(_FUNCS), "parameters": obj}
    return json.dumps(obj, indent=rng.choice((None, None, 4)))


def builtin_corpus(n_lines: int = 6000) -> list[str]:
    """A deterministic, varied text corpus for training stand-in tokenizers."""
    rng = random.Random(1234)
    lines: list[str] = list(_BOILERPLATE) * 20
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.2:
            words = rng.choices(_WORDS, k=rng.randint(4, 14))
            words[0] = words[0].capitalize() if rng.random() < 0.7 else words[0]
            text = " ".join(words) + rng.choice((".", ".", "?", "!", ",", ":", ";"))
        elif kind < 0.35:
            text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBS)}."
        elif kind < 0.55:
            text = _fill(rng, rng.choice(_QUESTIONS))
        elif kind < 0.7:
            text = _fill(rng, rng.choice(_ANSWERS))
        elif kind < 0.85:
            text = _json_snippet(rng)
        else:
            text = _fill(rng, rng.choice(_CODE))
        text += rng.choice(("", "\n", "\n\n", " ", "\n  "))
        lines.append(text)
    return lines


# ---------------------------------------------------------------------------------------------


METASPACE = "\u2581"  # "▁", SentencePiece's visible space
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece byte-fallback pieces


def _normalizer(name: str):
    from tokenizers import normalizers

    return getattr(normalizers, name)()


def _byte_level_bpe(recipe: "TokenizerRecipe", corpus: list[str]):
    """GPT-2 style: regex split, then bytes mapped to printable characters; no unknown token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=recipe.ignore_merges))
    if recipe.normalizer:
        tok.normalizer = _normalizer(recipe.normalizer)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(recipe.split_pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size + len(recipe.leading_tokens),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(recipe.leading_tokens),  # the trainer puts these at ids 0, 1, …
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _metaspace_bpe(recipe: "TokenizerRecipe", corpus: list[str]):
    """SentencePiece BPE as ``tokenizers`` holds it after conversion (what transformers'
    ``LlamaConverter`` writes for Llama 2 / Mistral): spaces become "▁", one "▁" is prepended to
    the start of the text only, unknown characters fall back to byte tokens, and the decoder
    undoes all three. Ids: ``leading_tokens``, the 256 byte tokens, then the learned pieces.

    Trained with splitting on "▁" (as SentencePiece never merges across a space), used without
    it (as the converted tokenizers are); the two agree because no learned piece has an inner
    "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trainee = Tokenizer(models.BPE())
    if recipe.normalizer:
        trainee.normalizer = _normalizer(recipe.normalizer)
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=max(1, recipe.vocab_size - len(BYTE_TOKENS)),
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
    )
    trainee.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(trainee.to_str())["model"]

    vocab: dict[str, int] = {}
    for piece in (*recipe.leading_tokens, *BYTE_TOKENS):
        vocab.setdefault(piece, len(vocab))
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=recipe.unk_token, fuse_unk=True,
                               byte_fallback=True))
    if recipe.normalizer:
        tok.normalizer = _normalizer(recipe.normalizer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return tok


def _train_tokenizer(recipe: "TokenizerRecipe", corpus: Iterable[str]):
    """Train the BPE of ``recipe`` (its ``style``) on ``corpus``; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, processors

    if recipe.style == "metaspace":
        tok = _metaspace_bpe(recipe, list(corpus))
    else:
        tok = _byte_level_bpe(recipe, list(corpus))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (*recipe.leading_tokens, *recipe.special_tokens)])
    if recipe.prepend_bos and recipe.bos_token:
        bos_id = tok.token_to_id(recipe.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{recipe.bos_token}:0 $A:0",
            pair=f"{recipe.bos_token}:0 $A:0 {recipe.bos_token}:1 $B:1",
            special_tokens=[(recipe.bos_token, bos_id)],
        )
    elif recipe.style == "metaspace":
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def make_standin(
    spec: "BaseModelSpec",
    store_dir: Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a tiny random model shaped like ``spec`` to ``store_dir/spec.id`` and return that path.

    Deterministic for a given ``seed`` and ``corpus`` (weights and tokenizer; the marker file
    records the creation time). Replaces an existing directory of the same name.
    """
    if spec.standin is None:
        raise ValueError(f"{spec.id}: the catalog entry declares no stand-in shape")
    model_type = spec.standin.model_type
    recipe = spec.standin.tokenizer
    if recipe is None:
        raise ValueError(f"{spec.id}: the catalog entry's stand-in shape has no tokenizer recipe")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    store_dir = Path(store_dir).resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    target = store_dir / spec.id

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(recipe, builtin_corpus() if corpus is None else corpus),
        bos_token=recipe.bos_token,
        eos_token=recipe.eos_token,
        pad_token=recipe.pad_token,
        **({"unk_token": recipe.unk_token} if recipe.unk_token else {}),
        clean_up_tokenization_spaces=False,
        model_max_length=int(spec.standin.config.get("max_position_embeddings", spec.context_length)),
    )
    tokenizer.chat_template = spec.training_chat_template
    tok_id = tokenizer.convert_tokens_to_ids
    bos_id = tok_id(recipe.bos_token) if recipe.bos_token else None
    stop_ids = [tok_id(t) for t in recipe.stop_tokens]
    pad_id = tok_id(recipe.pad_token)

    config = AutoConfig.for_model(
        model_type,
        **{
            **spec.standin.config,
            "vocab_size": len(tokenizer),
            "bos_token_id": bos_id,
            "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0],
            "pad_token_id": pad_id,
        },
    )
    previous_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(previous_rng)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=stop_ids, pad_token_id=pad_id, do_sample=False
    )

    staging = Path(tempfile.mkdtemp(prefix=f".{spec.id}.", dir=store_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "standin": True,
            "catalog_id": spec.id,
            "family": spec.family,
            "model_type": model_type,
            "source_of_real_weights": spec.source,
            "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": STANDIN_NOTE,
        }
        (staging / STANDIN_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_standin(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a stand-in written by :func:`make_standin`."""
    return (Path(model_dir) / STANDIN_MARKER).is_file()
