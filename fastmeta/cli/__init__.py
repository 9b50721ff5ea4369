"""Command line: ``python -m fastmeta train <learner> ...``, ``python -m fastmeta rl <agent> ...``,
``python -m fastmeta demo`` and ``python -m fastmeta backends``.

Every learner trains through the shared :class:`fastmeta.train.Trainer` (progress bar,
validation, exact resume, metrics CSV, learning-curve PNG). One idea per module: ``recipes``
(what each learner is built from, the ``train`` arguments), ``run`` (one training run),
``sinusoid`` (the regression stream and figure), ``rl`` (meta-RL agents), ``demo``.
"""

from __future__ import annotations

import argparse
import sys

import fastmeta
from fastmeta.cli import demo
from fastmeta.cli.recipes import LEARNERS, add_train_args, resolve_defaults
from fastmeta.cli.rl import add_rl_args, run_rl
from fastmeta.cli.run import run_training

__all__ = ["LEARNERS", "build_parser", "demo", "main", "resolve_defaults", "run_rl", "run_training"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmeta", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train a learner"))
    add_rl_args(sub.add_parser("rl", help="train a meta-RL agent (rl <agent> --help)"))
    sub.add_parser("demo", help="short training runs of every learner + baselines", add_help=False)
    sub.add_parser("backends", help="print the backend table")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return demo.demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        fastmeta.backends()
        return 0
    if args.command == "rl":
        run_rl(args)
        return 0
    run_training(args)
    return 0
