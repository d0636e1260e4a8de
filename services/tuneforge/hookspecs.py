"""Plugin hooks of tuneforge (pluggy project name ``tuneforge``, entry-point group ``tuneforge``).

A plugin is a module with functions marked ``@hookimpl``. The core passes a ``register`` callback
and validates what it receives: a duplicate name fails loudly.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("tuneforge")
hookimpl = HookimplMarker("tuneforge")


@hookspec
def register_base_models(register):
    "Register base models the trainer can fine-tune (a BaseModelSpec each)."


@hookspec
def register_training_methods(register):
    "Register training methods (SFT, DPO, …): each builds and runs a trainer for a job."
