"""Builds rsp_fast._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA
build of torch are present. Install with ``pip install --no-build-isolation -e .`` after
torch (an isolated build would fetch a second torch).

Switches: USE_CUDA=0 skips the CUDA kernels (USE_CUDA=1: stop if there is no CUDA toolkit
instead of building the CPU kernels alone), DEBUG=1 builds without optimisation,
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "7.5;8.0;9.0+PTX": T4, A100 and the
other Ampere and Ada GPUs, H100/H200 and, through the PTX, later ones).
"""
import glob
import os
import sys

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
STANDARD_CUDA = "/usr/local/cuda"
CUDA_ARCHS = "7.5;8.0;9.0+PTX"  # rsp_fast.ops.dispatch.CUDA_MIN_CAPABILITY is the first


def _has_toolkit(home: str | None) -> bool:
    """A CUDA toolkit to build with: nvcc, and the runtime library the extension links."""
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and any(
        glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def cuda_toolkit() -> tuple[str | None, str]:
    """The CUDA toolkit to compile the CUDA kernels with, or None and why not. torch's choice
    (CUDA_HOME, else the folder above the nvcc on PATH, else /usr/local/cuda) where it is a whole
    toolkit; else /usr/local/cuda where that is one (an nvcc wrapper script on PATH makes torch
    choose the wrapper's folder); else none, and the build makes the CPU kernels alone."""
    if os.getenv("USE_CUDA", "1") != "1":
        return None, "USE_CUDA=0"
    if torch.version.cuda is None:
        return None, f"this torch ({torch.__version__}) is not a CUDA build"
    chosen = cpp_extension.CUDA_HOME
    if _has_toolkit(chosen):
        return chosen, ""
    if chosen != STANDARD_CUDA and not os.getenv("CUDA_HOME") and _has_toolkit(STANDARD_CUDA):
        return STANDARD_CUDA, ""
    where = f"at {chosen!r}" if chosen else "(set CUDA_HOME to one)"
    return None, f"no CUDA toolkit with bin/nvcc and lib64/libcudart.so {where}"


def _nvidia_wheel_includes() -> list[str]:
    """cuSPARSE/cuBLAS headers that ATen's CUDA headers include come from the nvidia pip wheels."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += [d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.exists(os.path.join(d, "cusparse.h"))]
    return found


def get_extensions():
    debug = os.getenv("DEBUG", "0") == "1"
    home, why_not = cuda_toolkit()
    use_cuda = home is not None
    if use_cuda:
        cpp_extension.CUDA_HOME = home  # what the build's nvcc and library paths are read from
        print(f"rsp_fast: building the CPU and CUDA kernels (CUDA toolkit {home})", file=sys.stderr)
    elif os.getenv("USE_CUDA") == "1":  # asked for, so not dropped quietly
        sys.exit(f"rsp_fast: USE_CUDA=1 but {why_not}")
    else:
        print(f"rsp_fast: building the CPU kernels only: {why_not}", file=sys.stderr)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -g0: Python's own CFLAGS ask for debug symbols, which tripled the library's size (15 MB)
    opt = ["-O0", "-g"] if debug else ["-O3"]
    host_opt = opt if debug else opt + ["-g0"]
    # -fno-trapping-math lets masked divisions be vectorised (lanes divide by 1, never trap);
    # -fopenmp makes at::parallel_for parallel (without it the header runs the loop serially);
    # the library it links, libgomp.so.1, is the one torch has already loaded
    extra = {"cxx": host_opt + ["-fopenmp", "-fno-trapping-math"]}
    kwargs = {}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "--extended-lambda"]
        kwargs["include_dirs"] = _nvidia_wheel_includes()
    ext = (CUDAExtension if use_cuda else CppExtension)
    return [ext("rsp_fast._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=False,
                **kwargs)]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
