"""CPU tests of the benchmark suite (flute.bench, benchmarks/*.py): the JSON it writes, its
bytes/roofline arithmetic, the cache rotation, how it records baselines it cannot run, the CPU
benchmark's schema and ratios, and the targets kept in benchmarks/targets.py."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flute.bench import baselines, cli, cpu, llamacpp, plots, report, roofline, shapes, sweep, timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_L2 = 50 * 2 ** 20


def _tiny_cpu_run(tmp_path, monkeypatch, *extra):
    monkeypatch.setitem(sys.modules, "marlin", None)  # make sure Marlin is absent
    out = tmp_path / "res"
    argv = ["--device", "cpu", "--smoke", "--shapes", "smollm2-135m/o", "--M", "1", "3", "--bits", "4", "3",
            "--group-size", "64", "--dtype", "bf16", "--out", str(out), "--no-plots",
            "--target-ms", "1", "--min-runs", "2", "--max-runs", "3", "--threads", "1", *extra]
    assert cli.main(argv) == 0
    files = glob.glob(str(out / "*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        return files[0], json.load(f)


def test_cpu_mode_writes_schema_json(tmp_path, monkeypatch):
    path, doc = _tiny_cpu_run(tmp_path, monkeypatch)
    assert report.validate_result(doc) == []
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
        assert p["bytes"] == roofline.point_bytes(p["kernel"], p["M"], 576, 576, p["bits"], p["group_size"])
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
    mod, reason = baselines.load_marlin()
    assert mod is None and "not importable" in reason and "MARLIN.md" in reason
    # On a CUDA device with an eligible shape, the import failure is the reason recorded.
    why = baselines.marlin_support(None, reason, 8192, 8192, 128, torch.float16, torch.device("cuda"))
    assert why == reason
    _, doc = _tiny_cpu_run(tmp_path, monkeypatch, "--dtype", "fp16", "--group-size", "128")
    assert doc["baselines"]["marlin"].startswith("skipped: not importable")
    skipped = {s["kernel"]: s["reason"] for s in doc["skipped"]}
    assert "marlin" in skipped and "tinygemm" not in {p["kernel"] for p in doc["points"]}
    assert not any(p["kernel"] == "marlin" for p in doc["points"])


def test_marlin_and_tinygemm_shape_rules():
    fake = object()
    cuda = torch.device("cuda")
    assert "fp16" in baselines.marlin_support(fake, None, 8192, 8192, 128, torch.bfloat16, cuda)
    assert "group size 128" in baselines.marlin_support(fake, None, 8192, 8192, 64, torch.float16, cuda)
    assert "N % 256" in baselines.marlin_support(fake, None, 960, 576, 128, torch.float16, cuda)
    assert "CUDA only" in baselines.marlin_support(fake, None, 8192, 8192, 128, torch.float16,
                                           torch.device("cpu"))
    assert "CUDA only" in baselines.tinygemm_support(8192, 8192, 128, torch.device("cpu"))
    assert baselines.inner_k_tiles(4096) == 8 and baselines.inner_k_tiles(576) == 4 and baselines.inner_k_tiles(544) == 2


def test_bytes_and_roofline_arithmetic():
    N, K = 28672, 8192
    # 4-bit g128: N*K/2 code bytes, one 16-bit scale per 128 weights, a 16-entry float32 table.
    w4 = roofline.weight_bytes("flute", N, K, 4, 128)
    assert w4 == N * K // 2 + N * (K // 128) * 2 + 16 * 4
    assert roofline.point_bytes("flute", 1, N, K, 4, 128) == w4 + (K + N) * 2
    fp16 = roofline.weight_bytes("fp16", N, K)
    assert fp16 == N * K * 2
    # Bits per weight with 16-bit group scales: ideal speedups 3.88x (4b g128), 4.92x (3b g64),
    # 7.10x (2b g64) over fp16.
    assert fp16 / w4 == pytest.approx(16 / 4.125, rel=1e-4)
    assert fp16 / roofline.weight_bytes("flute", N, K, 3, 64) == pytest.approx(16 / 3.25, rel=1e-4)
    assert fp16 / roofline.weight_bytes("flute", N, K, 2, 64) == pytest.approx(16 / 2.25, rel=1e-4)
    # ... and 8192x28672 fp16 at the H100's nominal 3.35 TB/s takes ~140 us, 4-bit g128 ~36 us.
    assert roofline.ideal_us(fp16, 3350) == pytest.approx(140.2, abs=0.5)
    assert roofline.ideal_us(w4, 3350) == pytest.approx(36.1, abs=0.5)
    assert roofline.weight_bytes("marlin", N, K, 4, 128) == N * K // 2 + (K // 128) * N * 2
    assert roofline.weight_bytes("tinygemm", N, K, 4, 64) == N * K // 2 + (K // 64) * N * 4
    # A 3-bit row of 576 codes is 216 bytes; ragged groups (576 / 128) round up to 5 scales.
    assert roofline.weight_bytes("flute", 1, 576, 3, 128) == 216 + 5 * 2 + 8 * 4
    # 1 GB in 1 ms is 1000 GB/s, which is 50% of a 2000 GB/s roofline.
    assert roofline.achieved_gbps(10 ** 9, 1000.0) == pytest.approx(1000.0)
    assert roofline.roofline_pct(1000.0, 2000.0) == pytest.approx(50.0)


@pytest.mark.parametrize("l2", [H100_L2, 60 * 2 ** 20, 40 * 2 ** 20])
def test_rotation_exceeds_l2_for_every_shape(l2):
    for s in shapes.all_shapes():
        for kernel, bits, g in [("fp16", None, None), ("tinygemm", 4, 64), ("marlin", 4, 128)] + \
                [("flute", b, g) for b in (2, 3, 4) for g in (64, 128)]:
            per_copy = roofline.weight_bytes(kernel, s.N, s.K, bits, g)
            copies = roofline.rotation_copies(per_copy, l2)
            assert copies >= 2
            assert copies * per_copy >= roofline.L2_FACTOR * l2 > l2, (s.name, kernel, bits, g)
    assert roofline.rotation_copies(10, 0) == 1  # CPU: no cache to defeat
    assert roofline.rotation_copies(1, H100_L2) == roofline.MAX_COPIES


def test_shape_grid():
    grid = {s.name: (s.N, s.K) for s in shapes.all_shapes()}
    assert len(grid) == 28
    assert grid["llama3-8b/qkv"] == (6144, 4096)
    assert grid["llama3-8b/down"] == (4096, 14336)
    assert grid["llama3-70b/gate_up"] == (57344, 8192)
    assert grid["llama3-70b-tp2/gate_up"] == (28672, 8192)   # column parallel: N splits
    assert grid["llama3-70b-tp4/down"] == (8192, 7168)       # row parallel: K splits
    assert grid["llama3-8b-tp4/o"] == (4096, 1024)
    assert grid["smollm2-135m/qkv"] == (960, 576)
    assert [s.name for s in shapes.select_shapes(["llama3-8b/*"])] == [
        "llama3-8b/qkv", "llama3-8b/o", "llama3-8b/gate_up", "llama3-8b/down"]
    assert set(shapes.QUICK_SHAPES) <= set(grid)
    with pytest.raises(ValueError, match="no shape matches"):
        shapes.select_shapes(["nope/*"])


def test_fill_speedups():
    def pt(kernel, us, bits=None, g=None, dtype="bf16", M=1):
        return {"kernel": kernel, "bits": bits, "group_size": g, "dtype": dtype, "M": M,
                "N": 8, "K": 8, "median_us": us}
    pts = [pt("fp16", 100.0), pt("flute", 25.0, 4, 128), pt("tinygemm", 50.0, 4, 128),
           pt("tinygemm", 40.0, 4, 64), pt("dequant_matmul", 200.0, 4, 128),
           pt("dequant_matmul", 300.0, 3, 128), pt("flute", 10.0, 4, 128, dtype="fp16")]
    sweep.fill_speedups(pts)
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
    written = plots.plot_results(path, str(out))
    assert sorted(os.path.basename(w).rsplit("_", 1)[1] for w in written) == ["roofline.png",
                                                                              "speedup.png"]
    assert all(os.path.getsize(w) > 1000 for w in written)


def test_e2e_cpu_smoke(tmp_path):
    out = tmp_path / "e2e"
    argv = ["--e2e", "--device", "cpu", "--e2e-bits", "fp16", "4", "--e2e-batch", "1",
            "--e2e-layers", "1", "--e2e-new-tokens", "3", "--e2e-prefill", "8", "--e2e-repeats", "1",
            "--out", str(out), "--no-plots", "--threads", "1"]
    assert cli.main(argv) == 0
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
    assert doc["truncated"] is True and report.validate_result(doc) == []


# -- the CPU benchmark (flute bench --device cpu) ---------------------------------------------------

def _load_targets_module():
    mod, why = report.load_targets(os.path.join(REPO, "benchmarks", "targets.py"))
    assert mod is not None, why
    return mod


def _tiny_cpu_bench(tmp_path, *extra, kernels=("fp32", "bf16", "torch_int4", "flute")):
    out = tmp_path / "cpu"
    argv = ["--device", "cpu", "--shapes", "64x128", "--M", "1", "2", "--threads", "1",
            "--bits", "4", "--kernels", *kernels, "--read-bw-mib", "8", "--read-bw-runs", "1",
            "--l3-mib", "0.25", "--rotation-mib", "0.5", "--target-ms", "1", "--min-runs", "2",
            "--max-runs", "5", "--out", str(out), "--no-plots", *extra]
    assert cli.main(argv) == 0
    (path,) = glob.glob(str(out / "cpu-*.json"))
    with open(path) as f:
        return path, json.load(f)


def test_cpu_benchmark_schema_and_ratios(tmp_path):
    """One tiny shape: the JSON has the schema, and every ratio is recomputed here from the
    measured medians of the same document (no assertion on how fast anything is)."""
    path, doc = _tiny_cpu_bench(tmp_path)
    assert os.path.basename(path).startswith("cpu-") and doc["kind"] == "cpu-kernels"
    assert cpu.validate_cpu_result(doc) == []
    for key in ("host", "cpu_model", "isa_flags", "torch", "commit", "dirty", "command", "threads",
                "read_bw_gbps", "read_bw_method", "l3_bytes"):
        assert key in doc
    assert doc["threads"] == [1] and doc["read_bw_gbps"]["1"] > 0
    assert doc["read_bw_method"]["1"] in ("torch_sum_fp32",) + tuple(
        roofline.reader_method(s, pf) for s in roofline.READER_STREAMS for pf in roofline.READER_PREFETCH)
    all1 = doc["read_bw_all"]["1"]
    assert doc["read_bw_gbps"]["1"] == max(all1.values()) == all1[doc["read_bw_method"]["1"]]
    kernels = {(p["kernel"], p["dtype"], p["cache"]) for p in doc["points"]}
    assert {("fp32", "fp32", "cold"), ("bf16", "bf16", "cold"), ("torch_int4", "bf16", "cold"),
            ("flute", "bf16", "cold"), ("flute", "fp32", "cold"), ("flute", "bf16", "hot")} <= kernels
    med = {(p["kernel"], p["dtype"], p["M"], p["threads"], p["cache"]): p["median_ms"]
           for p in doc["points"]}
    for p in doc["points"]:
        assert (p["N"], p["K"]) == (64, 128) and p["median_ms"] > 0
        for key in ("kernel", "bits", "group_size", "dtype", "M", "N", "K", "threads", "median_ms",
                    "gbps", "roofline_pct", "speedup_vs_fp32", "speedup_vs_bf16"):
            assert key in p
        assert math.isclose(p["gbps"], p["bytes"] / (p["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(p["roofline_pct"], 100 * p["gbps"] / doc["read_bw_gbps"]["1"],
                            rel_tol=1e-9)
        k = (p["M"], p["threads"], p["cache"])
        assert math.isclose(p["speedup_vs_fp32"], med[("fp32", "fp32") + k] / p["median_ms"])
        assert math.isclose(p["speedup_vs_bf16"], med[("bf16", "bf16") + k] / p["median_ms"])
        if p["kernel"] == "flute":
            assert p["bits"] == 4 and p["group_size"] == 64 and p["rel_err"] < 1e-2
            assert math.isclose(p["speedup_vs"]["torch_int4"],
                                med[("torch_int4", "bf16") + k] / p["median_ms"])
            act = 4 if p["dtype"] == "fp32" else 2  # bf16 scales either way
            assert p["bytes"] == roofline.weight_bytes("flute", 64, 128, 4, 64) + \
                p["M"] * (128 + 64) * act
    # the targets are evaluated on this very document, from benchmarks/targets.py
    assert doc["targets"] == json.loads(json.dumps(_load_targets_module().evaluate(doc)))
    x_fp32 = [r for r in doc["targets"] if r["target"] == "[flute bf16] M=1 4-bit: x fp32"][0]
    flute_m1 = [p for p in doc["points"] if p["kernel"] == "flute" and p["dtype"] == "bf16"
                and p["M"] == 1 and p["cache"] == "cold"]
    assert x_fp32["points"] == 1 and math.isclose(x_fp32["worst"], flute_m1[0]["speedup_vs_fp32"])
    assert "llamacpp" not in doc  # not requested: nothing built


def test_cpu_benchmark_llamacpp_rows(tmp_path, monkeypatch):
    """llama.cpp points come from the driver's JSON lines; flute's ratio is against the faster layout;
    a shape the type cannot hold (K not a multiple of its block) is a skipped entry."""
    monkeypatch.setattr(llamacpp, "build", lambda **kw: ("/fake/ggml_matmul", {"cache": "/fake"}))
    calls = []

    def fake_run(exe, ty, N, K, Ms, threads, copies, repack=False, hot=False, **kw):
        calls.append((ty, repack, hot))
        ms = 0.5 if repack else 1.0
        return [{"type": ty, "layout": "repack" if repack else "plain", "N": N, "K": K, "M": m,
                 "threads": t, "copies": 1 if hot else copies, "cache": "hot" if hot else "cold",
                 "weight_bytes": llamacpp.weight_bytes(ty, N, K), "median_ms": ms * m,
                 "p10_ms": ms, "p90_ms": ms, "runs": 3} for t in threads for m in Ms]
    monkeypatch.setattr(llamacpp, "run", fake_run)
    _, doc = _tiny_cpu_bench(tmp_path, "--ggml-types", "q4_0", "q3_K", "f32",
                             kernels=("fp32", "bf16", "llamacpp", "flute"))
    assert ("q4_0", True, False) in calls and ("q3_K", False, False) not in calls
    assert any(s["kernel"] == "llamacpp" and s["ggml_type"] == "q3_K" and "block" in s["reason"]
               for s in doc["skipped"])
    lc = [p for p in doc["points"] if p["kernel"] == "llamacpp"]
    assert {(p["ggml_type"], p["layout"]) for p in lc} == {("q4_0", "plain"), ("q4_0", "repack"),
                                                            ("f32", "plain")}
    assert all(p["bits"] == llamacpp.TYPES[p["ggml_type"]] for p in lc)
    for p in doc["points"]:
        if p["kernel"] == "flute":
            assert math.isclose(p["speedup_vs"]["llamacpp_q4_0"], 0.5 * p["M"] / p["median_ms"])
            assert math.isclose(p["speedup_vs"]["llamacpp_f32"], 1.0 * p["M"] / p["median_ms"])


def test_cpu_benchmark_records_unbuildable_llamacpp(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "build", lambda **kw: (None, {"reason": "no cmake on PATH"}))
    _, doc = _tiny_cpu_bench(tmp_path, "--bits", "2", kernels=("fp32", "llamacpp", "flute"))
    assert doc["llamacpp"]["status"] == "skipped: no cmake on PATH"
    assert not any(p["kernel"] == "llamacpp" for p in doc["points"])


def test_cpu_rounds_median_rejects_one_slow_round():
    """A point is the median of its rounds' medians: one slow round (a busy moment of the machine)
    does not move it; the spread keeps the extremes and the samples add up."""
    rounds = [dict(median_ms=1.0, p10_ms=0.9, p90_ms=1.2, runs=10),
              dict(median_ms=5.0, p10_ms=4.0, p90_ms=6.0, runs=4),
              dict(median_ms=1.1, p10_ms=1.0, p90_ms=1.3, runs=9)]
    got = cpu.combine_rounds(rounds)
    assert got == dict(median_ms=1.1, p10_ms=0.9, p90_ms=6.0, runs=23, rounds_ms=[1.0, 5.0, 1.1])
    assert cpu.combine_rounds(rounds[:2])["median_ms"] == 3.0  # even count: the middle two's mean


def test_cpu_benchmark_rounds_are_interleaved(tmp_path, monkeypatch):
    """With --rounds 3 every kernel (torch-side and llama.cpp) is timed once per round, rounds
    alternate between them (not all rounds of one kernel first), each round gets a third of the
    point's time, and each point keeps its 3 round medians, its median_ms their median."""
    monkeypatch.setattr(llamacpp, "build", lambda **kw: ("/fake/ggml_matmul", {"cache": "/fake"}))
    seq = []
    real_time_cpu = cpu.time_cpu

    def spy_time_cpu(calls, **kw):
        seq.append(("torch", kw["target_ms"]))
        return real_time_cpu(calls, **kw)

    qcaches = []

    def fake_run(exe, ty, N, K, Ms, threads, copies, repack=False, hot=False, **kw):
        seq.append(("llama", kw["target_ms"]))
        qcaches.append(kw["qcache"])
        ms = 1.0 + 0.5 * sum(1 for s in seq if s[0] == "llama")  # a different time every round
        return [{"type": ty, "layout": "plain", "N": N, "K": K, "M": m, "threads": t,
                 "copies": 1 if hot else copies, "cache": "hot" if hot else "cold",
                 "weight_bytes": llamacpp.weight_bytes(ty, N, K), "median_ms": ms,
                 "p10_ms": ms, "p90_ms": ms, "runs": 3} for t in threads for m in Ms]
    monkeypatch.setattr(cpu, "time_cpu", spy_time_cpu)
    monkeypatch.setattr(llamacpp, "run", fake_run)
    _, doc = _tiny_cpu_bench(tmp_path, "--ggml-types", "f32", "--rounds", "3", "--target-ms", "3",
                             kernels=("fp32", "llamacpp", "flute"))
    assert doc["method"]["rounds"] == 3
    kinds = [k for k, _ in seq]
    # torch points, then llama.cpp (cold + hot), three times over
    changes = [i for i in range(1, len(kinds)) if kinds[i] != kinds[i - 1]]
    assert len(changes) == 5 and kinds[0] == "torch" and kinds[-1] == "llama"
    assert all(math.isclose(t, 1.0) for _, t in seq)  # 3 ms per point over 3 rounds
    for p in doc["points"]:
        assert len(p["rounds_ms"]) == 3 and p["median_ms"] == sorted(p["rounds_ms"])[1]
    lc = [p for p in doc["points"] if p["kernel"] == "llamacpp" and p["cache"] == "cold"]
    assert lc and all(p["rounds_ms"] == [1.5, 2.5, 3.5] and p["median_ms"] == 2.5 for p in lc)
    # every run of a shape and type shares one quantized-weight file, removed after the shape
    per_shape = {}
    for q in qcaches:
        per_shape.setdefault(os.path.basename(q), set()).add(q)
    assert per_shape and all(len(v) == 1 and k.startswith("f32-") for k, v in per_shape.items())
    assert not any(os.path.exists(os.path.dirname(q)) for q in qcaches)


