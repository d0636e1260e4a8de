"""Plugins: built-ins load through entry points; registration is validated; hooks are documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from tuneforge import hookspecs
from tuneforge.hookspecs import hookimpl
from tuneforge.plugins import PluginError, collect, get_registry, make_plugin_manager
from tuneforge.training import BaseModelSpec


def test_builtins_register_llama_and_sft():
    registry = get_registry()
    assert {"llama", "sft"} <= set(registry.plugin_names)
    spec = registry.base_model("llama-3.2-1b")
    assert spec.family == "llama" and spec.display_name == "Llama 3.2 1B"
    assert set(spec.default_lora_target_modules) <= set(spec.lora_target_modules)
    assert "{% generation %}" in spec.training_chat_template
    assert registry.method("sft").dataset_kind == "conversations"
    assert "tool_calling" in registry.base_model("llama-3.1-8b").capabilities
    assert "tool_calling" in registry.base_model("llama-3.3-70b").capabilities


def test_every_hook_is_documented_with_register_signature():
    hooks = [f for name, f in vars(hookspecs).items() if name.startswith("register_")]
    assert len(hooks) == 2
    for hook in hooks:
        assert inspect.getdoc(hook), hook.__name__
        assert list(inspect.signature(hook).parameters) == ["register"]


def _spec(model_id: str) -> BaseModelSpec:
    return BaseModelSpec(
        id=model_id, display_name=model_id, description="", family="test", source="x/y",
        parameter_count=1, context_length=128, lora_target_modules=("q_proj",),
        default_lora_target_modules=("q_proj",), training_chat_template="{% generation %}{% endgeneration %}",
    )


def test_inline_plugin_registers_and_duplicates_fail():
    class Extra:
        @hookimpl
        def register_base_models(self, register):
            register(_spec("extra-model"))

    pm = make_plugin_manager()
    pm.register(Extra(), name="extra")
    try:
        assert "extra-model" in collect(pm).base_models

        class Clash:
            @hookimpl
            def register_base_models(self, register):
                register(_spec("llama-3.2-1b"))

        pm.register(Clash(), name="clash")
        with pytest.raises(PluginError, match="registered twice"):
            collect(pm)
    finally:
        for name in ("extra", "clash"):
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def register_base_modles(self, register):  # noqa: D401 - deliberate typo
            pass

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Typo())
    with pytest.raises(Exception, match="unknown hook"):
        pm.check_pending()


def test_wrong_type_is_refused():
    class Bad:
        @hookimpl
        def register_base_models(self, register):
            register({"id": "dict-not-spec"})

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Bad())
    with pytest.raises(PluginError, match="BaseModelSpec"):
        collect(pm)


def test_load_plugins_env_selects_entry_points():
    code = "from tuneforge.plugins import get_registry as g; r = g(); print(sorted(r.base_models), sorted(r.methods))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TUNEFORGE_LOAD_PLUGINS": "sft"}).stdout
    assert out.strip() == "[] ['sft']"
