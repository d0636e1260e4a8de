"""What the built-in model families share: the shape of a dense decoder checkpoint (its
parameter count computed from the published ``config.json`` numbers) and reading a family's
training chat template shipped with this package. No torch: the light services read the catalog."""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources


@dataclasses.dataclass(frozen=True)
class DenseArchitecture:
    """A Llama-style decoder (RMSNorm, grouped-query attention, gated MLP), as its config.json
    gives it. ``qkv_bias``: the q/k/v projections have biases (Qwen2), o_proj never does."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    vocab_size: int
    qkv_bias: bool = False

    @property
    def parameter_count(self) -> int:
        h = self.hidden_size
        kv_dim = h // self.num_attention_heads * self.num_key_value_heads
        attention = 2 * h * h + 2 * h * kv_dim  # q, o + k, v
        if self.qkv_bias:
            attention += h + 2 * kv_dim
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        norms = 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attention + mlp + norms) + embeddings + h  # + final norm


@functools.cache
def packaged_template(resource: str) -> str:
    """A training chat template (``*.jinja``) shipped in this package."""
    return resources.files(__package__).joinpath(resource).read_text(encoding="utf-8")
