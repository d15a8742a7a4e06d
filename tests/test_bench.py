"""CPU tests of the benchmark suite (flute.benchmark, benchmarks/*.py): the JSON it writes, its
bytes/roofline arithmetic, the L2 rotation, and how it records baselines it cannot run."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flute import benchmark as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_L2 = 50 * 2 ** 20


def _tiny_cpu_run(tmp_path, monkeypatch, *extra):
    monkeypatch.setitem(sys.modules, "marlin", None)  # make sure Marlin is absent
    out = tmp_path / "res"
    argv = ["--device", "cpu", "--shapes", "smollm2-135m/o", "--M", "1", "3", "--bits", "4", "3",
            "--group-size", "64", "--dtype", "bf16", "--out", str(out), "--no-plots",
            "--target-ms", "1", "--min-runs", "2", "--max-runs", "3", "--threads", "1", *extra]
    assert B.main(argv) == 0
    files = glob.glob(str(out / "*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        return files[0], json.load(f)


def test_cpu_mode_writes_schema_json(tmp_path, monkeypatch):
    path, doc = _tiny_cpu_run(tmp_path, monkeypatch)
    assert B.validate_result(doc) == []
    for key in ("device", "torch", "cuda", "driver", "commit", "copy_bw_gbps", "points", "command"):
        assert key in doc
    assert doc["copy_bw_gbps"] > 0 and doc["mode"] == "cpu"
    kernels = {p["kernel"] for p in doc["points"]}
    assert kernels == {"flute", "fp16", "dequant_matmul"}
    # 2 M x (fp16 + 2 configs x (flute + dequant_matmul))
    assert len(doc["points"]) == 2 * (1 + 2 * 2)
    for p in doc["points"]:
        assert (p["N"], p["K"], p["dtype"]) == (576, 576, "bf16")
        assert p["median_us"] > 0 and p["gbps"] > 0
        assert p["bytes"] == B.point_bytes(p["kernel"], p["M"], 576, 576, p["bits"], p["group_size"])
        assert math.isclose(p["roofline_pct"], 100 * p["gbps"] / doc["copy_bw_gbps"], rel_tol=1e-9)
        assert p["speedup_vs_fp16"] is not None and p["speedup_vs_fp16"] > 0
        if p["kernel"] == "fp16":
            assert p["speedup_vs_fp16"] == 1.0 and p["bits"] is None
        if p["kernel"] == "flute":
            assert p["rel_err"] < 1e-2  # the timed op matches the independent reference
            assert "dequant_matmul" in p["speedup_vs"]
            assert p["backend"] == "cpu-reference"
    assert doc["truncated"] is False


def test_marlin_absent_is_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "marlin", None)
    mod, reason = B.load_marlin()
    assert mod is None and "not importable" in reason and "MARLIN.md" in reason
    # On a CUDA device with an eligible shape, the import failure is the reason recorded.
    why = B.marlin_support(None, reason, 8192, 8192, 128, torch.float16, torch.device("cuda"))
    assert why == reason
    _, doc = _tiny_cpu_run(tmp_path, monkeypatch, "--dtype", "fp16", "--group-size", "128")
    assert doc["baselines"]["marlin"].startswith("skipped: not importable")
    skipped = {s["kernel"]: s["reason"] for s in doc["skipped"]}
    assert "marlin" in skipped and "tinygemm" not in {p["kernel"] for p in doc["points"]}
    assert not any(p["kernel"] == "marlin" for p in doc["points"])


def test_marlin_and_tinygemm_shape_rules():
    fake = object()
    cuda = torch.device("cuda")
    assert "fp16" in B.marlin_support(fake, None, 8192, 8192, 128, torch.bfloat16, cuda)
    assert "group size 128" in B.marlin_support(fake, None, 8192, 8192, 64, torch.float16, cuda)
    assert "N % 256" in B.marlin_support(fake, None, 960, 576, 128, torch.float16, cuda)
    assert "CUDA only" in B.marlin_support(fake, None, 8192, 8192, 128, torch.float16,
                                           torch.device("cpu"))
    assert "CUDA only" in B.tinygemm_support(8192, 8192, 128, torch.device("cpu"))
    assert B._inner_k_tiles(4096) == 8 and B._inner_k_tiles(576) == 4 and B._inner_k_tiles(544) == 2


def test_bytes_and_roofline_arithmetic():
    N, K = 28672, 8192
    # 4-bit g128: N*K/2 code bytes, one 16-bit scale per 128 weights, a 16-entry float32 table.
    w4 = B.weight_bytes("flute", N, K, 4, 128)
    assert w4 == N * K // 2 + N * (K // 128) * 2 + 16 * 4
    assert B.point_bytes("flute", 1, N, K, 4, 128) == w4 + (K + N) * 2
    fp16 = B.weight_bytes("fp16", N, K)
    assert fp16 == N * K * 2
    # REFERENCE.md section 3: ideal speedups 3.88x (4b g128), 4.92x (3b g64), 7.10x (2b g64).
    assert fp16 / w4 == pytest.approx(16 / 4.125, rel=1e-4)
    assert fp16 / B.weight_bytes("flute", N, K, 3, 64) == pytest.approx(16 / 3.25, rel=1e-4)
    assert fp16 / B.weight_bytes("flute", N, K, 2, 64) == pytest.approx(16 / 2.25, rel=1e-4)
    # ... and 8192x28672 fp16 at the H100's nominal 3.35 TB/s takes ~140 us, 4-bit g128 ~36 us.
    assert B.ideal_us(fp16, 3350) == pytest.approx(140.2, abs=0.5)
    assert B.ideal_us(w4, 3350) == pytest.approx(36.1, abs=0.5)
    assert B.weight_bytes("marlin", N, K, 4, 128) == N * K // 2 + (K // 128) * N * 2
    assert B.weight_bytes("tinygemm", N, K, 4, 64) == N * K // 2 + (K // 64) * N * 4
    # A 3-bit row of 576 codes is 216 bytes; ragged groups (576 / 128) round up to 5 scales.
    assert B.weight_bytes("flute", 1, 576, 3, 128) == 216 + 5 * 2 + 8 * 4
    # 1 GB in 1 ms is 1000 GB/s, which is 50% of a 2000 GB/s roofline.
    assert B.achieved_gbps(10 ** 9, 1000.0) == pytest.approx(1000.0)
    assert B.roofline_pct(1000.0, 2000.0) == pytest.approx(50.0)


@pytest.mark.parametrize("l2", [H100_L2, 60 * 2 ** 20, 40 * 2 ** 20])
def test_rotation_exceeds_l2_for_every_shape(l2):
    for s in B.all_shapes():
        for kernel, bits, g in [("fp16", None, None), ("tinygemm", 4, 64), ("marlin", 4, 128)] + \
                [("flute", b, g) for b in (2, 3, 4) for g in (64, 128)]:
            per_copy = B.weight_bytes(kernel, s.N, s.K, bits, g)
            copies = B.rotation_copies(per_copy, l2)
            assert copies >= 2
            assert copies * per_copy >= B.L2_FACTOR * l2 > l2, (s.name, kernel, bits, g)
    assert B.rotation_copies(10, 0) == 1  # CPU: no cache to defeat
    assert B.rotation_copies(1, H100_L2) == B.MAX_COPIES


def test_shape_grid():
    shapes = {s.name: (s.N, s.K) for s in B.all_shapes()}
    assert len(shapes) == 28
    assert shapes["llama3-8b/qkv"] == (6144, 4096)
    assert shapes["llama3-8b/down"] == (4096, 14336)
    assert shapes["llama3-70b/gate_up"] == (57344, 8192)
    assert shapes["llama3-70b-tp2/gate_up"] == (28672, 8192)   # column parallel: N splits
    assert shapes["llama3-70b-tp4/down"] == (8192, 7168)       # row parallel: K splits
    assert shapes["llama3-8b-tp4/o"] == (4096, 1024)
    assert shapes["smollm2-135m/qkv"] == (960, 576)
    assert [s.name for s in B.select_shapes(["llama3-8b/*"])] == [
        "llama3-8b/qkv", "llama3-8b/o", "llama3-8b/gate_up", "llama3-8b/down"]
    assert set(B.QUICK_SHAPES) <= set(shapes)
    with pytest.raises(ValueError, match="no shape matches"):
        B.select_shapes(["nope/*"])


def test_fill_speedups():
    def pt(kernel, us, bits=None, g=None, dtype="bf16", M=1):
        return {"kernel": kernel, "bits": bits, "group_size": g, "dtype": dtype, "M": M,
                "N": 8, "K": 8, "median_us": us}
    pts = [pt("fp16", 100.0), pt("flute", 25.0, 4, 128), pt("tinygemm", 50.0, 4, 128),
           pt("tinygemm", 40.0, 4, 64), pt("dequant_matmul", 200.0, 4, 128),
           pt("dequant_matmul", 300.0, 3, 128), pt("flute", 10.0, 4, 128, dtype="fp16")]
    B.fill_speedups(pts)
    f = pts[1]
    assert f["speedup_vs_fp16"] == 4.0
    assert f["speedup_vs"] == {"tinygemm": 2.0, "dequant_matmul": 8.0}
    assert pts[2]["speedup_vs_fp16"] == 2.0
    assert pts[6]["speedup_vs_fp16"] is None and pts[6]["speedup_vs"] == {}


def test_commit_and_tests_json_are_recorded(tmp_path, monkeypatch):
    tests = tmp_path / "tests.json"
    tests.write_text(json.dumps({"passed": 12, "failed": 0, "skipped": 1}))
    _, doc = _tiny_cpu_run(tmp_path, monkeypatch, "--commit", "abc123", "--tests-json", str(tests),
                           "--kernels", "fp16")
    assert doc["commit"] == "abc123" and doc["commit_source"] == "given"
    assert doc["tests"] == {"passed": 12, "failed": 0, "skipped": 1}
    assert {p["kernel"] for p in doc["points"]} == {"fp16"}


def test_plots_from_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    path, _ = _tiny_cpu_run(tmp_path, monkeypatch)
    out = tmp_path / "png"
    out.mkdir()
    written = B.plot_results(path, str(out))
    assert sorted(os.path.basename(w).rsplit("_", 1)[1] for w in written) == ["roofline.png",
                                                                              "speedup.png"]
    assert all(os.path.getsize(w) > 1000 for w in written)


def test_e2e_cpu_smoke(tmp_path):
    out = tmp_path / "e2e"
    argv = ["--e2e", "--device", "cpu", "--e2e-bits", "fp16", "4", "--e2e-batch", "1",
            "--e2e-layers", "1", "--e2e-new-tokens", "3", "--e2e-prefill", "8", "--e2e-repeats", "1",
            "--out", str(out), "--no-plots", "--threads", "1"]
    assert B.main(argv) == 0
    (path,) = glob.glob(str(out / "*.json"))
    with open(path) as f:
        doc = json.load(f)
    assert doc["kind"] == "e2e" and not doc["skipped"]
    variants = {r["variant"] for r in doc["e2e"]}
    assert variants == {"fp16", "flute-4bit-g64"}
    assert any(r.get("prefill_tok_s") for r in doc["e2e"])


def test_scripts_run_standalone(tmp_path):
    """``python benchmarks/bench.py`` and ``plot.py`` work as plain scripts from the repo root."""
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "bench.py"), "--list-shapes"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "llama3-70b/gate_up" in r.stdout
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "plot.py"), "--help"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "RESULT" not in r.stderr


def test_time_budget_truncates_cleanly(tmp_path, monkeypatch):
    _, doc = _tiny_cpu_run(tmp_path, monkeypatch, "--max-minutes", "1e-9")
    assert doc["truncated"] is True and B.validate_result(doc) == []
