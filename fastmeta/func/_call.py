"""Run a module with some of its parameters replaced, correctly for shared submodules.

``torch.func.functional_call`` swaps a tensor in once per *name*. A submodule registered under
two names (learn2learn's ``OmniglotCNN`` holds its body as ``self.base`` and inside
``self.features``) is then swapped twice, and the restore puts the first swap's tensor back as
the "original": the module is left holding the per-task tensors instead of its Parameters, and
gradients of later calls go nowhere. Here every ``(submodule, attribute)`` holding a parameter is
swapped exactly once and restored exactly, whatever the call raises.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# canonical parameter name -> every (submodule._parameters, key) that holds that Parameter
Slots = dict[str, list[tuple[dict, str]]]


def param_slots(module: nn.Module) -> Slots:
    """Where each parameter of ``module`` lives.

    Keys are the names of ``module.named_parameters()`` (duplicates removed: a parameter shared
    by several submodules, or reached through a submodule registered twice, has one name, the
    first). Each value lists every ``(submodule._parameters, key)`` pair holding that Parameter,
    each pair once. The lists hold parameter dicts, never modules (callers keep weak references
    to the module).
    """
    canonical = {id(p): n for n, p in module.named_parameters()}
    slots: Slots = {n: [] for n in canonical.values()}
    for m in module.modules():  # each submodule once, however many names it has
        for k, p in m._parameters.items():
            if p is not None and id(p) in canonical:
                slots[canonical[id(p)]].append((m._parameters, k))
    return slots


def call_with(module: nn.Module, slots: Slots, params: Mapping[str, torch.Tensor], *args):
    """``module(*args)`` with ``params[name]`` in place of parameter ``name`` everywhere it is
    held (``slots`` from :func:`param_slots`); the module's own Parameters are back when this
    returns or raises. Works inside ``torch.func`` transforms (vmap, grad, jvp).

    Equivalent PyTorch code (for a module without shared submodules)::

        torch.func.functional_call(module, dict(params), args)
    """
    saved = []
    try:
        for name, value in params.items():
            for d, k in slots[name]:
                saved.append((d, k, d[k]))
                d[k] = value
        return module(*args)
    finally:
        for d, k, old in reversed(saved):
            d[k] = old
