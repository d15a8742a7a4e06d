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
import sys

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
    # Tuning experiments only (benchmarks/NOTES.md): e.g. FLUTE_CUDA_DEFINES="FLUTE_PAIR_COPIES_WIDE=8"
    defines = [f"-D{d}" for d in os.environ.get("FLUTE_CUDA_DEFINES", "").split() if d]
    ext = CUDAExtension(
        name="flute._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, cuda_dir)],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + limited,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + limited + gencode + defines,
        },
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cpu_extensions():
    """The CPU lookup-table kernel ``flute._cpu`` (csrc/cpu), built on every machine with a C++
    compiler (``FLUTE_BUILD_CPU=0`` skips it; without it the CPU op falls back to the reference).

    Each ISA path is its own translation unit with its own flags (``isa_flags``, applied by
    :func:`_build_ext_class`): AVX-512 and AVX2 on x86-64, the portable one with none; the binding
    picks a path at run time from cpuid, so the build is not ``-march=native`` and runs on any
    x86-64 (aarch64 builds the portable path only). ``py_limited_api``: one build for CPython 3.10+.

    Units whose flags an older compiler lacks (``OPTIONAL_KERNELS``) are probed first and left out
    when the compiler rejects them; ``kernel_fallbacks.cpp`` stands in for them and the binding
    runs the other paths. ``FLUTE_CPU_WITHOUT=kernel_amx.cpp,...`` leaves units out on purpose.
    """
    if os.environ.get("FLUTE_BUILD_CPU", "").strip() == "0":
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return []
    import platform
    cpu_dir = os.path.join("csrc", "cpu")
    isa_flags = {os.path.join(cpu_dir, "kernel_portable.cpp"): [],
                 os.path.join(cpu_dir, "kernel_pair_portable.cpp"): []}
    if platform.machine().lower() in ("x86_64", "amd64"):
        # -ffp-contract=off: the panel decodes round like the portable path (mul, then add: the
        # same bits on every path); FMAs stay where the intrinsics ask for them
        isa_flags[os.path.join(cpu_dir, "kernel_avx2.cpp")] = ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avx2.cpp")] = ["-mavx2", "-mfma"]
        # the same int16 step EVEX encoded (32 ymm registers; GCC 5 on, so not optional)
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avx512bw_ymm.cpp")] = ["-mavx2", "-mfma", "-mavx512vl", "-mavx512bw"]
        # the same kernel with a 256-bit vpdpwssd: AVX-VNNI (VEX) and AVX512-VNNI on ymm (EVEX)
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avxvnni.cpp")] = ["-mavx2", "-mfma", "-mavxvnni"]
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avx512vnni_ymm.cpp")] = ["-mavx2", "-mfma", "-mavx512vl", "-mavx512vnni"]
        isa_flags[os.path.join(cpu_dir, "kernel_pair_avx2.cpp")] = ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-ffp-contract=off"]
        isa_flags[os.path.join(cpu_dir, "kernel_avx512.cpp")] = avx512
        isa_flags[os.path.join(cpu_dir, "kernel_pair_avx512.cpp")] = avx512
        # the bf16 decoders (avx512bf16_common.h) gather 3-bit codes with vpermb (VBMI)
        bf16 = avx512 + ["-mavx512bf16", "-mavx512vbmi"]
        isa_flags[os.path.join(cpu_dir, "kernel_avx512bf16.cpp")] = bf16
        isa_flags[os.path.join(cpu_dir, "kernel_amx.cpp")] = bf16 + ["-mamx-tile", "-mamx-bf16"]
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avx512.cpp")] = avx512 + ["-mavx512vbmi", "-mavx512vnni"]
        isa_flags[os.path.join(cpu_dir, "kernel_int8_rows16_avx512.cpp")] = avx512 + ["-mavx512vbmi", "-mavx512vnni"]
        isa_flags[os.path.join(cpu_dir, "kernel_fallbacks.cpp")] = []
    emulate = (os.environ.get("FLUTE_CPU_EMULATE_AVX512", "").strip() == "1"
               and os.path.join(cpu_dir, "kernel_amx.cpp") in isa_flags)  # x86-64 only
    if emulate:
        # Test builds only (.ci/avx512_emulated.sh): the AVX-512 units with their intrinsics in
        # software (csrc/cpu/emulation/immintrin.h, SIMDe), on an AVX2 CPU; AMX has no software form.
        # -O1: at -O3 GCC spent over 7 minutes on one unit (the kernels' forced unrolling of
        # SIMDe's portable code); at -O1 the three take ~1.5 minutes
        # FLUTE_CPU_EMULATED_AVX512 here too (not only in the binding's flags): it empties the
        # kernels' FLUTE_UNROLL pragmas (lut_kernel.h), without which GCC took 7-10 minutes on the
        # emulated int8 unit alone (CPU_NOTES items 224 and 230)
        emu = ["-O1", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-Wno-psabi", "-DFLUTE_CPU_EMULATED_AVX512",
               "-I" + os.path.join(HERE, cpu_dir, "emulation")]
        # the native units at -O1 as well: this build tests results, never speed
        for src in isa_flags:
            isa_flags[src] = isa_flags[src] + ["-O1"]
        for name in ("kernel_avx512.cpp", "kernel_avx512bf16.cpp", "kernel_int8_avx512.cpp",
                     "kernel_int8_rows16_avx512.cpp", "kernel_pair_avx512.cpp"):
            isa_flags[os.path.join(cpu_dir, name)] = emu
        # both VNNI forms of the AVX2 int8 kernel with vpdpwssd in software (the AVX2 rest native)
        for name in ("kernel_int8_avxvnni.cpp", "kernel_int8_avx512vnni_ymm.cpp"):
            isa_flags[os.path.join(cpu_dir, name)] = emu + ["-DFLUTE_EMULATED_AVXVNNI"]
        # the EVEX int16 unit as plain AVX2 (its instructions are AVX2's; the host has no EVEX)
        isa_flags[os.path.join(cpu_dir, "kernel_int8_avx512bw_ymm.cpp")] = emu
        del isa_flags[os.path.join(cpu_dir, "kernel_amx.cpp")]
        isa_flags[os.path.join(cpu_dir, "kernel_fallbacks.cpp")] = ["-DFLUTE_WITHOUT_KERNEL_AMX"]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext = CppExtension(
        name="flute._cpu",
        sources=[os.path.join(cpu_dir, f) for f in ("binding.cpp", "python_entry.cpp", "settings.cpp", "fused_gemm.cpp", "int8_gemm.cpp", "int8_table.cpp", "dense_gemv_op.cpp")] + sorted(isa_flags),
        include_dirs=[os.path.join(HERE, cpu_dir)],
        # -fopenmp: at::parallel_for is inlined from ATen's OpenMP backend; without the flag its
        # pragma is ignored and every call runs on one thread whatever torch.set_num_threads says.
        extra_compile_args={"cxx": ["-O1" if emulate else "-O3", "-std=c++20", "-DPy_LIMITED_API=0x030A0000"] + openmp
                            + (["-DFLUTE_CPU_EMULATED_AVX512"] if emulate else [])},
        extra_link_args=openmp,
        depends=[os.path.join(cpu_dir, h) for h in ("lut_kernel.h", "avx2_common.h", "avx512_common.h", "int8_avx2_kernel.h",
                                                  "avx512bf16_common.h", "amx_tiles.h", "int8_tiles.h", "pair_lut.h", "tile16_avx512.h",
                                                  "binding.h")],
        py_limited_api=True,
        optional=True,  # a failed build (no compiler) skips it: flute then warns and runs the reference
    )
    ext.isa_flags = isa_flags
    return [ext]


