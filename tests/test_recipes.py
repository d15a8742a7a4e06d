"""The recipes in integrations/ run end to end (each with --tiny: a random tiny Llama)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recipe(name, *args, timeout=600):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "integrations", name), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_transformers_recipe(tmp_path):
    pytest.importorskip("transformers")
    out = run_recipe("transformers_recipe.py", "--tiny", str(tmp_path / "out"))
    assert "logits identical: True" in out
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_recipe():
    pytest.importorskip("vllm")
    out = run_recipe("vllm_recipe.py", "--tiny")
    assert "vLLM (flute) -> " in out
