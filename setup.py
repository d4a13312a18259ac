"""Builds rsp_fast._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA
build of torch are present. Install with ``pip install --no-build-isolation -e .`` after
torch (an isolated build would fetch a second torch).

Switches: USE_CUDA=0 skips the CUDA kernels, DEBUG=1 builds without optimisation,
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0+PTX": A100, H100/H200).
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    use_cuda = os.getenv("USE_CUDA", "1") == "1" and torch.version.cuda is not None and CUDA_HOME is not None
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets masked divisions be vectorised (lanes divide by 1, never trap);
    # -fopenmp makes at::parallel_for parallel (without it the header runs the loop serially);
    # the library it links, libgomp.so.1, is the one torch has already loaded
    extra = {"cxx": opt + ["-fopenmp", "-fno-trapping-math"]}
    kwargs = {}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
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
