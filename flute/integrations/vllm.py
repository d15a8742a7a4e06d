"""vLLM plugin: serve flute checkpoints (or quantize at load) with ``vllm serve``.

vLLM finds this module through the ``vllm.general_plugins`` entry point ``flute`` declared in
``setup.py`` and calls :func:`register` in every vLLM process. Registration adds a quantization
method named ``flute`` with vLLM's public ``register_quantization_config``; nothing in vLLM is
patched. This module imports vLLM only inside :func:`register`: the vLLM classes live in
:mod:`flute.integrations.vllm_method`, and the vLLM-free rules (settings, skipped layers, tensor
parallel splits) in :mod:`flute.integrations.vllm_settings`.

Two ways in:

* **Pre-quantized checkpoint** (``config.json`` holds ``quantization_config`` with
  ``quant_method: "flute"``, tensors ``<module>.qcodes/.scales/[.offsets]/.table/.qmeta``):
  ``vllm serve DIR`` picks the method up from the config; no flag needed.
* **Unquantized checkpoint** with ``--quantization flute``: the float weights are loaded as usual
  and quantized data-free in ``process_weights_after_loading`` (4 bits, group size 64, NF table by
  default). Override the settings with ``--hf-overrides
  '{"quantization_config_dict_json": "{\\"bits\\": 3, \\"group_size\\": 128}"}'`` (or
  ``{"quantization_config_file": "path.json"}``), the hooks vLLM offers for exactly this.

Tensor parallelism (how each rank gets its shard of the canonical format):

* Column-parallel layers (and the merged gate/up and QKV layers) split the output rows N:
  ``qcodes``, ``scales`` and ``offsets`` are row slices, since every packed row starts on a byte.
* Row-parallel layers split the input features K: each rank takes the byte slice
  ``[r * K_p * bits / 8, (r + 1) * K_p * bits / 8)`` of every packed row and the group-scale
  columns ``[r * K_p / G, (r + 1) * K_p / G)``. This needs ``K_p * bits`` to be a multiple of 8 and
  ``K_p`` a multiple of the group size G, so that no byte and no group straddles two ranks;
  :func:`check_input_partition` raises a clear error otherwise. With ``group_size == -1`` (one
  scale per row) every rank keeps the full per-row scales.
* ``table`` (one per weight matrix in the checkpoint) and ``qmeta`` become one row per *logical*
  matrix of the layer (1 for plain layers, 2 for gate/up, 3 for q/k/v), replicated on every rank.
  After loading, consecutive logical matrices whose tables are equal share one kernel call (the
  usual case: a fixed NF table); otherwise each logical matrix runs its own ``torch.ops.flute``
  call with its own table and the outputs are concatenated. Nothing is re-quantized, so the
  served model computes exactly what the checkpoint describes.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Register the ``flute`` quantization method with vLLM (idempotent; imports vLLM lazily)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from flute.spec import QUANT_METHOD

    from .vllm_method import FluteConfig  # imports vLLM and flute (which registers torch.ops.flute)

    register_quantization_config(QUANT_METHOD)(FluteConfig)
    _registered = True
