"""Functional helpers for task-batched models (params dicts of ``[T, *shape]`` tensors).

* :func:`task_function` / :class:`TaskFunction`: any ``nn.Module`` as ``fn(params, x)`` over T
  tasks at once -- task-batched layers where possible (also for modules with their own
  forward, traced with ``torch.fx``), ``torch.func.vmap`` otherwise, a per-task loop as the
  last resort. :func:`explain` says which path a module takes and why.
* :func:`task_losses`: the ``[T]`` per-task mean losses of a task-batched output.
* :class:`MLPSpec`: set on ``TaskFunction.mlp`` for pure Linear/activation stacks (the
  analytic Hessian-vector product of ``fastmeta.ops.mlp_grad_hvp`` applies).
* :func:`task_hvp`: Hessian-vector products of T tasks at once (``task_hvp_ref``: the double
  backward oracle).
* :func:`inner_loop`: k task-batched inner steps as one autograd op whose backward is the exact
  second-order meta-gradient by batched HVPs. On a CPU the forward keeps each step's graph
  while the kept graphs total at most ``KEEP_BUDGET_MB`` (1 GiB; ``FASTMETA_KEEP_GRAPHS_MB``,
  0 = always recompute) and the backward recomputes only the later steps' activations;
  elsewhere (``recompute=True``) it keeps only the k parameter iterates and recomputes.

These are model-level transforms (they take a module and run it): they use ``fastmeta.nn`` and
the tensor-level ``fastmeta.ops``, never the layers above.
"""

from fastmeta.func._losses import task_losses
from fastmeta.func._task_function import MLPSpec, TaskFunction, explain, task_function
from fastmeta.func._task_hvp import task_hvp, task_hvp_ref
from fastmeta.func._inner_loop import auto_task_chunk, inner_loop

__all__ = ["MLPSpec", "TaskFunction", "auto_task_chunk", "explain", "inner_loop", "task_function", "task_hvp", "task_hvp_ref",
           "task_losses"]
