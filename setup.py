"""Builds metaformer and its extension metaformer._C (C++ always; CUDA when the installed torch has it)."""

import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    """CUDA kernels are built when torch has CUDA, unless METAFORMER_BUILD_CUDA=0/1 says otherwise."""
    flag = os.environ.get("METAFORMER_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        if flag == "1" and torch.version.cuda is None:
            raise RuntimeError(
                "METAFORMER_BUILD_CUDA=1 but the installed torch has no CUDA; install a CUDA build of torch "
                "or unset METAFORMER_BUILD_CUDA"
            )
        return flag == "1"
    if flag:
        raise RuntimeError(f"METAFORMER_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return torch.version.cuda is not None


def extensions() -> list:
    """The metaformer._C extension, with or without its CUDA sources."""
    # at::parallel_for is inlined from ATen's OpenMP backend: without -fopenmp it silently runs on one
    # thread. Linking libgomp.so.1 resolves to the copy torch already loaded (same soname), so one pool.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        # selftest.cu is the kernels' standalone test program (its own main), built by scripts/check_cuda_build.sh
        sources += sorted(f for f in glob.glob(os.path.join("csrc", "cuda", "*.cu")) if not f.endswith("selftest.cu"))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*_launcher.cpp")))
        nvcc_flags = ["-O3", "--fmad=false"]
        return [
            CUDAExtension(
                "metaformer._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("METAFORMER_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [CppExtension("metaformer._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                         extra_link_args=link_flags)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
