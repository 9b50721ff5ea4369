"""The backend registry: selection order, forcing, reasons, the printed table."""

import pytest
import torch

import fastmeta
from fastmeta import _ext
from fastmeta.ops import BackendError, _registry


def test_auto_selection_on_cpu_prefers_cpp_then_reference():
    x = torch.randn(1, 2, 3)
    chosen = _registry.select("proto_loss", [x])
    assert chosen == ("cpp" if _ext.available() else "reference")
    # the Triton interpreter is never chosen automatically on the CPU (it is 1000x slower)
    assert chosen != "triton"


def test_float16_on_cpu_falls_back_to_reference():
    assert _registry.select("proto_loss", [torch.randn(1, 2, 3, dtype=torch.float16)]) == "reference"


def test_forced_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match=r"\['triton', 'cpp', 'reference'\]"):
        _registry.select("prototypes", [torch.randn(1, 2, 3)], "fast")


def test_nothing_fits_lists_every_backend(monkeypatch):
    x = torch.randn(1, 2, 3)
    only = _registry.Backend("cpp", frozenset({"cuda"}), _registry.FLOAT32_64, lambda: "")
    other = _registry.Backend("triton", frozenset({"cuda"}), _registry.FLOAT32_64, lambda: "no triton here")
    monkeypatch.setitem(_registry._TABLE, "toy", (other, only))
    with pytest.raises(BackendError) as info:
        _registry.select("toy", [x])
    msg = str(info.value)
    assert "triton: no triton here" in msg and "cpp: device cpu not supported" in msg


def test_backends_prints_table(capsys):
    rows = fastmeta.backends()
    out = capsys.readouterr().out
    assert {"prototypes", "proto_loss", "proto_logits"} <= {r["op"] for r in rows}
    assert "reference" in out and "C++ extension" in out
    assert all(r["available"] for r in rows if r["backend"] == "reference")


def test_backends_for():
    names = fastmeta.ops.backends_for("proto_loss", "cpu")
    assert names[-1] == "reference" and "triton" not in names
    assert ("cpp" in names) == _ext.available()
