"""Build script for fastmeta: pure-Python packages plus the CMake-built ``fastmeta._C``.

Install (the build needs the torch already installed in this environment, so no isolation):

    pip install --no-build-isolation -e .       # editable
    pip install --no-build-isolation .          # regular
    FASTMETA_BUILD_EXT=0 pip install --no-build-isolation .   # pure Python, no compiler needed

Environment:
    FASTMETA_BUILD_EXT   1 (default): build fastmeta._C, a failure is an error;
                         0: skip the extension; auto: try, fall back to pure Python on failure.
    FASTMETA_BUILD_CUDA  0: never compile csrc/cuda/*.cu (default: when torch has CUDA and nvcc
                         exists and there is at least one .cu file).
    FASTMETA_DEBUG       1: CMake Debug build.
    MAX_JOBS             parallel compile jobs (default 2).
    CMAKE                cmake executable to use (default: cmake on PATH if >= 3.18, else the
                         `cmake` pip package).
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_CMAKE = (3, 18)


def _log(msg):
    print(f"fastmeta: {msg}", flush=True)


def _build_ext_mode():
    mode = os.environ.get("FASTMETA_BUILD_EXT", "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return "0"
    if mode == "auto":
        return "auto"
    return "1"


def _packages():
    pkgs = find_packages(where=ROOT, include=["fastmeta", "fastmeta.*"])
    package_dir = {}
    # The top-level kernels/ directory is installed as fastmeta.kernels (never as `kernels`).
    if os.path.isdir(os.path.join(ROOT, "kernels")):
        package_dir["fastmeta.kernels"] = "kernels"
        pkgs.append("fastmeta.kernels")
        subs = find_packages(where=os.path.join(ROOT, "kernels"))
        pkgs += ["fastmeta.kernels." + p for p in subs]
    return sorted(set(pkgs)), package_dir


def _cmake_version(exe):
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"version\s+(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _find_cmake():
    candidates = []
    if os.environ.get("CMAKE"):
        candidates.append(os.environ["CMAKE"])
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    try:  # the `cmake` pip package (no download: only if it is installed already)
        import cmake as _cmake_pkg

        candidates.append(os.path.join(_cmake_pkg.CMAKE_BIN_DIR, "cmake"))
    except Exception:
        pass
    for exe in candidates:
        ver = _cmake_version(exe)
        if ver is not None and ver >= MIN_CMAKE:
            return exe
    raise RuntimeError(
        "fastmeta: CMake >= %d.%d not found (tried %s); `pip install cmake` or set "
        "FASTMETA_BUILD_EXT=0 for a pure-Python install" % (*MIN_CMAKE, candidates or "nothing")
    )


def _cuda_decision():
    """(use_cuda, reason): compile csrc/cuda/*.cu only where it can work."""
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cu = [f for f in os.listdir(cuda_dir) if f.endswith(".cu")] if os.path.isdir(cuda_dir) else []
    if os.environ.get("FASTMETA_BUILD_CUDA", "").strip() == "0":
        return False, "FASTMETA_BUILD_CUDA=0"
    if not cu:
        return False, "no .cu files in csrc/cuda"
    try:
        import torch
    except ImportError as e:  # reported properly by CMake later
        return False, f"torch not importable ({e})"
    if not torch.cuda._is_compiled():
        return False, f"torch {torch.__version__} was built without CUDA"
    nvcc = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if nvcc is None and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if nvcc is None:
        return False, "nvcc not found"
    return True, f"torch has CUDA, nvcc at {nvcc}"


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir=ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = os.path.abspath(sourcedir)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt in build/ and puts the module where setuptools wants
    it (the package dir for editable/in-place builds, build_lib otherwise)."""

    def run(self):
        self._fm_inplace = bool(self.inplace or getattr(self, "editable_mode", False))
        try:
            import torch  # noqa: F401
        except ImportError as e:
            msg = (
                f"torch is not importable from {sys.executable} ({e}). fastmeta._C builds against "
                "the installed torch: use `pip install --no-build-isolation`, or set "
                "FASTMETA_BUILD_EXT=0."
            )
            if _build_ext_mode() == "auto":
                _log("WARNING: " + msg + " Continuing without the extension.")
                self._remove_stale_outputs()
                return
            raise RuntimeError("fastmeta: " + msg) from e
        try:
            super().run()
        except Exception as e:
            if _build_ext_mode() != "auto":
                raise
            _log(f"WARNING: building fastmeta._C failed ({e}); continuing without it")
            self._remove_stale_outputs()

    def _remove_stale_outputs(self):
        """After a failed 'auto' build, leave no module of an earlier build behind (build/lib is
        reused between builds, and editable installs keep a copy in the source tree)."""
        for ext in self.extensions:
            name = os.path.basename(self.get_ext_filename(ext.name))
            pkg_dir = os.path.join(ROOT, *ext.name.split(".")[:-1])
            paths = {self.get_ext_fullpath(ext.name), os.path.join(pkg_dir, name)}
            for path in paths:
                in_source = path == os.path.join(pkg_dir, name)
                if os.path.exists(path) and (self._fm_inplace or not in_source):
                    os.remove(path)
                    _log(f"removed stale {path}")

    def copy_extensions_to_source(self):
        """The in-place step (``build_ext --inplace``, editable installs) with an atomic
        replace. setuptools' own step copies the built module over the one in the package by
        rewriting that file in place, under every process that has it loaded (a rebuild while
        tests or training runs use the module can crash them); here the new module is copied
        next to it and renamed over it in one step: a running process keeps the module it
        loaded, a starting one gets the old or the new one, never a partial file."""
        inplace_equivalent = getattr(self, "_get_inplace_equivalent", None)
        if inplace_equivalent is None:  # a setuptools without the helper: its own copy
            return super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = inplace_equivalent(build_py, ext)
            if not os.path.exists(regular_file):
                if ext.optional:
                    continue
                raise RuntimeError(f"fastmeta: the build produced no {regular_file}")
            os.makedirs(os.path.dirname(inplace_file) or ".", exist_ok=True)
            tmp = f"{inplace_file}.tmp-{os.getpid()}"
            try:
                shutil.copy2(regular_file, tmp)
                os.replace(tmp, inplace_file)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            _log(f"{regular_file} -> {inplace_file} (atomic replace)")

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        extdir = os.path.dirname(ext_path)
        os.makedirs(extdir, exist_ok=True)
        if os.path.exists(ext_path):  # never ship a module left by an earlier build
            os.remove(ext_path)
        debug = os.environ.get("FASTMETA_DEBUG", "0") == "1" or self.debug
        cfg = "Debug" if debug else "Release"
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        build_temp = os.path.join(ROOT, "build", f"cmake-{tag}-{cfg.lower()}")
        os.makedirs(build_temp, exist_ok=True)

        use_cuda, reason = _cuda_decision()
        if use_cuda:
            _log(f"compiling CUDA sources ({reason})")
        else:
            _log(f"skipping CUDA sources ({reason})")

        cmake = _find_cmake()
        version = self.distribution.get_version() or "0.0.0"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}",
            f"-DFASTMETA_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DFASTMETA_CUDA_REASON={reason}",
            f"-DFASTMETA_VERSION={version}",
        ]
        cache = os.path.join(build_temp, "CMakeCache.txt")
        fresh = not os.path.exists(cache)
        if fresh and shutil.which("ninja") and "CMAKE_GENERATOR" not in os.environ:
            args += ["-G", "Ninja"]
        if os.environ.get("CMAKE_ARGS"):
            args += os.environ["CMAKE_ARGS"].split()
        jobs = os.environ.get("MAX_JOBS") or "2"

        _log(f"cmake {cmake}, build dir {build_temp}, output {extdir}, {jobs} jobs")
        subprocess.check_call([cmake, "-S", ext.sourcedir, "-B", build_temp, *args])
        subprocess.check_call([cmake, "--build", build_temp, "--config", cfg, "-j", str(jobs)])
        if not os.path.exists(ext_path):
            raise RuntimeError(f"fastmeta: CMake did not produce {ext_path}")


packages, package_dir = _packages()
ext_modules = [] if _build_ext_mode() == "0" else [CMakeExtension("fastmeta._C")]
if not ext_modules:
    _log("FASTMETA_BUILD_EXT=0: skipping the C++ extension (pure-Python install)")

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
