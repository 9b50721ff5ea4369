"""What bench/bench_maml.py measures: its configs (shapes, inner steps, learning rates; see
that file's docstring), their ``--quick`` and float64-gate versions, the row names, and the
models and batches every row runs on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


CONFIGS = {
    "sinusoid-k1": dict(model="mlp", hidden=40, T=25, S=10, Q=10, k=1, lr=0.01),
    "sinusoid-k5": dict(model="mlp", hidden=40, T=25, S=10, Q=10, k=5, lr=0.01),
    "conv4-k5": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=5, lr=0.4,
                     image=28, chunk=8),
    "conv4-k1": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=1, lr=0.4,
                     image=28, chunk=8),
    "conv4-k10": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=10, lr=0.4,
                      image=28, chunk=8),
}
# --quick: same models and k, smaller meta-batches / width (a smoke run, minutes on 2 cores).
QUICK = {
    "sinusoid-k1": dict(T=25),
    "sinusoid-k5": dict(T=25),
    "conv4-k5": dict(T=4, hidden=16, query=3, chunk=2),
    "conv4-k1": dict(T=4, hidden=16, query=3, chunk=2),
    "conv4-k10": dict(T=4, hidden=16, query=3, chunk=2),
}
# The float64 correctness gate: a tiny version of each model.
GATE = {
    "mlp": dict(model="mlp", hidden=8, T=3, S=4, Q=4, k=2, lr=0.1),
    "conv4": dict(model="conv4", hidden=4, T=2, n_way=5, shot=1, query=2, k=2, lr=0.4, image=28,
                  chunk=1),
}

SEQUENTIAL = ["naive", "higher", "torchopt", "l2l"]
PEERS = ["naive", "higher", "torchopt", "vmap", "l2l", "bmm"]
FASTMETA = ["fastmeta", "fastmeta chunk", "fastmeta clone/adapt", "fastmeta+cudagraph"]
ALL_IMPLS = PEERS + FASTMETA


def config_of(name: str, quick: bool) -> dict:
    cfg = dict(CONFIGS[name])
    if quick:
        cfg.update(QUICK[name])
    return cfg


def impls_for(cfg: dict, device: torch.device) -> list[str]:
    names = ["naive", "higher", "torchopt", "vmap", "l2l"]
    if cfg["model"] == "mlp":
        names.append("bmm")
    names.append("fastmeta")
    if cfg["model"] == "conv4" and cfg.get("chunk") and cfg["chunk"] < cfg["T"]:
        names.append("fastmeta chunk")
    if cfg["model"] == "mlp":
        names.append("fastmeta clone/adapt")
    if device.type == "cuda":
        names.append("fastmeta+cudagraph")
    return names


def impl_label(name: str, cfg: dict) -> str:
    return f"fastmeta chunk={cfg['chunk']}" if name == "fastmeta chunk" else name


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------


def build_model(cfg: dict, seed: int = 0) -> nn.Module:
    """A plain nn.Sequential: every row gets a deep copy of the same one."""
    torch.manual_seed(seed)
    h = cfg["hidden"]
    if cfg["model"] == "mlp":
        return nn.Sequential(nn.Linear(1, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, 1))
    layers: list[nn.Module] = []
    cin, size = 1, cfg["image"]
    for _ in range(4):
        # MAML's BatchNorm uses the batch statistics of each forward (transductive), as the
        # functorch MAML example's track_running_stats=False does.
        layers += [nn.Conv2d(cin, h, 3, padding=1), nn.BatchNorm2d(h, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        cin, size = h, size // 2
    layers += [nn.Flatten(), nn.Linear(h * size * size, cfg["n_way"])]
    return nn.Sequential(*layers)


def loss_fn_of(cfg: dict):
    return F.mse_loss if cfg["model"] == "mlp" else F.cross_entropy


def make_batch(cfg: dict, seed: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(support_x, support_y, query_x, query_y), every tensor [T, ...]."""
    g = torch.Generator().manual_seed(seed)
    T = cfg["T"]
    if cfg["model"] == "mlp":
        amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)
        sx = torch.empty(T, cfg["S"], 1).uniform_(-5.0, 5.0, generator=g)
        qx = torch.empty(T, cfg["Q"], 1).uniform_(-5.0, 5.0, generator=g)
        sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
        return tuple(t.to(device, dtype) for t in (sx, sy, qx, qy))
    n, shot, q, size = cfg["n_way"], cfg["shot"], cfg["query"], cfg["image"]
    protos = torch.randn(T, n, 1, size, size, generator=g)
    sy = torch.arange(n).repeat(shot).expand(T, n * shot).contiguous()
    qy = torch.stack([torch.arange(n).repeat_interleave(q)[torch.randperm(n * q, generator=g)]
                      for _ in range(T)])

    def images(labels):
        own = protos[torch.arange(T)[:, None], labels]
        return own + 0.8 * torch.randn(own.shape, generator=g)

    sx, qx = images(sy), images(qy)
    return (sx.to(device, dtype), sy.to(device), qx.to(device, dtype), qy.to(device))


def param_count(cfg: dict) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())

