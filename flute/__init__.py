"""flute: lookup-table quantized linear layers with a fused dequantize-GEMM.

Quantize a model in place with :func:`quantize_model`, or a single weight with
:func:`quantize_weight`; quantized layers are :class:`QuantLinear` modules whose state dict is the
canonical, GPU-independent checkpoint format of :mod:`flute.format`. The compute goes through
``torch.ops.flute.qgemm`` (CUDA kernel when built, a CPU implementation everywhere).
"""
# Keep below 0.4.1: transformers treats an importable `flute` >= 0.4.1 as the flute-kernel package.
__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers torch.ops.flute.*)
from .codebooks import CODEBOOKS, get_table, pair_table
from .format import FORMAT_VERSION, QuantizedWeight, pack_codes, unpack_codes
from .linear import QuantLinear
from .model import quantize_model
from .ops import (HAS_CPU_KERNEL, HAS_CUDA_KERNEL, dequantize, get_cpu_amx, get_cpu_isa, get_cpu_mode,
                  get_cpu_vnni, get_cpu_vnni_forms, qgemm, set_cpu_amx, set_cpu_isa, set_cpu_mode, set_cpu_vnni)
from .quantize import learn_table, quantize_weight
from .spec import QuantSpec
from .integrations.huggingface import register as _register_hf

# Registers the quant method "flute" with transformers (from_pretrained / save_pretrained of flute
# checkpoints) when transformers is installed; does nothing otherwise.
_register_hf()

__all__ = [
    "CODEBOOKS", "FORMAT_VERSION", "HAS_CPU_KERNEL", "HAS_CUDA_KERNEL", "QuantLinear", "QuantSpec",
    "QuantizedWeight",
    "dequantize", "get_cpu_amx", "get_cpu_isa", "get_cpu_mode", "get_cpu_vnni", "get_cpu_vnni_forms", "get_table", "learn_table", "pack_codes", "pair_table", "qgemm",
    "quantize_model", "quantize_weight", "set_cpu_amx", "set_cpu_isa", "set_cpu_mode", "set_cpu_vnni", "unpack_codes",
]
