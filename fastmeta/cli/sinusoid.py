"""Sinusoid regression (Finn et al. 2017) for the CLI: the meta-batch stream and the
adaptation figure."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastmeta import data
from fastmeta.data import stream_seed


def sinusoid_loader(args, device):
    """``loader(split, ways, n_batches, start, seed, batch)`` of sinusoid meta-batches
    ``(support_x [B,K,1], support_y, query_x [B,Q,1], query_y, None)``: batch ``i`` of a seed
    is a function of ``(seed, i)`` (exact resume); splits differ by their seeds."""

    tasks = data.SinusoidTasks()
    k = args.shots

    def loader(split, ways, n_batches=None, start=0, seed=args.seed, batch=args.batch, queries=None):
        q = args.queries if queries is None else queries

        def gen():
            i = start
            while n_batches is None or i < start + n_batches:
                b = tasks.sample(batch, k + q, torch.Generator().manual_seed(stream_seed(seed, i)), device=device)
                yield b.x[:, :k], b.y[:, :k], b.x[:, k:], b.y[:, k:], None
                i += 1

        return gen()

    return loader


def sinusoid_figure(learner, path: Path, k: int = 10, steps=(0, 1, 10), seed: int = 20_000) -> Path:
    """Finn et al. (2017) Fig. 2: one held-out sinusoid, its ``k`` support points, and the
    learner's prediction after each number of inner steps in ``steps``; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    tasks = data.SinusoidTasks()
    p = next(learner.parameters())
    b = tasks.sample(1, k, torch.Generator().manual_seed(seed), dtype=p.dtype, device=p.device)
    grid = torch.linspace(*tasks.x_range, 200, dtype=p.dtype, device=p.device).view(1, -1, 1)
    meta = learner.meta
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid.flatten().cpu(), tasks.function(grid[0], b.amplitude, b.phase).flatten().cpu(), "r",
            label="ground truth")
    was_training = learner.training
    learner.eval()
    for n, style in zip(steps, (":", "--", "-", "-.")):
        with torch.no_grad():
            pred = meta.predict(meta.adapt_tasks(b.x, b.y, n, F.mse_loss), grid)
        ax.plot(grid.flatten().cpu(), pred.flatten().cpu(), style, label=f"after {n} step{'s' * (n != 1)}")
    learner.train(was_training)
    ax.plot(b.x.flatten().cpu(), b.y.flatten().cpu(), "k^", label=f"{k} support points")
    ax.set_xlabel("x")
    ax.legend(fontsize=8)
    ax.set_title(f"{type(meta).__name__}, K={k}: adaptation to a held-out sinusoid")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