# Translation units a compiler may be too old for: the stand-in's macro, and a probe that uses the
# unit's newest instructions (so that an assembler too old for them fails the probe as well).
OPTIONAL_KERNELS = {
    "kernel_amx.cpp": ("FLUTE_WITHOUT_KERNEL_AMX",
                       "void f(const void* p) { _tile_loadd(0, p, 64); _tile_dpbf16ps(1, 0, 2); _tile_release(); }"),
    "kernel_avx512bf16.cpp": ("FLUTE_WITHOUT_KERNEL_AVX512BF16",
                              "__m512 f(__m512 a, __m512 b) { return _mm512_dpbf16_ps(a, _mm512_cvtne2ps_pbh(a, b), "
                              "_mm512_cvtne2ps_pbh(b, a)); }"),
    "kernel_int8_avx512.cpp": ("FLUTE_WITHOUT_KERNEL_INT8_AVX512",
                               "__m512i f(__m512i a, __m512i b) { return _mm512_dpwssd_epi32(a, _mm512_permutexvar_epi8(a, b), b); }"),
    "kernel_int8_rows16_avx512.cpp": ("FLUTE_WITHOUT_KERNEL_INT8_ROWS16",
                                      "__m512i f(__m512i a, __m512i b) { return _mm512_dpbusd_epi32(a, "
                                      "_mm512_permutex2var_epi8(a, b, a), b); }"),
    "kernel_int8_avxvnni.cpp": ("FLUTE_WITHOUT_KERNEL_INT8_AVXVNNI",
                                "__m256i f(__m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(a, a, b); }"),
    "kernel_int8_avx512vnni_ymm.cpp": ("FLUTE_WITHOUT_KERNEL_INT8_AVX512VNNI_YMM",
                                       "__m256i f(__m256i a, __m256i b) { return _mm256_dpwssd_epi32(a, a, b); }"),
}


