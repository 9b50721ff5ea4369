"""Minimal reproduction: torch.func ``grad`` over ``vmap`` over ``grad`` through training-mode
``batch_norm`` returns a wrong gradient for the parameters *before* the batch norm (torch 2.13,
CPU, float64). This is why bench_maml.py's ``vmap`` row (the functorch MAML Omniglot example)
fails the float64 correctness gate on Conv4 and is marked ``[WRONG grads]``. Upstream:
pytorch/functorch issue #534 (batch_norm's backward batching rule is wrong for grad_input).

    python bench/vmap_batchnorm_repro.py
    # W rel diff ~0.33 (wrong); g, b rel diff ~1e-16

Per task: h = batch_norm(x @ W, g, b, batch statistics); loss = sum(tanh(h) * c); one inner
SGD step on (W, g, b), then the loss again (MAML, k = 1). The meta-gradient summed over tasks
is computed with a Python loop over tasks and with ``vmap`` over tasks; they must agree.
"""

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

torch.manual_seed(0)
dt = torch.float64
P = {"W": torch.randn(5, 3, dtype=dt), "g": torch.randn(3, dtype=dt) + 1,
     "b": torch.randn(3, dtype=dt)}
x = torch.randn(2, 4, 5, dtype=dt)  # 2 tasks, 4 examples each, 5 features
c = torch.randn(2, 4, 3, dtype=dt)


def inner(p, x, c):
    h = F.batch_norm(x @ p["W"], None, None, p["g"], p["b"], training=True)
    return (torch.tanh(h) * c).sum()


def task(p, x, c):
    g = grad(inner)(p, x, c)
    return inner({k: p[k] - 0.5 * g[k] for k in p}, x, c)


if __name__ == "__main__":
    print("torch", torch.__version__)
    looped = [grad(task)(P, x[t], c[t]) for t in range(2)]
    vmapped = grad(lambda p: vmap(task, in_dims=(None, 0, 0))(p, x, c).sum())(P)
    for k in P:
        ref = looped[0][k] + looped[1][k]
        print(f"{k} rel diff {((ref - vmapped[k]).norm() / ref.norm()).item():.3g}")
