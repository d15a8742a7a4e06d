"""``QuantLinear``: an ``nn.Linear`` whose weight is stored in the canonical flute format."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .format import (FLOAT_DTYPES, QuantizedWeight, check_tensor, check_weight_tensors,
                     num_groups, pack_codes, packed_row_bytes, unpack_codes, FORMAT_VERSION)
from .cpu_layout import codes_from_layout, device_layout, layout_dtype
from .huge_pages import place_for_streaming, place_weight_for_streaming
from .quantize import quantize_weight
from . import ops  # noqa: F401  (registers torch.ops.flute.*)

_qgemm = torch.ops.flute.qgemm
_qgemm_eager = ops.QGEMM_EAGER  # flute._cpu.qgemm where it runs (a direct entry to the same op)
_is_compiling = torch.compiler.is_compiling


class QuantLinear(nn.Module):
    """A linear layer ``y = x @ W.T + b`` with a lookup-table-quantized weight.

    Its state dict is the canonical format (``qcodes``, ``scales``, optional ``offsets``, ``table``,
    ``qmeta``, optional ``bias``), the same on every device. The kernel layout ``qweight`` is
    derived from it by :meth:`prepare` (at the first forward at the latest) in the device layout of
    the buffers' device (:func:`flute.cpu_layout.device_layout`), is not saved, and is rebuilt
    when the module moves to another kind of device. Once it is
    built, the packed ``qcodes`` are released to save memory and regenerated when a state dict is
    taken.

    Inputs may have any number of leading dimensions and be float32, float16 or bfloat16.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 bias: bool = True, offsets: bool = False, dtype: torch.dtype = torch.float16,
                 device=None, codebook: str = "custom"):
        super().__init__()
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantLinear: dtype (of scales, offsets and bias) must be one of "
                             f"{FLOAT_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.codebook = bits, group_size, codebook
        self._op_dims = (bits, group_size, in_features, out_features)  # the op's last arguments
        QuantizedWeight(  # validates bits, group size and sizes before any buffer is made
            torch.empty(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8),
            torch.empty(out_features, num_groups(group_size, in_features)),
            torch.empty(2 ** bits), bits, group_size, in_features, out_features)
        g = num_groups(group_size, in_features)
        self.register_buffer("qcodes", torch.zeros(out_features, packed_row_bytes(in_features, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, g, dtype=dtype, device=device)
                             if offsets else None)
        self.register_buffer("table", torch.zeros(2 ** bits, dtype=torch.float32, device=device))
        self.register_buffer("qmeta", torch.tensor([FORMAT_VERSION, bits, group_size, in_features,
                                                    out_features], dtype=torch.int32, device=device))
        self.register_buffer("qweight", None, persistent=False)
        self.register_parameter("bias", nn.Parameter(  # registered even when None (forward reads it)
            torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None)
        self._loaded = False  # set by a complete _load_from_state_dict, read by _after_load
        self.register_load_state_dict_post_hook(QuantLinear._after_load)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       prepare: bool = True) -> "QuantLinear":
        """Wrap a :class:`~flute.format.QuantizedWeight` (and an optional bias) as a module.

        ``prepare=False`` leaves the device layout to the first forward, so quantize-then-save
        never pays for it."""
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, bias is not None,
                qw.offsets is not None, qw.scales.dtype, device="meta", codebook=qw.codebook)
        m.qcodes = qw.qcodes
        m.scales = qw.scales
        m.offsets = qw.offsets
        m.table = qw.table.to(device=qw.qcodes.device, dtype=torch.float32)
        m.qmeta = qw.qmeta().to(qw.qcodes.device)
        if bias is not None:
            check_tensor("bias", bias, cast=qw.scales.dtype)  # a NaN/Inf bias is refused
            m.bias = nn.Parameter(bias.detach().to(device=qw.qcodes.device, dtype=qw.scales.dtype),
                                  requires_grad=False)
        return m.prepare() if prepare else m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64, **quantize_kwargs
                    ) -> "QuantLinear":
        """Quantize an ``nn.Linear``; ``quantize_kwargs`` go to :func:`flute.quantize_weight`
        (``codebook``, ``scale_method``, ``offsets``, ``learned_table``, ...)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits, group_size, **quantize_kwargs)
        return cls.from_quantized(qw, linear.bias)

    # -- the derived kernel layout --------------------------------------------------------------
    def prepare(self) -> "QuantLinear":
        """Build the kernel layout from ``qcodes`` (on their device) and release ``qcodes``."""
        if self.qcodes.numel() == 0 and self.qweight is not None:
            return self
        if self.qcodes.is_meta:
            raise RuntimeError("QuantLinear.prepare: the weights are still on the meta device; "
                               "load a state dict first")
        codes = unpack_codes(self.qcodes, self.bits, self.in_features)
        self.qweight = device_layout(codes, self.bits, self.qcodes.device)
        self.qcodes = self.qcodes.new_empty(0)
        return self

    def _apply(self, fn, recurse=True):
        # ``qweight`` is a device layout (uint8 CPU layout / int32 GPU layout, flute.cpu_layout):
        # when .to() / .cuda() / .cpu() moves the module to another kind of device, rebuild it for
        # the new device. Both layouts are exact, so CPU -> CUDA -> CPU is lossless.
        super()._apply(fn, recurse)
        q = self.qweight
        if q is not None and q.device.type != "meta" and q.dtype != layout_dtype(q.device):
            codes = codes_from_layout(q, self.bits, self.in_features, self.out_features)
            self.qweight = device_layout(codes, self.bits, q.device)
        return self

    def __deepcopy__(self, memo):
        # The copy's CPU layout placed as prepare() placed this one (flute.huge_pages): the default
        # copy would clone each arena chunk the layouts are views of, whole, into memory of 4 KiB
        # pages (the model it was copied from decoded SmolLM2 1.05-1.08x as fast as such a copy,
        # CPU_NOTES item 289). A layout already in memo (shared on purpose) stays shared.
        q = self._buffers.get("qweight")
        if q is not None and id(q) not in memo and q.device.type == "cpu" and q.dtype == torch.uint8:
            placed = place_for_streaming(q)
            memo[id(q)] = placed if placed is not q else q.clone()
        return _copy_module(self, memo)

    def quantized_weight(self) -> QuantizedWeight:
        """The weight in the canonical format (regenerating the packed codes if released)."""
        qcodes = self.qcodes
        if qcodes.numel() == 0:
            codes = codes_from_layout(self.qweight, self.bits, self.in_features, self.out_features)
            qcodes = pack_codes(codes, self.bits)
        return QuantizedWeight(qcodes, self.scales, self.table.float(), self.bits, self.group_size,
                               self.in_features, self.out_features, self.offsets, self.codebook)

    def checkpoint_nbytes(self) -> int:
        """Bytes this layer takes in a checkpoint (packed codes, scales, offsets, table, bias),
        computed from the shapes: nothing is repacked."""
        tensors = [self.scales, self.table] + [t for t in (self.offsets, self.bias) if t is not None]
        return (self.out_features * packed_row_bytes(self.in_features, self.bits)
                + sum(t.numel() * t.element_size() for t in tensors))

    # -- state dict: always the canonical format -----------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qcodes.numel() == 0 and self.qweight is not None:
            destination[prefix + "qcodes"] = self.quantized_weight().qcodes

    def _persistent_names(self):
        names = ["qcodes", "scales", "table", "qmeta"]
        return names + [n for n in ("offsets", "bias") if getattr(self, n) is not None]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # All or nothing: every incoming tensor is checked (present, dtype, shape, qmeta, finite
        # once converted to this layer's dtypes) before any buffer is touched. A missing tensor is
        # reported in missing_keys (strict=True raises after the walk, strict=False returns it)
        # and a bad one raises a ValueError naming it; either way this layer keeps the weight it
        # had, and _after_load does not repack it.
        self._loaded = False
        names = self._persistent_names()
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            if strict:  # the unexpected keys under this prefix, as nn.Module reports them
                unexpected_keys.extend(key for key in state_dict if key.startswith(prefix)
                                       and key[len(prefix):] not in names
                                       and key[len(prefix):] != "_extra_state")
            return
        tensors = {n: state_dict[prefix + n] for n in names}
        check_weight_tensors(
            tensors, prefix,
            expect=dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                        out_features=self.out_features),
            cast={n: getattr(self, n).dtype for n in ("scales", "offsets", "table", "bias")
                  if getattr(self, n) is not None})
        if self.qcodes.numel() == 0:  # released after prepare(): restore the slot to load into
            self.qcodes = torch.empty(self.out_features, packed_row_bytes(self.in_features, self.bits),
                                      dtype=torch.uint8, device=self.scales.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.qweight = None
        self._loaded = True

    @staticmethod
    def _after_load(module, incompatible_keys):
        # only a layer whose own tensors were all loaded is repacked; one whose load was refused
        # keeps its kernel layout (or its unloaded meta buffers) as they were
        loaded, module._loaded = module._loaded, False
        if loaded and not module.qcodes.is_meta:
            module.prepare()

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: a decoding SmolLM2 makes 210 of these calls per token, each a few us of
        # kernel plus the call itself. The buffers come from their dict (each `self.<buffer>` goes
        # through nn.Module.__getattr__) and the op's integer arguments from one tuple.
        buffers = self._buffers
        qweight = buffers["qweight"]
        if qweight is None:
            self.prepare()
            qweight = buffers["qweight"]
        scales = buffers["scales"]
        x_dtype = x.dtype
        cast = x_dtype != scales.dtype and x.is_cuda  # the CUDA kernel runs in the scales' dtype
        op = _qgemm if _is_compiling() else _qgemm_eager  # Dynamo traces the torch.ops op
        y = op(x.to(scales.dtype) if cast else x, qweight, scales, buffers["offsets"],
               buffers["table"], *self._op_dims)
        bias = self._parameters["bias"]
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        return y.to(x_dtype) if cast else y  # otherwise already x's dtype (the op's contract)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed weight ``[out_features, in_features]`` in the scales' dtype."""
        if self.qweight is None:
            self.prepare()
        return torch.ops.flute.dequantize(self.qweight, self.scales, self.offsets, self.table,
                                          self.bits, self.group_size, self.in_features,
                                          self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, codebook={self.codebook}, "
                f"offsets={self.offsets is not None}, bias={self.bias is not None}, "
                f"dtype={self.scales.dtype}")


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy``'s own copy of ``module`` (its ``__dict__`` copied with ``memo``), for a
    ``__deepcopy__`` that prepares ``memo`` or adjusts the copy."""
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__setstate__(copy.deepcopy(module.__dict__, memo))
    return new


def _mv_beats_mm() -> bool:
    """Whether torch's CPU ``mv`` reads a bf16 weight faster than its ``mm`` at one activation row
    on this machine. Measured with torch 2.13 / oneDNN 3.12 on an Intel Xeon VM with AMX (CPU_NOTES
    items 170 and 175): with AMX, ``mm`` took 1.38-1.66x the time of ``mv`` (49152x576, 1536x576);
    with oneDNN held to AVX512-BF16 without AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, a Zen 4 /
    Zen 5 class path) 0.68-0.76x, and with torch and oneDNN held to AVX2 0.95-0.96x. So only AMX
    CPUs take ``mv``."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