def compiler_accepts(flags, code):
    """Whether the C++ compiler torch's builds use (``$CXX``, else ``c++``) and its assembler build
    ``code`` (after ``#include <immintrin.h>``) with ``flags``. Run directly, not through the
    build's compiler object: torch's BuildExtension routes that through ninja, whose failure is a
    RuntimeError, not distutils' CompileError, so an older compiler crashed the install instead of
    building without the unit."""
    import shlex
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <immintrin.h>\n" + code + "\n")
        cmd = shlex.split(os.environ.get("CXX") or "c++") + ["-std=c++17", "-w", "-c", src,
                                                             "-o", os.path.join(tmp, "probe.o")]
        try:
            return subprocess.run(cmd + list(flags), capture_output=True).returncode == 0
        except OSError:  # no compiler at all
            return False


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) compiling the sources listed in an extension's
    ``isa_flags`` one by one with their own extra flags (plain C++, no torch headers)."""
    class BuildExt(base):
        def build_extension(self, ext):
            isa = getattr(ext, "isa_flags", None)
            if isa:
                isa = dict(isa)
                unwanted = {u.strip() for u in os.environ.get("FLUTE_CPU_WITHOUT", "").split(",") if u.strip()}
                without = []
                for src in list(isa):
                    name = os.path.basename(src)
                    if name not in OPTIONAL_KERNELS:
                        continue
                    macro, code = OPTIONAL_KERNELS[name]
                    if name in unwanted or not compiler_accepts(isa[src], code):
                        print(f"flute: building without {name} ("
                              + ("FLUTE_CPU_WITHOUT" if name in unwanted else
                                 f"the compiler rejects {' '.join(isa[src])}")
                              + "): its CPU path is off, the others run", file=sys.stderr)
                        without.append(macro)
                        del isa[src]
                fallbacks = [s for s in isa if os.path.basename(s) == "kernel_fallbacks.cpp"]
                for src in fallbacks:
                    isa[src] = isa[src] + [f"-D{m}" for m in without]
                # The units in parallel (MAX_JOBS, as torch's builds; default one per CPU), each
                # into its own folder: with ninja, torch's compile() writes build.ninja into its
                # output folder, so two calls must not share one.
                from concurrent.futures import ThreadPoolExecutor

                def compile_unit(item):
                    src, flags = item
                    out = os.path.join(self.build_temp, "isa", os.path.splitext(os.path.basename(src))[0])
                    os.makedirs(out, exist_ok=True)
                    return self.compiler.compile(
                        [src], output_dir=out, include_dirs=list(ext.include_dirs),
                        extra_postargs=["-O3", "-std=c++17", "-fPIC"] + flags, depends=ext.depends)
                jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
                with ThreadPoolExecutor(jobs) as pool:
                    objects = [o for objs in pool.map(compile_unit, isa.items()) for o in objs]
                ext.sources = [s for s in ext.sources if s not in ext.isa_flags]
                ext.extra_objects = list(ext.extra_objects or []) + objects
                ext.isa_flags = None
            super().build_extension(ext)
    return BuildExt


if __name__ == "__main__":  # setuptools runs it so; tests import the helpers above
    cuda_ext_modules, cmdclass = cuda_extensions()
    ext_modules = cpu_extensions() + cuda_ext_modules
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension
        cmdclass = {"build_ext": _build_ext_class(cmdclass.get("build_ext", BuildExtension))}

    setup(
        name="flute-lut",
        version=read_version(),
        description="Lookup-table weight-only quantization for LLMs with a fused dequantize-GEMM",
        long_description=open(os.path.join(HERE, "README.md")).read(),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        python_requires=">=3.10",
        packages=find_packages(include=["flute", "flute.*"]),
        package_data={"flute": ["data/*"], "flute.bench": ["native/*.c", "native/*.cpp"]},
        install_requires=["torch>=2.4", "safetensors>=0.4", "tqdm", "numpy"],
        extras_require={
            "hf": ["transformers>=5.19", "accelerate", "gguf", "sentencepiece"],
            "test": ["pytest", "hypothesis", "transformers>=5.19", "accelerate", "gguf", "sentencepiece"],
            "bench": ["matplotlib"],
        },
        entry_points={
            "console_scripts": ["flute = flute.cli:main"],
            "vllm.general_plugins": ["flute = flute.integrations.vllm:register"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
