"""Counting tokens the way the trainer will see them: the base model's chat template rendered
(as transformers renders it) and the fast tokenizer's batch encoder. No torch, no transformers:
``tokenizers`` and ``jinja2`` only."""

from __future__ import annotations

import hashlib
import logging
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tuneforge.dataset_builder import renderers
from tuneforge.training import template_messages

log = logging.getLogger(__name__)
ENCODE_BATCH = 4096
# Bumped when what is rendered changes (2: tool-call arguments rendered from objects), so token
# counts stored under an older rendering are not reused.
RENDERING_VERSION = "render-2"


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks assistant output; counting renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """The same environment transformers uses for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


_SELF_CHECK = ("<|start_header_id|>user<|end_header_id|>\n\n Hello,  world!\n\n\n<|eot_id|>  x\ty\n"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{\"a\": [1, 2]}<|eot_id|>\n")


def _added_token_splitter(tokenizer) -> "re.Pattern | None":
    """A pattern splitting text on the tokenizer's added tokens, or None where counting piece by
    piece could differ from encoding the whole text (tokens that strip neighbouring whitespace
    or match whole words only, normalised added tokens behind a normaliser, a pre-tokeniser
    that treats the first piece specially). A self-check on a sample confirms it."""
    added = list(tokenizer.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    if tokenizer.normalizer is not None and any(t.normalized for t in added):
        return None
    if "Metaspace" in json.dumps(json.loads(tokenizer.to_str()).get("pre_tokenizer")):
        return None  # prepends "▁" to the first piece only
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")")
    sample = _SELF_CHECK + "".join(contents) + " " + " ".join(contents)
    parts = pattern.split(sample)
    pieces = sum(len(tokenizer.encode(p, add_special_tokens=False).ids) for p in parts[0::2] if p)
    if pieces + len(parts) // 2 != len(tokenizer.encode(sample, add_special_tokens=False).ids):
        return None
    return pattern


class TokenCounter:
    """Tokens per universal-format example with one model's tokenizer and chat template."""

    def __init__(self, tokenizer_file: Path, chat_template: str, special: dict[str, str], name: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.template = compile_template(chat_template)
        # The hand-written renderer of exactly this template text (renderers.py), else None: jinja2.
        self.renderer = renderers.for_template(chat_template)
        self.bos = special.get("bos_token") or ""
        self.eos = special.get("eos_token") or ""
        self.name = name
        # Identifies what the counts depend on: stored counts are reused only under the same key.
        digest = hashlib.sha256(Path(tokenizer_file).read_bytes())
        digest.update(chat_template.encode())
        digest.update(f"{self.bos}|{self.eos}".encode())
        digest.update(RENDERING_VERSION.encode())
        self.key = digest.hexdigest()
        self._pieces = _added_token_splitter(self.tokenizer)
        # What a worker process needs to make the same counter (workers.count_texts).
        self.spec = (str(tokenizer_file), chat_template, tuple(sorted(special.items())), name,
                     Path(tokenizer_file).stat().st_mtime_ns)

    @classmethod
    def for_model(cls, model_store: Path, model_id: str, chat_template: str) -> "TokenCounter | None":
        folder = Path(model_store) / model_id
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            return None
        special: dict[str, str] = {}
        config = folder / "tokenizer_config.json"
        if config.exists():
            data = json.loads(config.read_text())
            for key in ("bos_token", "eos_token"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    special[key] = value
        return cls(tokenizer_file, chat_template, special, name=f"{model_id} ({tokenizer_file.parent.name})")

    def _render_messages(self, messages: list[dict[str, Any]], tools: list | None) -> str:
        ready = template_messages(messages)
        if self.renderer is not None:
            try:
                return self.renderer(ready, tools or None, self.bos, self.eos)
            except renderers.Unsupported:  # a shape the renderer was not written for
                pass
        return self.template.render(messages=ready, tools=tools or None, bos_token=self.bos,
                                    eos_token=self.eos, add_generation_prompt=False)

    def texts(self, example: dict[str, Any]) -> list[str]:
        """What the trainer tokenizes for one example (two sequences for a preference pair)."""
        if "messages" in example:
            return [self._render_messages(example["messages"], example.get("tools"))]
        if "text" in example:
            return [self.bos + example["text"] + self.eos]
        prompt = example["input"]["messages"]
        tools = example["input"].get("tools")
        return [self._render_messages(prompt + example["preferred_output"], tools),
                self._render_messages(prompt + example["non_preferred_output"], tools)]

    def _count_texts(self, texts: list[str]) -> list[int]:
        """Token counts of ``texts`` (no special tokens added), batch-encoded.

        With ``_pieces``: a text's count is its number of added tokens plus the counts of the
        pieces between them (the tokenizer splits on added tokens before anything else), and
        the pieces repeat across a dataset (template headers, system prompts, tool
        declarations, role names), so each distinct piece is encoded once."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        if self._pieces is None:
            out: list[int] = []
            for start in range(0, len(texts), ENCODE_BATCH):
                out.extend(len(e) for e in encode(texts[start:start + ENCODE_BATCH], add_special_tokens=False))
            return out
        split = self._pieces.split
        known: dict[str, int] = {}
        todo: list[str] = []
        parts_of = []
        for text in texts:
            parts = split(text)  # [piece, added, piece, added, ..., piece]
            parts_of.append(parts)
            for piece in parts[0::2]:
                if piece and piece not in known:
                    known[piece] = 0
                    todo.append(piece)
        for start in range(0, len(todo), ENCODE_BATCH):
            batch = todo[start:start + ENCODE_BATCH]
            for piece, e in zip(batch, encode(batch, add_special_tokens=False)):
                known[piece] = len(e)  # the number of ids, without building their list
        known[""] = 0
        return [len(parts) // 2 + sum(map(known.__getitem__, parts[0::2])) for parts in parts_of]

    def count_stored(self, examples: Sequence[Any]) -> list[int]:
        """``count`` of stored examples (``builder.StoredExample``): with counting in workers
        switched on (workers.ENV_COUNT), many examples loaded with their canonical texts are
        counted in worker processes, the rest in process."""
        from tuneforge.dataset_builder import workers

        if (workers.counting_in_workers() and len(examples) >= workers.MIN_PARALLEL
                and all(e.canonical_json for e in examples)):
            executor = workers.pool()
            if executor is not None:
                try:
                    return workers.count_in_workers(self.spec, [e.canonical_json for e in examples], executor)
                except Exception:  # a worker died (BrokenProcessPool, ...): count here
                    log.warning("counting in worker processes failed; counting in process", exc_info=True)
                    workers.discard()
        return self.count([e.body for e in examples])

    def count(self, examples: Sequence[dict[str, Any]]) -> list[int]:
        """Token count per example (the longer sequence of a preference pair), batch-encoded."""
        texts: list[str] = []
        owners: list[int] = []
        for i, example in enumerate(examples):
            for text in self.texts(example):
                texts.append(text)
                owners.append(i)
        counts = [0] * len(examples)
        for owner, n in zip(owners, self._count_texts(texts)):
            if n > counts[owner]:
                counts[owner] = n
        return counts
