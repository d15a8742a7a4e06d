"""setup.py's optional CPU units (OPTIONAL_KERNELS: kernel_amx.cpp, kernel_avx512bf16.cpp, the int8
AVX-512, 16-row, AVX-VNNI and AVX512-VNNI-on-ymm units):
a compiler that rejects their flags builds the extension with csrc/cpu/kernel_fallbacks.cpp in
their place, whose stand-ins must define each unit's functions with the very signatures the
binding links against."""
import importlib.util
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

from flute import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_DIR = os.path.join(ROOT, "csrc", "cpu")
MACROS = ["FLUTE_WITHOUT_KERNEL_AMX", "FLUTE_WITHOUT_KERNEL_AVX512BF16", "FLUTE_WITHOUT_KERNEL_INT8_AVX512",
          "FLUTE_WITHOUT_KERNEL_INT8_ROWS16", "FLUTE_WITHOUT_KERNEL_INT8_AVXVNNI",
          "FLUTE_WITHOUT_KERNEL_INT8_AVX512VNNI_YMM"]
# The functions of the optional units the binding calls (lut_kernel.h), by unit.
UNIT_FUNCTIONS = {
    "FLUTE_WITHOUT_KERNEL_AMX": {"kernel_amx_built", "amx_prepare_x", "gemm_amx", "gemm_amx_rows"},
    "FLUTE_WITHOUT_KERNEL_AVX512BF16": {"kernel_avx512bf16_built", "gemm_avx512bf16"},
    "FLUTE_WITHOUT_KERNEL_INT8_AVX512": {"kernel_int8_avx512_built", "gemm_int8_avx512", "int8_prepare_avx512",
                                         "int8_prepare_compact_avx512", "int8_prepare_tail_avx512",
                                         "quantize_x_int8_avx512"},
    "FLUTE_WITHOUT_KERNEL_INT8_ROWS16": {"kernel_int8_rows16_built", "rows16_quantize_avx512", "bf16_to_f32_avx512",
                                         "gemm_int8_rows16_avx512"},
    "FLUTE_WITHOUT_KERNEL_INT8_AVXVNNI": {"kernel_int8_avxvnni_built", "gemm_int8_avxvnni"},
    "FLUTE_WITHOUT_KERNEL_INT8_AVX512VNNI_YMM": {"kernel_int8_avx512vnni_ymm_built", "gemm_int8_avx512vnni_ymm"},
}

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("c++") or not shutil.which("nm"),
    reason="x86-64 with a C++ compiler and nm only")


def defined_functions(path):
    """{function name: demangled signature} of the flute_cpu:: functions defined (text symbols)
    in an object or shared library, anonymous namespaces excluded."""
    out = subprocess.run(["nm", "-C", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ [Tt] (flute_cpu::(\w+)\(.*\))$", line.strip())
        if m and "anonymous" not in line:
            found[m.group(2)] = m.group(1)
    return found


@pytest.mark.parametrize("macro", MACROS)
def test_fallbacks_stand_in_for_each_unit(tmp_path, macro):
    """kernel_fallbacks.cpp with one unit's macro defines that unit's functions and no others
    (with none, nothing: a normal build must not get a duplicate)."""
    obj = tmp_path / "fallbacks.o"
    src = os.path.join(CPU_DIR, "kernel_fallbacks.cpp")
    subprocess.run(["c++", "-std=c++17", "-c", f"-D{macro}", "-I", CPU_DIR, src, "-o", str(obj)],
                   check=True)
    assert set(defined_functions(str(obj))) == UNIT_FUNCTIONS[macro]
    subprocess.run(["c++", "-std=c++17", "-c", "-I", CPU_DIR, src, "-o", str(obj)], check=True)
    assert defined_functions(str(obj)) == {}


@pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")
def test_fallback_signatures_match_the_built_units(tmp_path):
    """Every stand-in has the signature of the function the built extension defines (a stand-in
    that drifted would leave an older compiler's build with an undefined symbol)."""
    obj = tmp_path / "fallbacks.o"
    subprocess.run(["c++", "-std=c++17", "-c", *[f"-D{m}" for m in MACROS], "-I", CPU_DIR,
                    os.path.join(CPU_DIR, "kernel_fallbacks.cpp"), "-o", str(obj)], check=True)
    stand_ins = defined_functions(str(obj))
    built = defined_functions(ops.cpu_extension_file(os.path.dirname(ops.__file__)))
    assert set(stand_ins) == set().union(*UNIT_FUNCTIONS.values())
    for name, signature in stand_ins.items():
        assert built.get(name) == signature, (name, signature, built.get(name))


@pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")
def test_int8_block_loop_is_inlined_into_every_kernel():
    """int8_tiles.h's for_blocks is always inlined: GCC 12 once left it out of line for the 4-bit
    decode (AVX2) and the pair decode (AVX-512), and the block body then kept its accumulators in
    memory: the 4-bit M = 1 call took 10-21% longer (benchmarks/CPU_NOTES.md item 122)."""
    out = subprocess.run(["nm", "-C", ops.cpu_extension_file(os.path.dirname(ops.__file__))],
                         capture_output=True, text=True, check=True).stdout
    outlined = [line.strip()[:160] for line in out.splitlines() if "for_blocks<" in line]
    assert not outlined, outlined


def load_setup_py():
    """setup.py as a module (its ``setup()`` call runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("flute_setup_py", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiler_probe_answers_false_instead_of_raising(monkeypatch):
    """setup.py's probe of an optional unit's flags says False where the compiler rejects them, so
    the build goes on without that unit: through torch's ninja compile it once raised a
    RuntimeError there, and a compiler without -mavxvnni (GCC 10) failed the whole install."""
    setup_py = load_setup_py()
    accepts = setup_py.compiler_accepts
    assert accepts(["-mavx2"], "__m256i f(__m256i a) { return _mm256_add_epi32(a, a); }")
    assert not accepts(["-mflute-no-such-flag"], "int f() { return 0; }")
    # an intrinsic its flags do not enable (GCC and Clang both refuse to inline it)
    assert not accepts(["-mavx2"], "__m512i f(__m512i a) { return _mm512_add_epi32(a, a); }")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not accepts(["-mavx2"], "__m256i f(__m256i a) { return _mm256_add_epi32(a, a); }")
    # each unit's probe with its own flags agrees with the unit being in the built extension
    monkeypatch.delenv("CXX")
    if ops.HAS_CPU_KERNEL:
        built = set(torch.ops.flute.cpu_units())
        flags = {os.path.basename(src): f for src, f in setup_py.cpu_extensions()[0].isa_flags.items()}
        left_out = os.environ.get("FLUTE_CPU_WITHOUT", "")  # units a build was asked to leave out
        for name, (_, code) in setup_py.OPTIONAL_KERNELS.items():
            if name in flags and name not in left_out:
                assert accepts(flags[name], code) == (name in built), name
