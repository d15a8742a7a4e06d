"""``FluteConfig``: the transformers quantization config of the ``flute`` method.

Imports transformers; registered by :func:`flute.integrations.huggingface.register`.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from flute.format import FORMAT_VERSION
from flute.spec import QUANT_METHOD, QuantSpec


class FluteConfig(QuantizationConfigMixin):
    """Quantization config of the ``flute`` method (lookup-table weights, group-wise scales).

    Args:
        bits: 2, 3 or 4.
        group_size: columns per scale (32, 64, 128, ...; -1 = one group per row).
        codebook: ``"nf"``, ``"int"``, ``"fp4"``, ``"ternary"`` or ``"learned"`` (a table
            fitted to each matrix); what a checkpoint holds is in its ``table`` tensors.
        scale_method: ``"absmax"``, ``"mse"`` or ``"absmean"`` (None: the codebook's default).
        offsets: asymmetric groups (a stored offset per group).
        learned_table: fit one table per matrix (``codebook="learned"`` implies it).
        method: how the checkpoint was made: ``"rtn"`` or ``"gptq"`` (informational;
            quantize-on-load is always data-free round to nearest).
        modules_to_not_convert: module names or patterns kept in full precision (``lm_head``
            and tied/output embeddings are always kept).
        format_version: the canonical format version of the checkpoint.
    Unknown keys (e.g. ``calibration``, ``quantized_modules``) are kept as attributes.
    """

    def __init__(self, bits: int = 4, group_size: int = 64, codebook: str = "nf",
                 scale_method: Optional[str] = None, offsets: bool = False,
                 learned_table: bool = False, method: str = "rtn",
                 modules_to_not_convert: Optional[List[str]] = None,
                 format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size = bits, group_size
        self.codebook, self.scale_method = codebook, scale_method
        self.offsets, self.learned_table, self.method = bool(offsets), bool(learned_table), method
        self.modules_to_not_convert = (None if modules_to_not_convert is None
                                       else list(modules_to_not_convert))
        self.format_version = format_version
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)
        self.post_init()

    def post_init(self):
        """Validate through :class:`flute.QuantSpec` (the one place settings are checked)."""
        try:
            spec = self.spec()
        except ValueError as e:
            raise ValueError(f"FluteConfig: {e}") from None
        self.learned_table = spec.learned_table

    def spec(self) -> QuantSpec:
        """These settings as a :class:`flute.QuantSpec`."""
        return QuantSpec.from_dict(self.to_dict())

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["quant_method"] = QUANT_METHOD
        return json.loads(json.dumps(d, default=str))

    def quantize_kwargs(self) -> dict:
        """Keyword arguments of :func:`flute.quantize_weight` for quantize-on-load."""
        return self.spec().quantize_kwargs()
