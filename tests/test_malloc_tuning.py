"""fastmeta._malloc: glibc settings applied once at the first task-batched CPU call, never
when the user opted out or set glibc's own variables (each case in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest

CODE = """
import torch, fastmeta
from fastmeta import _malloc
assert not _malloc.applied()
net = fastmeta.nn.TaskMLP([3, 4, 2])
net(torch.randn(2, 5, 3), {n: p.expand(2, *p.shape) for n, p in net.named_parameters()})
print("applied" if _malloc.applied() else "not applied")
"""


def _run(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "FASTMETA_MALLOC_TUNING")
           and not (k.startswith("MALLOC_") and k.endswith("_"))}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _glibc() -> bool:
    import ctypes
    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")
def test_applied_at_first_task_batched_cpu_call():
    assert _run({}) == "applied"


@pytest.mark.parametrize("env", [{"FASTMETA_MALLOC_TUNING": "0"},
                                 {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_user_settings_win(env):
    assert _run(env) == "not applied"


def test_idempotent():
    from fastmeta import _malloc
    first = _malloc.tune()
    assert _malloc.tune() == first == _malloc.applied()