#: Whether :class:`GemvLinear` sends one-row bf16 CPU products to ``torch.mv`` when flute._cpu is
#: missing (see :func:`_mv_beats_mm`).
MV_FOR_BF16_ROWS = _mv_beats_mm()


def _dense_max_rows() -> int:
    """Activation rows up to which :class:`GemvLinear` sends bf16 CPU products to
    ``flute::bf16_gemv`` (0 without flute._cpu). Each row reads the weight again from the cache, so
    the kernel is for decoding steps: 4 rows everywhere, 16 where the CPU has no native bf16
    (AVX512_BF16 / AMX), since there torch's ``mm`` widens the weight itself. On an Intel VM
    without either, 49152x576 from DRAM at 2 threads, kernel against ``mm``: 1 row 2.1 / 4.4 ms, 4
    rows 3.1 / 9.9, 16 rows 8.5 / 21.1 (CPU_NOTES item 205)."""
    if not ops.HAS_CPU_KERNEL:
        return 0
    return 4 if torch.ops.flute.cpu_has_bf16() else 16


#: See :func:`_dense_max_rows`.
DENSE_MAX_ROWS = _dense_max_rows()


def decoding_product(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``x @ weight.T (+ bias)`` for an unquantized bf16 ``weight`` on the CPU when it is a decoding
    step's product, else ``None`` (the caller then takes its own path). A decoding step is up to
    :data:`DENSE_MAX_ROWS` activation rows (float32, bfloat16 or float16) with autograd not
    recording; it runs through ``flute::bf16_gemv`` (the result in x's dtype, fp32 sums). Without
    flute._cpu, a single bf16 row goes through ``torch.mv`` where :data:`MV_FOR_BF16_ROWS` says so.
    Used by :class:`GemvLinear` and by vLLM's ``lm_head`` (:mod:`flute.integrations.vllm_method`)."""
    if (weight.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.device.type != "cpu"
            or weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    in_features = weight.shape[1]
    rows = x.numel() // in_features if in_features else 0
    if 0 < rows <= DENSE_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = torch.ops.flute.bf16_gemv(x, weight)
        return y if bias is None else y + bias
    if MV_FOR_BF16_ROWS and rows == 1 and x.dtype == torch.bfloat16:
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return None


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters and state dict) whose bf16 products of a few activation
    rows on the CPU (a decoding step) go through flute's own kernel, ``flute::bf16_gemv``
    (csrc/cpu/dense_gemv.h: fp32 sums, x in float32, bfloat16 or float16, the result in x's
    dtype), up to :data:`DENSE_MAX_ROWS` rows; everything else goes through ``nn.Linear``'s own
    path. The results differ from ``nn.Linear``'s by rounding only (another order of the fp32 sums).

    On CPUs without native bf16 arithmetic, torch 2.13's CPU ``mm`` read a bf16 weight at one row
    at ~12 GB/s, and on an Intel Xeon VM with AMX at ~15 GB/s (CPU_NOTES items 170 and 205); the
    kernel reads it at the memory's rate. A decoding model makes exactly these products in its
    unquantized ``lm_head``; :func:`flute.model.gemv_unquantized` swaps them in. Without
    flute._cpu, one-row bf16 products go through ``torch.mv`` on AMX CPUs
    (:data:`MV_FOR_BF16_ROWS`), where it beat ``mm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = decoding_product(x, w, self.bias)
        if y is not None:
            return y
        if x.dtype != w.dtype and x.is_floating_point() and w.is_floating_point():
            # float32 activations against a 16-bit weight (flute.model.cast_unquantized with
            # min_elements), beyond the kernel's rows: the product in the weight's dtype
            return nn.functional.linear(x.to(w.dtype), w, self.bias).to(x.dtype)
        return nn.functional.linear(x, w, self.bias)

    def __deepcopy__(self, memo):
        # the copy's weight placed as gemv_unquantized placed this one (huge pages of its own, from
        # WEIGHT_MIN_BYTES; .data replaced, so a weight tied to an embedding stays tied)
        new = _copy_module(self, memo)
        place_weight_for_streaming(new.weight)
        return new

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "GemvLinear":
        """A ``GemvLinear`` holding ``linear``'s own parameter objects (tied weights stay tied)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new
