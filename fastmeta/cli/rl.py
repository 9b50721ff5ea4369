"""``python -m fastmeta rl <agent> --env ... [options]``: meta-RL agents through the shared
trainer (progress bar, atomic checkpoints with exact resume, metrics CSV, learning-curve PNG)
and a held-out evaluation written to ``results.json``.

One module per agent (``rl_<agent>.py``: ``HELP``, ``add_args(parser)``, ``run(args) -> dict``),
registered in :data:`AGENTS`; what they share is in :mod:`fastmeta.cli.rl_common`.
"""

from __future__ import annotations

import argparse

from fastmeta.cli import rl_maml_trpo, rl_pearl, rl_rl2
from fastmeta.cli.run import intra_op_threads

AGENTS = {
    "maml-trpo": rl_maml_trpo,
    "pearl": rl_pearl,
    "rl2": rl_rl2,
}


def add_rl_args(p: argparse.ArgumentParser) -> None:
    """One sub-command per agent, each with its own options (``rl <agent> --help``)."""
    sub = p.add_subparsers(dest="agent", required=True, metavar="agent",
                           help=", ".join(AGENTS) + " (rl <agent> --help for its options)")
    for name, module in AGENTS.items():
        module.add_args(sub.add_parser(name, help=module.HELP, description=module.HELP))


def rl_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastmeta rl`` (what follows ``rl`` on the command line)."""
    p = argparse.ArgumentParser(prog="python -m fastmeta rl")
    add_rl_args(p)
    return p


def run_rl(args: argparse.Namespace) -> dict:
    """Train ``args.agent`` with the parsed ``args``; its results dict (also in results.json)."""
    with intra_op_threads(args.threads):
        return AGENTS[args.agent].run(args)
