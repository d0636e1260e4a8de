"""Loading plugins: built-ins and third-party ones through the same entry-point group.

``TUNEFORGE_LOAD_PLUGINS=name1,name2`` loads only the named entry points (empty string: none).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib.metadata import entry_points

import pluggy

from tuneforge import hookspecs
from tuneforge.training import BaseModelSpec, TrainingMethod

ENTRY_POINT_GROUP = "tuneforge"


class PluginError(RuntimeError):
    """A plugin registered something invalid (duplicate name, wrong type)."""


@dataclasses.dataclass
class Registry:
    """What the loaded plugins registered."""

    base_models: dict[str, BaseModelSpec]
    methods: dict[str, TrainingMethod]
    plugin_names: list[str]
    model_plugins: dict[str, str] = dataclasses.field(default_factory=dict)  # catalog id -> plugin name
    method_plugins: dict[str, str] = dataclasses.field(default_factory=dict)  # method name -> plugin name

    def base_model(self, model_id: str) -> BaseModelSpec:
        return self.base_models[model_id]

    def method(self, name: str) -> TrainingMethod:
        return self.methods[name]


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("tuneforge")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        only = os.environ.get("TUNEFORGE_LOAD_PLUGINS")
        if only is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            wanted = {name.strip() for name in only.split(",") if name.strip()}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in wanted and pm.get_plugin(ep.name) is None:
                    pm.register(ep.load(), name=ep.name)
    pm.check_pending()
    return pm


def collect(pm: pluggy.PluginManager) -> Registry:
    base_models: dict[str, BaseModelSpec] = {}
    methods: dict[str, TrainingMethod] = {}
    model_plugins: dict[str, str] = {}
    method_plugins: dict[str, str] = {}

    def register_base_model(spec: BaseModelSpec, plugin: str) -> None:
        if not isinstance(spec, BaseModelSpec):
            raise PluginError(f"plugin {plugin!r}: register_base_models expects BaseModelSpec, got {type(spec).__name__}")
        if spec.id in base_models:
            raise PluginError(f"base model {spec.id!r} is registered twice (by {model_plugins[spec.id]!r} and {plugin!r})")
        base_models[spec.id] = spec
        model_plugins[spec.id] = plugin

    def register_method(method: TrainingMethod, plugin: str) -> None:
        for attr in ("name", "display_name", "dataset_kind", "train", "validate_options"):
            if not hasattr(method, attr):
                raise PluginError(f"plugin {plugin!r}: training method {method!r} lacks {attr!r}")
        if method.name in methods:
            raise PluginError(f"training method {method.name!r} is registered twice "
                              f"(by {method_plugins[method.name]!r} and {plugin!r})")
        methods[method.name] = method
        method_plugins[method.name] = plugin

    # Each implementation is called with a register bound to its plugin's name, so the catalog
    # can say which plugin brought a model (pluggy's own call order: last registered first).
    for hook, register in ((pm.hook.register_base_models, register_base_model),
                           (pm.hook.register_training_methods, register_method)):
        for impl in reversed(hook.get_hookimpls()):
            impl.function(register=functools.partial(register, plugin=impl.plugin_name))
    names = sorted(name for name, _ in pm.list_name_plugin() if name)
    return Registry(base_models=base_models, methods=methods, plugin_names=names,
                    model_plugins=model_plugins, method_plugins=method_plugins)


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry of installed plugins."""
    return collect(make_plugin_manager())


def base_model_messages(base_model: str = "") -> list:
    """The installed base catalog as ``common.v1.BaseModel`` messages by id (``base_model``: that
    one only): what ListBaseModels (job-scheduler) and ListModels' catalog (model-registry) send."""
    from tuneforge.api.common.v1 import common_pb2

    registry = get_registry()
    return [
        common_pb2.BaseModel(
            id=s.id, display_name=s.display_name, description=s.description, family=s.family,
            parameter_count=s.parameter_count, context_length=s.context_length,
            lora_target_modules=s.lora_target_modules, default_lora_target_modules=s.default_lora_target_modules,
            capabilities=s.capabilities, source=s.source, plugin=registry.model_plugins.get(s.id, ""),
        )
        for s in sorted(registry.base_models.values(), key=lambda s: s.id)
        if not base_model or s.id == base_model
    ]