def test_interleaved_timer_takes_calls_in_turn():
    """Sample j of every kernel before sample j + 1 of any, the first kernel rotating each turn;
    each kernel cycles through its own copies and stops at its own run count."""
    log = []
    lists = [[lambda k=k, c=c: log.append((k, c)) for c in range(n)] for k, n in enumerate((2, 1, 3))]
    samples = timing.time_cpu_interleaved(lists, [4, 2, 3])
    assert [len(v) for v in samples] == [4, 2, 3] and all(us >= 0 for v in samples for us in v)
    assert log == [(0, 0), (1, 0), (2, 0),   # turn 0 starts with kernel 0
                   (1, 0), (2, 1), (0, 1),   # turn 1 with kernel 1
                   (2, 2), (0, 0),           # turn 2 with kernel 2 (kernel 1 is done)
                   (0, 1)]                   # turn 3: only kernel 0 is left
    assert timing.time_cpu_interleaved([], []) == []


def test_cpu_benchmark_interleaves_cold_calls(tmp_path, monkeypatch):
    """With --interleave-calls every torch-side cache-cold point of a (threads, M) is timed in one
    interleaved pass, the hot points back to back; the method is recorded and the ratios still
    come from the document's own medians."""
    passes = []
    real = cpu.time_cpu_interleaved

    def spy(lists, runs):
        passes.append(len(lists))
        return real(lists, runs)
    monkeypatch.setattr(cpu, "time_cpu_interleaved", spy)
    _, doc = _tiny_cpu_bench(tmp_path, "--interleave-calls", "--rounds", "2", kernels=("fp32", "bf16", "flute"))
    assert doc["method"]["interleave_calls"] is True and cpu.validate_cpu_result(doc) == []
    # 2 rounds x 2 M values, each pass over fp32, bf16 and flute 4-bit in bf16 and fp32
    assert passes == [4, 4, 4, 4]
    cold = [p for p in doc["points"] if p["cache"] == "cold"]
    assert {p["kernel"] for p in cold} == {"fp32", "bf16", "flute"} and len(cold) == 8
    assert all(len(p["rounds_ms"]) == 2 and p["median_ms"] > 0 for p in cold)
    assert any(p["cache"] == "hot" for p in doc["points"])
    fp32 = {(p["M"], p["threads"]): p["median_ms"] for p in cold if p["kernel"] == "fp32"}
    for p in cold:
        if p["kernel"] == "flute":
            assert math.isclose(p["speedup_vs_fp32"], fp32[(p["M"], p["threads"])] / p["median_ms"])


