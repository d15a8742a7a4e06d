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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    gencode = []
    for arch in os.environ.get("FLUTE_CUDA_ARCHS", DEFAULT_ARCHS).split(";"):
        arch = arch.strip()
        if arch:
            gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="flute._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + gencode,
        },
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
