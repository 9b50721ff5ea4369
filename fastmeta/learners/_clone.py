"""learn2learn-style cloning and in-place adaptation of an ordinary ``nn.Module``: what the
``clone()`` / ``adapt(loss)`` API of MAML, Meta-SGD and ANIL is built on.

``clone_module`` copies a module whose parameters are differentiable functions of the
original's; ``adapt_module`` takes one gradient step on such a copy in place, through
``fastmeta.ops.inner_update`` (learn2learn's ``allow_unused`` / ``allow_nograd`` semantics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastmeta.ops import inner_update

Tensor = torch.Tensor


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable functions (``clone()``) of the
    original's: gradients of anything computed with the copy flow back to the original
    parameters. Buffers that require grad are cloned too; the others (BatchNorm running
    statistics) are shared, as in learn2learn. Parameters and submodules shared inside
    ``module`` stay shared in the copy."""
    return _clone(module, {}, {})


def _clone(module: nn.Module, tensors: dict, modules: dict) -> nn.Module:
    if id(module) in modules:
        return modules[id(module)]
    new = module.__new__(type(module))
    new.__dict__ = module.__dict__.copy()
    modules[id(module)] = new
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._modules = module._modules.copy()

    def cloned(t):
        if id(t) not in tensors:
            tensors[id(t)] = (t.clone(), t)  # keep t alive: ids must not be reused meanwhile
        return tensors[id(t)][0]

    for k, p in new._parameters.items():
        if p is not None:
            new._parameters[k] = cloned(p)
    for k, b in new._buffers.items():
        if b is not None and b.requires_grad:
            new._buffers[k] = cloned(b)
    for k, m in new._modules.items():
        if m is not None:
            new._modules[k] = _clone(m, tensors, modules)
    _refresh_rnn(new)
    return new


def _refresh_rnn(module: nn.Module) -> None:
    # nn.RNNBase keeps a list of its weight tensors for cuDNN; point it at the new tensors
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _replace_parameters(module: nn.Module, new: dict[int, Tensor]) -> None:
    """Swap every parameter ``p`` of ``module`` (and its submodules) with ``id(p) in new``
    for ``new[id(p)]``, in place (the module objects stay; only the tensors change)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and id(p) in new:
                m._parameters[k] = new[id(p)]
        _refresh_rnn(m)


def adaptable(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` for what ``adapt`` steps: ``module.parameters()`` -- the module's
    own method, which research code overrides to leave out parameters that are state (the
    MAML-PyTorch ``Learner`` returns its ``vars`` list, not its BatchNorm running statistics
    kept as non-trainable Parameters), as learn2learn's ``maml_update`` does -- each tensor once,
    named as in ``named_parameters()``. A tensor the module does not register is skipped: the
    update could not be put back into the module."""
    names = {id(p): n for n, p in module.named_parameters()}
    out, seen = [], set()
    for p in module.parameters():
        if id(p) in names and id(p) not in seen:
            seen.add(id(p))
            out.append((names[id(p)], p))
    return out


def adapt_module(module: nn.Module, loss: Tensor, lr_of: Callable[[str, Tensor], object],
                 first_order: bool, allow_unused: bool, allow_nograd: bool, who: str) -> None:
    """One learn2learn-style adaptation step of ``module`` in place: ``p <- p - lr * dloss/dp``
    for every parameter that gets a gradient, through ``fastmeta.ops.inner_update``."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{who}.adapt: loss must be a scalar tensor, got {type(loss).__name__}")
    second_order = not first_order
    named = adaptable(module)
    if allow_nograd:
        named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        return
    try:
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=second_order,
                                    create_graph=second_order, allow_unused=allow_unused)
    except RuntimeError as e:
        raise RuntimeError(f"{who}.adapt: {e}\n(learn2learn semantics: pass allow_nograd=True to "
                           "skip parameters that do not require grad and/or allow_unused=True for "
                           "parameters the loss does not use)") from e
    keep = [(n, p, g) for (n, p), g in zip(named, grads) if g is not None]
    if not keep:
        return
    lrs = [lr_of(n, p) for n, p, _ in keep]
    lr = lrs if any(isinstance(x, torch.Tensor) for x in lrs) else lrs[0]
    if isinstance(lr, list):
        lr = [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=p.dtype, device=p.device)
              for x, (_, p, _) in zip(lr, keep)]
    updated = inner_update([p for _, p, _ in keep], [g for _, _, g in keep], lr)
    _replace_parameters(module, {id(p): u for (_, p, _), u in zip(keep, updated)})

