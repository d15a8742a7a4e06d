"""The main job: `flute demo` quantizes SmolLM2 and reports size, perplexity and speed."""
import re

import pytest

pytest.importorskip("transformers")
smollm2 = pytest.importorskip("flute.smollm2")


@pytest.mark.slow
def test_demo_reports_a_smaller_model_with_bounded_perplexity(capsys):
    try:
        smollm2.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from flute.demo import run_demo

    assert run_demo(device="cpu", bits=[4], group_size=64, new_tokens=4, method="rtn") == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(float32 \(unquantized\)|flute 4-bit g64 \(.*?\))\s+([\d.]+) MB\s+([\d.]+) MB\s+"
                      r"([\d.]+)\s+(\S+)\s+([\d.]+)", out, re.M)
    assert len(rows) == 2, out
    (_, lin0, tot0, ppl0, _, tps0), (_, lin4, tot4, ppl4, _, tps4) = rows
    assert float(lin4) < 0.15 * float(lin0)          # 4.25 bits of 32, plus the table
    assert float(tot4) < float(tot0)
    assert float(ppl0) < float(ppl4) < 1.3 * float(ppl0)
    assert float(tps0) > 0 and float(tps4) > 0
    assert "The old lighthouse on the harbour wall" in out  # the generated samples are printed
