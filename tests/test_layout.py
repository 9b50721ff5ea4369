"""The house rule of DESIGN.md "a module is not shadowed by a function of the same name":
for every module ``fastmeta.a.b``, the attribute ``b`` of package ``fastmeta.a`` is that module.

A package ``__init__`` that re-exports ``from fastmeta.a.b import b`` rebinds the name to the
function, after which ``import fastmeta.a.b as m`` hands back the function and code can reach
the module only through ``importlib``. Op contract files are therefore ``ops/_<stem>.py`` and
their public names are re-exported from ``fastmeta.ops``.
"""

import importlib
import pkgutil
import sys

import fastmeta
import fastmeta.kernels

# running it would run the command line
SKIP = {"fastmeta.__main__"}


def _all_modules() -> list[str]:
    names = []
    for pkg in (fastmeta, fastmeta.kernels):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=_raise):
            if info.name not in SKIP:
                names.append(info.name)
    return names


def _raise(name: str) -> None:
    raise ImportError(f"walking the fastmeta packages: {name} does not import")


def test_walk_finds_every_layer():
    names = set(_all_modules())
    for layer in ("cli", "data", "func", "learners", "nn", "ops", "rl", "kernels"):
        assert f"fastmeta.{layer}" in names
    assert "fastmeta.ops._prototypes" in names and "fastmeta.rl.envs.navigation" in names


def _shadowed(names: list[str]) -> list[str]:
    out = []
    for name in names:
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        attr = getattr(sys.modules[parent], leaf, None) if parent else module
        if attr is not module:
            out.append(f"{name} (the package attribute {leaf!r} is {type(attr).__name__})")
    return out


def test_no_module_is_shadowed_by_an_attribute():
    shadowed = _shadowed(_all_modules())
    assert not shadowed, "modules shadowed by a same-named attribute: " + ", ".join(shadowed)


def test_the_check_sees_a_shadowed_module(monkeypatch):
    """Not vacuous: a package attribute rebound to a function (what ``from m import m`` in an
    ``__init__`` does) is reported."""
    monkeypatch.setattr(fastmeta.ops, "_prototypes", fastmeta.ops.prototypes)
    assert _shadowed(["fastmeta.ops._prototypes", "fastmeta.ops.registry"]) == [
        "fastmeta.ops._prototypes (the package attribute '_prototypes' is function)"
    ]
