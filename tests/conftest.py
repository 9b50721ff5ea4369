"""Test setup: run Triton kernels through the interpreter unless a GPU is being tested.

FASTMETA_TEST_DEVICE=cuda (bench/device_check.sh sets it) runs the device tests on the GPU
with compiled Triton kernels; the default runs everything on the CPU, Triton included
(TRITON_INTERPRET=1 must be set before anything imports triton).
"""

import os

DEVICE = os.environ.get("FASTMETA_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _skip_unavailable_backend(request):
    from helpers import unavailable_reason

    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if isinstance(backend, str) and unavailable_reason(backend):
        pytest.skip(f"backend {backend}: {unavailable_reason(backend)}")


@pytest.fixture
def one_thread():
    """One intra-op thread for a test file of tiny shapes (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): a second OpenMP thread only adds synchronisation,
    and on a busy machine a descheduled one stalls every op (10-50x slower runs were seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
