"""Builds crossdiff_ext._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment flags:
  CROSSDIFF_CUDA=1   require the CUDA kernels (fail if torch lacks CUDA or nvcc is missing)
  CROSSDIFF_CUDA=0   skip them
  (unset)            build them when torch.version.cuda is set and nvcc is found; a GPU is never needed
  TORCH_CUDA_ARCH_LIST  defaults to "8.0+PTX;9.0a" (generic Ampere + PTX, and Hopper) when unset; no GPU is
                        visible on the build machines
  MAX_JOBS           parallel compile jobs (ninja)

The extension is built against Python's stable ABI (abi3, Py_LIMITED_API = 3.10): its only Python code is the
module init in csrc/ops.cpp, so one build (crossdiff_ext/_C.abi3.so) loads under every CPython >= 3.10 with the
same torch. That is what lets a build made on a Python 3.11 machine run on a GPU machine's Python 3.12
(kernels_bench/gpu_session.sh prebuild).
"""

import glob
import importlib.util
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup
from torch.utils import cpp_extension

# The oldest CPython whose stable ABI the extension targets (csrc/ops.cpp uses PyModule_Create and two methods).
LIMITED_API = "0x030A0000"
ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
os.chdir(ROOT)  # the relative source paths below are relative to this file


def _load_source_hash():
    spec = importlib.util.spec_from_file_location("_build_hash", os.path.join(ROOT, "crossdiff_ext", "_build_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(CSRC)


def _find_cuda_home():
    """A CUDA toolkit root with nvcc, headers and libcudart. `nvcc` on the PATH may be a wrapper script, so its
    parent directory is only the last guess."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, candidates):
        has_lib = any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and has_lib:
            return root
    return None


def _want_cuda():
    import torch

    flag = os.environ.get("CROSSDIFF_CUDA", "").strip().lower()
    cuda_sources = glob.glob(os.path.join(CSRC, "cuda", "*.cu"))
    cuda_home = _find_cuda_home()
    possible = bool(torch.version.cuda) and cuda_home is not None
    if flag in ("0", "false", "no", "off"):
        return False, cuda_home
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                "CROSSDIFF_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc {'found' if cuda_home else 'not found'}. "
                "Install a CUDA build of torch (pip install torch==2.11.0) and put nvcc on the PATH."
            )
        if not cuda_sources:
            raise RuntimeError("CROSSDIFF_CUDA=1 but csrc/cuda has no .cu sources")
        return True, cuda_home
    return possible and bool(cuda_sources), cuda_home


def _extension():
    # Paths relative to this file: setuptools lists extension sources in the package manifest, which refuses
    # absolute paths (pip builds with the repository root as the working directory).
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define = [("CROSSDIFF_SOURCE_HASH", f'"{_load_source_hash()}"'), ("Py_LIMITED_API", LIMITED_API)]
    # -ffp-contract=off: no multiply-add contraction, so every score is the rounded product f * w (score_key.h).
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fdiagnostics-color=always"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp its `omp parallel` is ignored and every CPU
        # kernel runs on one thread. libgomp is the OpenMP runtime torch itself loads on Linux.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda, cuda_home = _want_cuda()
    if not with_cuda:
        return cpp_extension.CppExtension(
            "crossdiff_ext._C",
            sources,
            define_macros=define,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    # cpp_extension reads CUDA_HOME at import; set it before building so it finds this nvcc.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    # Hopper SASS (sm_90a: the target machines) plus a generic Ampere SASS + PTX that newer GPUs JIT-compile.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    # ATen/cuda headers include cublas/cusparse headers, which the minimal toolkit here lacks and the nvidia
    # pip wheels carry (docs/backends.md).
    include_dirs = [p for p in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include"))]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return cpp_extension.CUDAExtension(
        "crossdiff_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define + [("CROSSDIFF_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


class _BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus: an in-place build removes a version-tagged _C left by an older build, which
    Python would import before the abi3 one (its suffix comes first in importlib's extension suffixes)."""

    def run(self):
        super().run()
        if self.inplace:
            for stale in glob.glob(os.path.join(ROOT, "crossdiff_ext", "_C.cpython-*.so")):
                os.remove(stale)


# Metadata, dependencies, extras and the console script live in pyproject.toml; this file adds what only code can
# say: the extension (its sources depend on what torch and the machine offer) and the package data.
setup(
    packages=find_packages(include=["crossdiff_ext", "crossdiff_ext.*"]),
    # backend "auto"'s measured per-GPU tables (written by `python -m kernels_bench auto_table --write`) and the
    # PEP 561 marker
    package_data={
        "crossdiff_ext": ["auto_tables.json", "py.typed"],
        # the demo's toy pair, built from its recipe (crossdiff_ext/demo/toy_models.py) and shipped
        "crossdiff_ext.demo": ["pair/*.json", "pair/*/*.json", "pair/*/*.jinja", "pair/*/*.safetensors"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(no_python_abi_suffix=False)},
    # the wheel's tag says what the build is: cp310-abi3
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
