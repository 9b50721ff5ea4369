"""Functional helpers for task-batched models (params dicts of ``[T, *shape]`` tensors).

* :func:`task_function` / :class:`TaskFunction`: any ``nn.Module`` as ``fn(params, x)`` over T
  tasks at once -- task-batched layers where possible (also for modules with their own
  forward, traced with ``torch.fx``), ``torch.func.vmap`` otherwise, a per-task loop as the
  last resort. :func:`explain` says which path a module takes and why.
* :func:`task_losses`: the ``[T]`` per-task mean losses of a task-batched output.
* :class:`MLPSpec`: set on ``TaskFunction.mlp`` for pure Linear/activation stacks (the
  analytic Hessian-vector product of ``fastmeta.ops.mlp_hvp`` applies).
"""

from fastmeta.func._losses import task_losses
from fastmeta.func._task_function import MLPSpec, TaskFunction, explain, task_function

__all__ = ["MLPSpec", "TaskFunction", "explain", "task_function", "task_losses"]
