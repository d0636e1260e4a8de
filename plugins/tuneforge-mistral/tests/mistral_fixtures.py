"""Fixtures shared by the tuneforge-mistral tests: the plugin's catalog entries and their tiny random
stand-ins (built locally, no download, once per session).

Not a ``conftest.py``: tuneforge's own tests do ``from conftest import ...``, and a second
``conftest`` module on ``sys.path`` would shadow theirs when both suites run in one session. Each
test module imports the fixtures it uses from here.
"""

from __future__ import annotations

import pytest

MISTRAL = "mistral-7b-instruct"
MIXTRAL = "mixtral-8x7b-instruct"

_built: dict[str, object] = {}  # fixtures imported into several modules still build once


@pytest.fixture(scope="session")
def mistral_specs():
    """The plugin's ``BaseModelSpec``s by catalog id."""
    import tuneforge_mistral

    return {spec.id: spec for spec in tuneforge_mistral.specs()}


@pytest.fixture(scope="session")
def standin_dirs(mistral_specs, tmp_path_factory):
    """Both stand-ins, written by the core's ``make_standin``."""
    if "dirs" not in _built:
        from tuneforge.trainer.standin import make_standin

        store = tmp_path_factory.mktemp("mistral-store")
        _built["dirs"] = {model_id: make_standin(spec, store, seed=0) for model_id, spec in mistral_specs.items()}
    return _built["dirs"]


@pytest.fixture(scope="session")
def standin_tokenizers(standin_dirs):
    """Each stand-in's tokenizer as the trainer loads it (``AutoTokenizer.from_pretrained``)."""
    if "tokenizers" not in _built:
        from transformers import AutoTokenizer

        _built["tokenizers"] = {model_id: AutoTokenizer.from_pretrained(str(path))
                                for model_id, path in standin_dirs.items()}
    return _built["tokenizers"]


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    barriers stall on descheduled threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
