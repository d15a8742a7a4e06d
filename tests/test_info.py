"""``flute info`` (flute/info.py): the report matches the process's own kernel state, and each
slow fallback gets its hint."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from flute import info, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _healthy():
    """A report of an AVX-512 VBMI + VNNI machine with every unit built and a working GPU."""
    return {
        "cpu": {"isa_flags": ["avx2", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni"],
                "transparent_hugepage": "madvise"},
        "cpu_kernel": {"built": True, "error": "", "isa": "avx512", "mode": "int8", "vnni": "avx512vnni_ymm",
                       "amx": False, "units": ["kernel_int8_avx512.cpp", "kernel_int8_rows16_avx512.cpp",
                                               "kernel_int8_avx512vnni_ymm.cpp"]},
        "cuda": {"kernel_built": True, "error": "", "devices": [{"name": "NVIDIA H100", "capability": "9.0"}]},
    }


def test_a_healthy_machine_gets_no_hints(monkeypatch):
    for var in ("FLUTE_CPU_ISA", "FLUTE_CPU_VNNI", "FLUTE_CPU_AMX"):
        monkeypatch.delenv(var, raising=False)
    assert info.hints(_healthy()) == []


@pytest.mark.parametrize("change, expect", [
    (lambda r: r["cpu_kernel"].update(built=False, error="not built: no compiler"), "not built: no compiler"),
    (lambda r: r["cpu_kernel"].update(isa="portable"), "portable kernels run although this CPU has AVX2"),
    (lambda r: r["cpu_kernel"].update(mode="exact"), "mode 'exact'"),
    (lambda r: r["cpu_kernel"]["units"].remove("kernel_int8_avx512.cpp"), "could run kernel_int8_avx512.cpp"),
    (lambda r: (r["cpu"]["isa_flags"].append("amx_bf16"), r["cpu_kernel"]["units"].append("kernel_amx.cpp")),
     "did not grant its tile state"),
    (lambda r: r["cpu_kernel"].update(isa="avx2", vnni=""), "int16 form although this CPU has VNNI"),
    (lambda r: r["cpu_kernel"].update(isa="avx2", vnni="avx512bw_ymm"), "int16 form although this CPU has VNNI"),
    (lambda r: (r["cpu"].update(isa_flags=["avx2", "avx512bw", "avx512vl"]),
                r["cpu_kernel"].update(isa="avx2", vnni="", vnni_forms=["avx512bw_ymm"])), "EVEX build (32)"),
    (lambda r: r["cpu_kernel"].update(isa="avx2", vnni="avxvnni", vnni_forms=["avxvnni", "avx512vnni_ymm"]),
     "AVX512-VNNI one (32)"),
    (lambda r: r["cpu"].update(transparent_hugepage="never"), "transparent huge pages are off"),
    (lambda r: r["cuda"].update(kernel_built=False, error="not built"), "flute._C is not available"),
    (lambda r: r["cuda"]["devices"].append({"name": "Tesla T4", "capability": "7.5"}), "Tesla T4 (sm_75)"),
])
def test_each_fallback_gets_its_hint(change, expect, monkeypatch):
    for var in ("FLUTE_CPU_ISA", "FLUTE_CPU_VNNI", "FLUTE_CPU_AMX"):
        monkeypatch.delenv(var, raising=False)
    report = copy.deepcopy(_healthy())
    change(report)
    found = info.hints(report)
    assert len(found) == 1 and expect in found[0], found


def test_report_is_this_process_state():
    report = info.collect()
    kernel = report["cpu_kernel"]
    assert kernel["built"] == ops.HAS_CPU_KERNEL and kernel["isa"] == ops.get_cpu_isa()
    assert kernel["mode"] == ops.get_cpu_mode()
    if ops.HAS_CPU_KERNEL:
        assert set(kernel["units"]) <= set(info.UNIT_FLAGS), kernel["units"]
        assert kernel["vnni"] == ops.get_cpu_vnni() and kernel["vnni_forms"] == ops.get_cpu_vnni_forms()
        assert kernel["vnni"] in kernel["vnni_forms"] + [""]
    text = info.format_report(report)
    assert f"path {kernel['isa']}" in text if ops.HAS_CPU_KERNEL else "not available" in text
    if ops.HAS_CPU_KERNEL:
        r16 = [int(torch.ops.flute.cpu_rows16_m(b)) for b in (2, 3, 4)]
        assert kernel["rows16_m"] == {str(b): v for b, v in zip((2, 3, 4), r16)}
        assert kernel["tile_pairs"] == bool(torch.ops.flute.cpu_tile_pairs())
        assert ("16-row kernel from " + " / ".join(str(v) if v else "-" for v in r16) + " rows") in text
        assert json.loads(json.dumps(report))["cpu_kernel"]["panel_m"] == kernel["panel_m"]
    assert report["cuda"]["kernel_built"] == ops.HAS_CUDA_KERNEL


@pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="flute._cpu not built")
def test_cli_names_a_forced_portable_path():
    """``flute info --json`` in a process whose FLUTE_CPU_ISA forces the portable kernels: the JSON
    says so, and on an AVX2 CPU a hint names the variable."""
    env = dict(os.environ, FLUTE_CPU_ISA="portable", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "flute", "info", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cpu_kernel"]["isa"] == "portable"
    if "avx2" in report["cpu"]["isa_flags"]:
        assert any("FLUTE_CPU_ISA=portable" in h for h in report["hints"]), report["hints"]


def test_unit_flags_name_every_optional_unit_of_setup():
    """info.UNIT_FLAGS (which CPUs each optional unit serves) names exactly setup.py's
    OPTIONAL_KERNELS, so that a unit added there gets its hint."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    keys = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(getattr(t, "id", "") == "OPTIONAL_KERNELS" for t in node.targets)).keys
    assert {k.value for k in keys} == set(info.UNIT_FLAGS)
