"""Integrations with other libraries, importable as ``flute.integrations``.

Each submodule imports its library lazily, so ``import flute`` never needs transformers or vLLM.
"""
