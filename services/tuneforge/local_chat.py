"""``tuneforge models try``: chat with a fine-tuned model on this machine.

The registry resolves the model (base, adapter checksum, chat template); the adapter comes down
through DownloadModel into a cache under the data directory (kept while its checksum matches);
the base weights come from the local model store; peft attaches the adapter and transformers
streams the answer token by token. Heavy imports (torch, transformers, peft) stay in here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LocalChatError(RuntimeError):
    """Something the user can fix (missing base weights, a corrupt download): one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cached_adapter_dir(cache_root: Path, model_id: str, adapter_sha256: str) -> Path | None:
    """The cached adapter of ``model_id`` if its weights still have ``adapter_sha256``."""
    target = cache_root / model_id
    weights = target / ADAPTER_WEIGHTS
    if weights.is_file() and sha256_of(weights) == adapter_sha256:
        return target
    return None


async def fetch_adapter(clients, resolved, cache_root: Path) -> tuple[Path, bool]:
    """The adapter directory of a resolved model, downloaded unless cached; (dir, downloaded)."""
    from tuneforge import sdk

    cached = cached_adapter_dir(cache_root, resolved.model_id, resolved.adapter_sha256)
    if cached is not None:
        return cached, False
    target = cache_root / resolved.model_id
    partial = cache_root / f".{resolved.model_id}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        await sdk.download_model(clients, resolved.model_id, partial)
        got = sha256_of(partial / ADAPTER_WEIGHTS) if (partial / ADAPTER_WEIGHTS).is_file() else "(missing)"
        if got != resolved.adapter_sha256:
            raise LocalChatError(f"downloaded adapter does not match the registry: sha256 {got[:12]}, "
                                 f"expected {resolved.adapter_sha256[:12]}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, True


def base_model_dir(model_store: Path, base_model: str) -> Path:
    path = model_store / base_model
    if not (path / "config.json").is_file():
        raise LocalChatError(
            f"base model {base_model!r} is not in the model store ({path}): put its weights there first "
            f"(`tuneforge models import {base_model} ...`; `make real-model` for smollm2-135m; "
            f"`tuneforge models make-standin {base_model}` for a random stand-in)")
    from tuneforge.trainer.model_import import UnsafeModelError, check_safe_model_dir

    try:
        check_safe_model_dir(path)  # safetensors only, no pickle files, no remote code
    except UnsafeModelError as exc:
        raise LocalChatError(str(exc)) from None
    return path


class LocalChat:
    """A base model with a LoRA adapter attached, answering a conversation greedily by default."""

    def __init__(self, base_dir: Path, adapter_dir: Path, chat_template: str | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.manual_seed(0)
        self.torch = torch
        hf_logging.disable_progress_bar()  # a chat, not a download log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated name
            self.tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=False,
                                                        use_safetensors=True)
            self.model = PeftModel.from_pretrained(base, adapter_dir).eval()
        # The registry's serving template renders exactly what training saw; else the tokenizer's.
        self.chat_template = chat_template or None

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def stream(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0) -> Iterator[str]:
        """Yield the answer to ``messages`` piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        inputs = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True,
            return_dict=True, return_tensors="pt")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = {"max_new_tokens": max_new_tokens, "streamer": streamer, "eos_token_id": self._stop_ids(),
                   "pad_token_id": self.tokenizer.pad_token_id or self._stop_ids()[0]}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self.torch.inference_mode():
                    self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        **options)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise failure[0]


def converse(chat: LocalChat, turns: Iterator[str], write: Callable[[str], None], *, system: str | None,
             max_new_tokens: int, temperature: float) -> list[dict]:
    """Answer each user turn with the whole conversation so far; returns the conversation."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        pieces = []
        for piece in chat.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature):
            pieces.append(piece)
            write(piece)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
    return messages