def test_cpu_benchmark_rejects_zero_rounds(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cpu", "--rounds", "0", "--out", str(tmp_path)])


def test_cpu_rotation_exceeds_l3():
    l3 = 105 << 20
    for n, k in shapes.CPU_SHAPES:
        for kernel, bits in (("fp32", None), ("bf16", None), ("torch_int4", 4), ("flute", 2),
                             ("flute", 3), ("flute", 4)):
            per = roofline.weight_bytes(kernel, n, k, bits, 64)
            c = roofline.cpu_rotation_copies(per, l3, free_bytes=24 << 30)
            assert c >= 2 and c * per >= 2 * l3
    # memory permitting: never more than a quarter of free memory (but always 2 copies)
    assert roofline.cpu_rotation_copies(1 << 30, l3, free_bytes=2 << 30) == 2
    assert llamacpp.weight_bytes("q4_0", 4096, 4096) == 4096 * 128 * 18
    assert llamacpp.weight_bytes("q2_K", 4096, 4096) == 4096 * 16 * 84


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bw_reader_reads_every_word_once(threads):
    """The C reader's checksum is the XOR of the whole buffer at every stream count, with and
    without its prefetch, an odd size included: a word skipped or read twice by the split into
    runs would change it."""
    import numpy as np
    from flute.bench import toolchain
    exe, why = toolchain.build_read_bw()
    if exe is None:
        pytest.skip(f"C reader not built: {why}")
    mib = 3
    words = np.arange((mib << 20) // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    want = int(np.bitwise_xor.reduce(words))
    for s in roofline.READER_STREAMS:
        for pf in roofline.READER_PREFETCH:
            out = subprocess.run([exe, str(mib), str(threads), "1", str(s), str(pf)],
                                 capture_output=True, text=True, check=True).stdout
            doc = json.loads(out.strip().splitlines()[-1])
            assert (doc["streams"], doc["threads"], doc["prefetch"]) == (s, threads, pf)
            assert doc["checksum"] == want, f"{s} streams, prefetch {pf}"
            assert doc["median_gbps"] > 0
    bad = subprocess.run([exe, str(mib), "1", "1", "9"], capture_output=True)
    assert bad.returncode == 2  # more streams than the reader holds
    bad = subprocess.run([exe, str(mib), "1", "1", "2", "100"], capture_output=True)
    assert bad.returncode == 2  # a prefetch distance that is not whole lines


def test_cpu_targets_logic():
    t = _load_targets_module()

    def pt(kernel, M, ms, bits=None, dtype="bf16", N=8192, K=2048, roofline_pct=None, **kw):
        return dict(kernel=kernel, M=M, N=N, K=K, threads=1, cache="cold", bits=bits, dtype=dtype,
                    group_size=64 if bits else None, median_ms=ms, roofline_pct=roofline_pct, **kw)
    pts = [pt("fp32", 1, 6.0, dtype="fp32"), pt("bf16", 1, 3.0), pt("torch_int4", 1, 2.0, 4),
           pt("llamacpp", 1, 1.0, 4, "fp32", ggml_type="q4_0", layout="plain"),
           pt("llamacpp", 1, 0.9, 4, "fp32", ggml_type="iq4_nl", layout="repack"),
           pt("flute", 1, 1.0, 4, roofline_pct=85.0)]
    cpu.fill_ratios(pts)
    rows = {r["target"]: r for r in t.cpu_targets(pts)}
    assert rows["[flute bf16] M=1 4-bit: x fp32"]["pass"] is True          # 6x >= 5x
    assert rows["[flute bf16] M=1 4-bit: x torch int4"]["pass"] is True    # 2x >= 2x
    assert rows["[flute bf16] M=1 4-bit: % read bandwidth"]["pass"] is True
    r = rows["[flute bf16] M=1 4-bit large: x llama.cpp q4_0/iq4_nl"]
    assert r["pass"] is False and math.isclose(r["worst"], 0.9)        # the faster peer is the bar
    assert rows["[flute bf16] M=1 3-bit: x fp32"]["pass"] is None      # nothing measured
    assert "MISS" in t.table(list(rows.values())) and "PASS" in t.table(list(rows.values()))


def test_targets_live_outside_the_library(tmp_path, monkeypatch):
    """The smoke run evaluates benchmarks/targets.py; without that file it records why not."""
    _, doc = _tiny_cpu_run(tmp_path, monkeypatch)
    assert doc["targets"] and "benchmarks/targets.py" in doc["targets_note"]
    names = [r["target"] for r in doc["targets"]]
    assert "x fp16, M >= 512" in names
    monkeypatch.setenv("FLUTE_BENCH_TARGETS", str(tmp_path / "none.py"))
    _, doc = _tiny_cpu_run(tmp_path / "b", monkeypatch)
    assert doc["targets"] == [] and doc["targets_note"].startswith("skipped: no targets file")
    import flute.bench
    src = "".join(open(os.path.join(os.path.dirname(flute.bench.__file__), f)).read()
                  for f in os.listdir(os.path.dirname(flute.bench.__file__)) if f.endswith(".py"))
    assert "evaluate_targets" not in src and "85.0" not in src


def test_check_targets_script_and_help(tmp_path):
    path, _ = _tiny_cpu_bench(tmp_path, kernels=("fp32", "flute"))
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "check_targets.py"), path],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "M=1 4-bit: x fp32" in r.stdout
    for argv, want in ((["bench", "--help"], "--smoke"),
                       (["bench", "--device", "cpu", "--help"], "--point-budget-ms")):
        r = subprocess.run([sys.executable, "-m", "flute", *argv], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "usage: flute bench" in r.stdout and want in r.stdout


def test_llamacpp_build_reports_why_not(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUTE_CACHE", str(tmp_path))
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    exe, info = llamacpp.build()
    assert exe is None and info["reason"] == "no cmake on PATH"


def test_llamacpp_driver_when_built():
    """The real driver, when an earlier run built it into the cache (never built by the tests)."""
    import glob as _glob
    root = os.path.join(os.environ.get("FLUTE_CACHE") or os.path.expanduser("~/.cache/flute"),
                        f"llamacpp-{llamacpp.VERSION}")
    if not all(os.path.isfile(os.path.join(root, "build", lib)) for lib in llamacpp.LIBS):
        pytest.skip("llama.cpp is not built here (python -m flute.bench.llamacpp builds it)")
    exe, info = llamacpp.build()
    assert exe, info
    rows = llamacpp.run(exe, "q4_0", 64, 256, [1, 3], [1], 2, target_ms=1, min_runs=2)
    assert [(r["M"], r["cache"], r["copies"]) for r in rows] == [(1, "cold", 2), (3, "cold", 2)]
    assert all(r["weight_bytes"] == llamacpp.weight_bytes("q4_0", 64, 256) and r["median_ms"] > 0
               for r in rows)
    with pytest.raises(RuntimeError, match="block size"):
        llamacpp.run(exe, "q2_K", 64, 576, [1], [1], 1)
    assert _glob.glob(os.path.join(root, "ggml_matmul-*"))


def test_cpu_prefill_plot_from_a_record(tmp_path):
    """``benchmarks/cpu_prefill.py --plot RECORD`` draws RECORD.png from a record's points (the
    committed prefill figures are made this way), as a plain script from the repo root; a record
    without points is an error, not an empty figure."""
    pytest.importorskip("matplotlib")
    rec = tmp_path / "cpu-prefill-x.json"
    points = [dict(variant=v, tokens=t, tokens_per_s=100.0 * (i + 1) + t, seconds=[0.1, 0.1, 0.1])
              for i, v in enumerate(["float32", "bfloat16", "flute 4-bit"]) for t in (128, 512)]
    rec.write_text(json.dumps(dict(model="M", threads=2, cpu_model="CPU", commit="abc1234", points=points)))
    script = os.path.join("benchmarks", "cpu_prefill.py")
    r = subprocess.run([sys.executable, script, "--plot", str(rec)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "cpu-prefill-x.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rec.write_text(json.dumps(dict(model="M", threads=2, points=[])))
    r = subprocess.run([sys.executable, script, "--plot", str(rec)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
