"""PixelNN: the non-learned pixel nearest-neighbour baseline, evaluated with the same episodes and
evaluator as the learners (the pretraining baselines of Chen et al. 2019 are in baseline.py)."""

from __future__ import annotations

import torch

from fastmeta import ops
from fastmeta.learners._evaluate import EvalResult, evaluate_episodes


class PixelNN:
    """1-nearest-neighbour on raw pixels: each query takes the label of the closest support
    image (squared Euclidean distance). The floor every learned embedding must clear."""

    @torch.no_grad()
    def episode_accuracy(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        sims = ops.proto_logits(query_x.flatten(2).float(), support_x.flatten(2).float())  # [B,Q,S]
        pred = support_y.gather(1, sims.argmax(-1))
        return (pred == query_y).float().mean(1)

    def evaluate(self, batches, episodes: int = 600, device=None) -> EvalResult:
        return evaluate_episodes(self.episode_accuracy, batches, episodes, device)
