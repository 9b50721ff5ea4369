"""Packaging: the Triton kernels install as fastmeta.kernels (never a top-level `kernels`),
and the C++ extension is really built where the Makefile asked for it."""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fastmeta
from fastmeta import _ext

REPO = pathlib.Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with -I (no PYTHONPATH, no user site, no script directory on
# sys.path) from a folder outside the repository: what a user of the installed package sees.
# Under `python -m pytest` the repository root is on sys.path, so there the repository's own
# kernels/ is importable as `kernels` whatever the install did; that says nothing about the
# install and must not decide the test (nor may the folder's name, e.g. a clone named fastmeta).
_PROBE = r"""
import importlib.util, json, sys
import fastmeta.kernels
top = importlib.util.find_spec("kernels")
print(json.dumps(dict(
    sys_path=sys.path,
    fastmeta_dir=list(fastmeta.__path__),
    kernels_dir=list(fastmeta.kernels.__path__),
    top_level=None if top is None else (list(top.submodule_search_locations or []) or [top.origin]),
)))
"""


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def test_kernels_installed_under_fastmeta_not_top_level(tmp_path):
    out = subprocess.run([sys.executable, "-I", "-c", _PROBE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # the probe really ran without the repository on its path (else it proves nothing)
    assert not any(_same(p or ".", REPO) for p in seen["sys_path"]), seen["sys_path"]

    (kdir,) = seen["kernels_dir"]
    repo_kernels = REPO / "kernels"
    # editable install: fastmeta.kernels is the repository's kernels/; regular install: a copy
    # inside the installed fastmeta package with the same modules
    assert _same(kdir, repo_kernels) or any(_same(pathlib.Path(kdir).parent, d) for d in seen["fastmeta_dir"]), kdir
    modules = {p.name for p in repo_kernels.glob("*.py")}
    assert modules and modules <= {p.name for p in pathlib.Path(kdir).glob("*.py")}

    # no top-level `kernels` comes from this project (PyPI has a package of that name: if it is
    # installed, it must be that one, not ours)
    for loc in seen["top_level"] or []:
        assert not (_same(loc, repo_kernels) or _same(loc, kdir)
                    or _same(pathlib.Path(loc).parent, repo_kernels)), loc


def test_distribution_declares_only_fastmeta_top_level():
    dist = importlib.metadata.distribution("fastmeta")
    top = dist.read_text("top_level.txt")
    if top is not None:
        assert top.split() == ["fastmeta"]
    for f in dist.files or []:
        assert f.parts[0] != "kernels", f


@pytest.mark.skipif(os.environ.get("FASTMETA_REQUIRE_EXT") != "1", reason="FASTMETA_REQUIRE_EXT not set")
def test_extension_built_when_required():
    assert _ext.available(), _ext.reason()


def test_import_never_fails_and_reports():
    assert fastmeta.__version__
    assert isinstance(_ext.reason(), str)


_SURFACE = r"""
import fastmeta
print(fastmeta.func.task_function.__name__, fastmeta.data.episodes.__name__,
      fastmeta.nn.ProtoLoss.__name__, fastmeta.learners.ProtoNet.__name__)
"""


def test_public_surface_in_a_fresh_process(tmp_path):
    """``import fastmeta`` alone gives the subpackages (a docstring's
    ``fastmeta.func.task_function`` must not raise AttributeError in a fresh process)."""
    out = subprocess.run([sys.executable, "-I", "-c", _SURFACE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["task_function", "episodes", "ProtoLoss", "ProtoNet"]


def test_every_learner_is_top_level():
    learners = {name for name in fastmeta.learners.__all__
                if isinstance(getattr(fastmeta.learners, name), type)
                and issubclass(getattr(fastmeta.learners, name), torch.nn.Module)
                and name not in ("FewShotLearner", "EpisodicLearner")}  # bases, not learners
    assert {"MAML", "ProtoNet", "MatchingNet", "SNAIL", "MANN", "MetaLSTM"} <= learners
    for name in learners:
        assert getattr(fastmeta, name) is getattr(fastmeta.learners, name), name
        assert name in fastmeta.__all__, name
    for sub in ("data", "func", "learners", "nn", "ops"):
        assert sub in fastmeta.__all__ and getattr(fastmeta, sub).__name__ == f"fastmeta.{sub}"
