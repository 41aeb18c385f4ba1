"""A rank starts without torch._dynamo, which torch.optim imports although only a compile needs it.

torch.optim (torch 2.14) imports torch._dynamo the first time an optimizer is built or stepped,
for two calls that do nothing outside torch.compile: `torch._dynamo.disable(fn)` on its own
methods (never compile these) and `torch._dynamo.graph_break()` around `step()`. The import
costs about 1.3 s of CPU, a third of a rank's start on this machine (torch itself is as much);
a job pays it on every rank at every start and requeue, and the test suite about 450 times.
PyTorch removed other unconditional imports of it for the same reason (pytorch/pytorch#162595,
"Don't unconditionally import torch._dynamo, it's slow"); optimizers still do.

`defer_dynamo()` puts a stand-in at `sys.modules["torch._dynamo"]` that answers those two calls
as dynamo does outside a compile (and `trace_rules.clear_lru_cache()`, which
`torch.distributed.init_process_group` calls on whatever module holds that name). It imports the
real module the moment anything else is asked of it (`torch.compile`, a user's code, torchvision's
ops, any other attribute), which then replaces the stand-in for good. Nothing changes meaning: a
compile cannot run before the real module is there, and a function disabled through the stand-in
asks the real module to disable it from then on.
`hvcodistill.optim` calls it on import (before any optimizer is built); where the real module is
already loaded it does nothing. `HVCODISTILL_DEFER_DYNAMO=0` turns it off.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types

NAME = "torch._dynamo"


class DeferredDynamo(types.ModuleType):
    """torch._dynamo until something needs more than disable() and graph_break()."""

    def __init__(self):
        super().__init__(NAME, __doc__)
        self.trace_rules = _TraceRules()

    def __getattr__(self, name: str):
        # a module's dunders that tools probe (inspect.getmodule asks every module for __file__)
        # are not a use of dynamo; __path__ is: a submodule is being imported
        if name.startswith("__") and name.endswith("__") and name not in ("__path__", "__all__"):
            raise AttributeError(name)
        return getattr(real_dynamo(), name)

    def graph_break(self) -> None:
        module = sys.modules.get(NAME)
        if module is not None and module is not self:
            module.graph_break()

    def disable(self, fn=None, recursive: bool = True, **kwargs):
        if fn is None:  # the decorator form, disable(recursive=False)
            return lambda f: self.disable(f, recursive, **kwargs)
        disabled = None

        @functools.wraps(fn)
        def call(*args, **kw):
            nonlocal disabled
            if disabled is None:
                module = sys.modules.get(NAME)
                if module is None or isinstance(module, DeferredDynamo):
                    return fn(*args, **kw)  # no dynamo, so nothing can be compiling
                disabled = module.disable(fn, recursive, **kwargs)
            return disabled(*args, **kw)

        return call


class _TraceRules:
    """torch._dynamo.trace_rules: its caches are empty while the real module was never loaded."""

    def clear_lru_cache(self) -> None:
        module = sys.modules.get(NAME)
        if module is not None and not isinstance(module, DeferredDynamo):
            module.trace_rules.clear_lru_cache()

    def __getattr__(self, name: str):
        return getattr(real_dynamo().trace_rules, name)


def real_dynamo() -> types.ModuleType:
    """The real torch._dynamo, imported now if the stand-in holds its place."""
    module = sys.modules.get(NAME)
    if isinstance(module, DeferredDynamo):
        del sys.modules[NAME]
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(torch.__dict__.get("_dynamo"), DeferredDynamo):
            del torch._dynamo
        module = importlib.import_module(NAME)
    return module


def defer_dynamo() -> bool:
    """Put the stand-in in place unless torch._dynamo is loaded already (or this is turned off);
    whether the stand-in is in place."""
    if os.environ.get("HVCODISTILL_DEFER_DYNAMO", "1") == "0":
        return False
    module = sys.modules.get(NAME)
    if module is None:
        import torch

        module = sys.modules[NAME] = DeferredDynamo()
        torch._dynamo = module
    return isinstance(module, DeferredDynamo)
