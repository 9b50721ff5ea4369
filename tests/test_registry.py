"""The backend registry: selection order, forcing, reasons, the printed table."""

import pytest
import torch

import fastmeta
from fastmeta import _ext
from fastmeta.ops import BackendError, registry


def test_auto_selection_on_cpu_prefers_cpp_then_composite():
    q, p = torch.randn(1, 2, 256), torch.randn(1, 5, 256)  # long features, few prototypes
    chosen = registry.select("proto_loss", [q, p])
    assert chosen == ("cpp" if _ext.available() else "composite")
    # the Triton interpreter is never chosen automatically on the CPU (it is 1000x slower)
    assert chosen != "triton"
    # the oracle serves automatically only when nothing before it can
    assert registry.select("prototypes", [q]) == ("cpp" if _ext.available() else "reference")


def test_auto_selection_takes_composite_where_the_kernel_is_slower():
    """Short features or many prototypes: plain ATen beats the C++ kernel (measured rule in
    fastmeta/ops/_proto_loss.py); forcing cpp still runs the kernel."""
    for q, p in [(torch.randn(1, 75, 64), torch.randn(1, 5, 64)), (torch.randn(2, 9, 256), torch.randn(2, 20, 256))]:
        assert registry.select("proto_loss", [q, p]) == "composite"
        # the logits alone: the kernel stays faster at every shape measured
        assert registry.select("proto_logits", [q, p]) == ("cpp" if _ext.available() else "composite")
        if _ext.available():
            assert registry.select("proto_loss", [q, p], "cpp") == "cpp"
            # cosine keeps the kernel (its composite form is slower)
            assert registry.select("proto_loss", [q, p], metric="cosine") == "cpp"


def test_float16_on_cpu_falls_back_to_composite():
    assert registry.select("proto_loss", [torch.randn(1, 2, 3, dtype=torch.float16)]) == "composite"


def test_forced_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match=r"\['triton', 'cpp', 'reference'\]"):
        registry.select("prototypes", [torch.randn(1, 2, 3)], "fast")


def test_nothing_fits_lists_every_backend(monkeypatch):
    x = torch.randn(1, 2, 3)
    only = registry.Backend("cpp", frozenset({"cuda"}), registry.FLOAT32_64, lambda: "")
    other = registry.Backend("triton", frozenset({"cuda"}), registry.FLOAT32_64, lambda: "no triton here")
    monkeypatch.setitem(registry._TABLE, "toy", (other, only))
    with pytest.raises(BackendError) as info:
        registry.select("toy", [x])
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


def test_select_is_memoised_per_key_and_follows_its_inputs(monkeypatch):
    """Each answer is remembered under (forced name, device, dtype, the op's key); a new shape,
    dtype or FASTMETA_BACKEND value is a new key, so the memo never hands back a stale choice."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    small, large = torch.randn(1, 75, 64), torch.randn(1, 2, 256)
    protos_small, protos_large = torch.randn(1, 5, 64), torch.randn(1, 5, 256)
    memo = registry._MEMO["proto_loss"].chosen
    for _ in range(2):  # the second round is answered from the memo
        assert registry.select("proto_loss", [small, protos_small]) == "composite"
        assert registry.select("proto_loss", [large, protos_large]) == ("cpp" if _ext.available() else "composite")
        assert registry.select("proto_loss", [small.half(), protos_small.half()]) == "composite"
    assert len(memo) >= 3
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.select("proto_loss", [large, protos_large]) == "reference"
    # errors are raised on every call, never memoised
    for _ in range(2):
        with pytest.raises(ValueError, match="backend='fast'"):
            registry.select("proto_loss", [large, protos_large], "fast")


def test_env_names_limit_what_the_environment_forces(monkeypatch):
    """task_hvp's strategies take FASTMETA_BACKEND only when it names one of them (cpp forces the
    kernels beneath); the inner_update lr-gradient table follows its tensors, never the env."""
    x = torch.randn(2, 3, 4)
    fn = fastmeta.func.task_function(torch.nn.Linear(4, 2))
    monkeypatch.setenv(registry.ENV_VAR, "cpp")
    assert registry.select("task_hvp", [x], fn=fn, loss_fn=torch.nn.functional.mse_loss) == "analytic"
    assert registry.select("inner_update_lr_grad", [x]) == ("cpp" if _ext.available() else "composite")
    assert registry.select("inner_update_lr_grad", [x.half()]) == "composite"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.select("task_hvp", [x], fn=fn, loss_fn=torch.nn.functional.mse_loss) == "reference"
    assert registry.select("task_grad", [x], fn=fn, loss_fn=torch.nn.functional.mse_loss) == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "func")
    assert registry.select("task_grad", [x], fn=fn, loss_fn=torch.nn.functional.mse_loss) == "analytic"
    # an op without explicit env_names still refuses a name it does not have
    with pytest.raises(ValueError, match="FASTMETA_BACKEND='func' is not a backend of prototypes"):
        registry.select("prototypes", [x])
