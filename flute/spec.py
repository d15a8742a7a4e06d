"""``QuantSpec``: the quantization settings of a model, validated in one place.

Every entry point takes its settings through this one frozen dataclass: :func:`flute.quantize_model`,
:func:`flute.calibrate.quantize_model_calibrated`, ``flute quantize`` on the command line, the
Hugging Face ``FluteConfig`` and the vLLM plugin. :meth:`QuantSpec.to_dict` is the
``quantization_config`` written beside a checkpoint and :meth:`QuantSpec.from_dict` reads it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .codebooks import CODEBOOKS, check_bits
from .format import FORMAT_VERSION, check_group_size

QUANT_METHOD = "flute"
#: Codebook names a config may carry: the built-in tables, ``learned`` (a table fitted to each
#: matrix, NF-initialized) and ``custom`` (a user table, stored in the checkpoint).
CODEBOOK_NAMES = CODEBOOKS + ("learned", "custom")
SCALE_METHODS = ("absmax", "mse", "absmean")
#: How a checkpoint is made: round to nearest (data-free) or GPTQ-LUT error feedback.
METHODS = ("rtn", "gptq")
DEFAULT_SKIP = ("lm_head",)


def check_scale_method(scale_method: Optional[str]) -> Optional[str]:
    """Return ``scale_method`` if it is None (the codebook's default) or a known method, else raise."""
    if scale_method is not None and scale_method not in SCALE_METHODS:
        raise ValueError(f"scale_method must be one of {SCALE_METHODS} (or None), got {scale_method!r}")
    return scale_method


def default_scale_method(codebook) -> str:
    """``absmean`` for the ternary codebook (BitNet's rule), ``absmax`` for every other."""
    return "absmean" if isinstance(codebook, str) and codebook == "ternary" else "absmax"


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize the linear layers of a model.

    Args:
        bits: code width, 2, 3 or 4.
        group_size: input columns per scale (any positive int; -1 = one group per row).
        codebook: a name from :data:`CODEBOOK_NAMES` or a tensor of ``2**bits`` values (a user
            table; recorded as ``"custom"``). ``"learned"`` means an NF-initialized table fitted
            to each matrix (it sets ``learned_table``).
        scale_method: ``"absmax"``, ``"mse"`` or ``"absmean"``; None picks the codebook's default.
        offsets: asymmetric groups (one stored offset per group).
        learned_table: fit one table per matrix by Lloyd.
        method: ``"rtn"`` (round to nearest, data-free) or ``"gptq"`` (GPTQ-LUT, needs data).
        skip: module names or patterns kept in full precision (see :func:`flute.modules.matches`).
    """

    bits: int = 4
    group_size: int = 64
    codebook: Union[str, torch.Tensor] = "nf"
    scale_method: Optional[str] = None
    offsets: bool = False
    learned_table: bool = False
    method: str = "rtn"
    skip: Tuple[str, ...] = field(default=DEFAULT_SKIP)

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if isinstance(self.codebook, str):
            if self.codebook not in CODEBOOK_NAMES:
                raise ValueError(f"codebook must be one of {CODEBOOK_NAMES} or a tensor of "
                                 f"2**bits values, got {self.codebook!r}")
            if self.codebook == "custom":
                raise ValueError("codebook='custom' names a table stored in a checkpoint; to "
                                 "quantize with your own table pass the tensor of values")
        elif not isinstance(self.codebook, torch.Tensor):
            raise ValueError(f"codebook must be a name or a tensor, got {type(self.codebook).__name__}")
        check_scale_method(self.scale_method)
        if self.offsets and self.scale_method == "absmean":
            raise ValueError("scale_method='absmean' does not combine with offsets")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("offsets", "learned_table"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip or ())
        object.__setattr__(self, "skip", tuple(str(s) for s in skip))
        if isinstance(self.codebook, str) and self.codebook == "learned":
            object.__setattr__(self, "learned_table", True)

    @property
    def codebook_name(self) -> str:
        """The codebook as recorded in a config: its name, ``learned`` or ``custom`` (a tensor)."""
        if self.learned_table:
            return "learned"
        return self.codebook if isinstance(self.codebook, str) else "custom"

    def quantize_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`flute.quantize_weight` (and of GPTQ-LUT) for one weight."""
        codebook = "nf" if isinstance(self.codebook, str) and self.codebook == "learned" else self.codebook
        return dict(bits=self.bits, group_size=self.group_size, codebook=codebook,
                    scale_method=self.scale_method, offsets=self.offsets,
                    learned_table=self.learned_table)

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, **extra) -> Dict[str, Any]:
        """The ``quantization_config`` of a checkpoint (JSON-serializable); ``extra`` keys (e.g.
        ``quantized_modules``, ``calibration``) are added as they are."""
        d = dict(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION, bits=self.bits,
                 group_size=self.group_size, codebook=self.codebook_name,
                 scale_method=self.scale_method, offsets=self.offsets,
                 learned_table=self.learned_table, method=self.method,
                 modules_to_not_convert=list(self.skip))
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, config: Optional[dict], *, strict: bool = False) -> "QuantSpec":
        """Read a ``quantization_config`` dict. A foreign ``quant_method`` or format version raises;
        with ``strict`` an unknown key raises too (other keys are informational and ignored).
        A ``codebook`` of ``"custom"`` reads as NF: the table itself is in the checkpoint."""
        config = dict(config or {})
        method = config.pop("quant_method", QUANT_METHOD)
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if str(method).lower() != QUANT_METHOD:
            raise ValueError(f"the quantization_config is for quant_method={method!r}, not "
                             f"{QUANT_METHOD!r}")
        version = config.pop("format_version", FORMAT_VERSION)
        if int(version) != FORMAT_VERSION:
            raise ValueError(f"the checkpoint uses flute format version {version}; this flute "
                             f"reads version {FORMAT_VERSION}")
        known = {"bits", "group_size", "codebook", "scale_method", "offsets", "learned_table",
                 "method", "modules_to_not_convert"}
        unknown = sorted(set(config) - known - {"quantized_modules", "calibration", "act_aware"})
        if strict and unknown:
            raise ValueError(f"unknown quantization settings {unknown}; known: {sorted(known)}")
        codebook = config.get("codebook") or "nf"
        if codebook == "custom":
            codebook = "nf"
        kwargs = dict(codebook=codebook, skip=config.get("modules_to_not_convert") or ())
        for key in ("bits", "group_size"):
            if key in config:
                kwargs[key] = _as_int(config[key], key)
        for key in ("scale_method", "method"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        for key in ("offsets", "learned_table"):
            if key in config:
                kwargs[key] = _as_bool(config[key], key)
        return cls(**kwargs)


def _as_int(value, name: str) -> int:
    """An int from a config value (JSON numbers only; True/False and 4.5 are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")
