"""Packaging: the Triton kernels install as fastmeta.kernels (never a top-level `kernels`),
and the C++ extension is really built where the Makefile asked for it."""

import importlib.util
import os
import pathlib

import pytest

import fastmeta
from fastmeta import _ext


def test_kernels_installed_under_fastmeta():
    spec = importlib.util.find_spec("fastmeta.kernels")
    assert spec is not None and spec.origin is not None
    assert pathlib.Path(spec.origin).parent.name == "kernels"
    # a top-level `kernels` package would shadow PyPI's: it must not come from this project
    top = importlib.util.find_spec("kernels")
    assert top is None or "fastmeta" not in str(top.origin or "")


@pytest.mark.skipif(os.environ.get("FASTMETA_REQUIRE_EXT") != "1", reason="FASTMETA_REQUIRE_EXT not set")
def test_extension_built_when_required():
    assert _ext.available(), _ext.reason()


def test_import_never_fails_and_reports():
    assert fastmeta.__version__
    assert isinstance(_ext.reason(), str)
