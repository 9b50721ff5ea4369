"""pytest-benchmark mode for bench/ (never part of the regular test run).

The regular ``pytest`` run collects only ``tests/`` (``testpaths`` in pyproject.toml), and
``bench_*.py`` files do not match pytest's ``test_*.py`` pattern anyway. They are collected
when named on the command line, or for ``pytest bench --benchmark-only``::

    pytest bench/bench_proto.py --benchmark-only
    pytest bench --benchmark-only --benchmark-save=NAME      # -> bench/results/pytest-benchmark/
    pytest bench --benchmark-only --benchmark-json=bench/results/NAME.json

``--benchmark-save``/``--benchmark-autosave``/``--benchmark-compare`` use
``bench/results/pytest-benchmark/`` unless ``--benchmark-storage`` says otherwise. Saved
machine info carries torch/triton versions, the benchmarked device and the git sha.
``FASTMETA_BENCH_DEVICE`` (cpu|cuda) and ``FASTMETA_BENCH_FULL=1`` (add the large shapes)
steer what is benchmarked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
_DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default
STORAGE = BENCH_DIR / "results" / "pytest-benchmark"

if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's (trylast) pytest_configure builds its storage.
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{STORAGE}"


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if file_path.parent != BENCH_DIR or parent.session.isinitpath(file_path):
        return None  # a file named on the command line is collected by pytest itself
    if not parent.config.getoption("benchmark_only", False):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config, machine_info):
    import os

    import _common as C

    device = C.resolve_device(os.environ.get("FASTMETA_BENCH_DEVICE") or None)
    machine_info["fastmeta"] = C.env_info(device)
