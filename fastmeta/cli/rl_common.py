"""What every meta-RL agent's command line shares: the common options, the seed streams that
make resume exact, the resume check and the results file.

Exact resume: iteration ``i`` draws its tasks, rollouts and actions from seeds that are a pure
function of ``(--seed, stream, i)`` (:func:`stream_seed`), and the checkpoint holds the agent and
the step, so a resumed run repeats what an uninterrupted one would have done.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmeta.train import checkpoint_extra


def stream_seed(seed: int, stream: int, i: int) -> int:
    """The seed of item ``i`` of random stream ``stream`` of a run started with ``seed``."""
    return (seed * 1_000_003 + stream * 7_919 + i * 104_729) % (2**62)


def add_common_args(p: argparse.ArgumentParser, *, threads_help: str = "torch intra-op threads (default 1)") -> None:
    """Options every agent has: budget, checkpoints, run folder, resume, seed, threads, progress."""
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall-clock time")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N iterations")
    p.add_argument("--run-dir", default=None, help="default runs/<agent>-<env>")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    p.add_argument("--no-progress", action="store_true")


def run_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or f"runs/{args.agent}-{args.env}")


def saved_args(args: argparse.Namespace) -> dict:
    """The plain-valued arguments of this run, stored in the checkpoint (``extra["args"]``)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def check_resume(path: Path, args: argparse.Namespace, keys: tuple[str, ...]) -> None:
    """Refuse to resume from a checkpoint written with other ``keys`` (env, policy, ...), naming
    the difference; nothing to check when not resuming or when there is no checkpoint yet."""
    if not (args.resume and path.exists()):
        return
    saved = checkpoint_extra(path).get("args", {})  # (the tensors are read once, by the Trainer)
    for key in ("agent", *keys):
        if key in saved and saved[key] != getattr(args, key):
            raise SystemExit(f"{path} was written for --{key.replace('_', '-')} {saved[key]!r}, this run has "
                             f"{getattr(args, key)!r}: use another --run-dir or the same settings")


def write_results(run_dir: Path, out: dict) -> dict:
    """Write ``out`` to ``<run_dir>/results.json`` and return it."""
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out
