"""Build script for flute.

``pip install --no-build-isolation -e .`` installs the pure-Python package (CPU op included) on any
machine. The CUDA extension ``flute._C`` is built when torch has CUDA and nvcc is found, or when
forced:

    FLUTE_BUILD_CUDA=1   build the extension (fail if it cannot be built)
    FLUTE_BUILD_CUDA=0   never build it
    (unset)              build it if possible
    FLUTE_CUDA_ARCHS     e.g. "80;86;89;90a" (the default): the SM targets of the build
"""
import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;86;89;90a"


def read_version():
    with open(os.path.join(HERE, "flute", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def cuda_extensions():
    """The CUDA extension ``flute._C`` (csrc/cuda: kernels + the torch binding) and its cmdclass.

    ``flute._C`` is Python-version-independent (``py_limited_api``: the binding registers its ops
    with TORCH_LIBRARY_IMPL only and has no pybind11 module), so a build made with one CPython 3.x
    (>= 3.10) loads under another with the same torch. CUDA_HOME must be the toolkit's root (torch
    guesses it from the nvcc on PATH, which may be a wrapper script)."""
    mode = os.environ.get("FLUTE_BUILD_CUDA", "").strip()
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError("FLUTE_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        print("flute: building without the CUDA extension (no CUDA torch or no nvcc)")
        return [], {}
    cuda_dir = os.path.join("csrc", "cuda")
    sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cpp")) + glob.glob(os.path.join(cuda_dir, "*.cu")))
    gencode = []
    for arch in os.environ.get("FLUTE_CUDA_ARCHS", DEFAULT_ARCHS).split(";"):
        arch = arch.strip()
        if arch:
            gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    limited = ["-DPy_LIMITED_API=0x030A0000"]  # CPython 3.10 stable ABI: one _C for 3.10+
    ext = CUDAExtension(
        name="flute._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, cuda_dir)],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + limited,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + limited + gencode,
        },
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="flute-lut",
    version=read_version(),
    description="Lookup-table weight-only quantization for LLMs with a fused dequantize-GEMM",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flute", "flute.*"]),
    package_data={"flute": ["data/*"]},
    install_requires=["torch>=2.4", "safetensors>=0.4", "tqdm", "numpy"],
    extras_require={
        "hf": ["transformers>=5.19", "accelerate", "gguf", "sentencepiece"],
        "test": ["pytest", "transformers>=5.19", "accelerate", "gguf", "sentencepiece"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": ["flute = flute.cli:main"],
        "vllm.general_plugins": ["flute = flute.integrations.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
