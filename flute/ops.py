"""The ``torch.ops.flute`` operators, registered with ``torch.library``.

``flute::qgemm(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)``
    ``y = x @ W.T`` with ``W[n, k] = table[q[n, k]] * scales[n, k // G] (+ offsets[n, k // G])``.
    ``x`` is ``[..., in_features]``, ``y`` is ``[..., out_features]`` in ``x``'s dtype.
``flute::dequantize(qweight, scales, offsets, table, bits, group_size, in_features, out_features)``
    ``W`` itself, ``[out_features, in_features]`` in ``scales``' dtype.

``qweight`` is the packed codes in a *device layout*, derived at load time from the canonical
format and told apart by dtype: the GPU kernel layout (int32, :mod:`flute.layout`) or the CPU
layout (uint8, :mod:`flute.cpu_layout`); :func:`flute.cpu_layout.device_layout` builds the right
one for a device. ``table`` ``[2**bits]`` (float32 in checkpoints; any float dtype is accepted),
``scales``/``offsets`` ``[out_features, ceil(in_features / G)]``; ``group_size`` -1 means one group
per row. The same arguments serve every backend:

- CPU, CPU layout: the lookup-table kernel of ``flute._cpu`` (csrc/cpu: AVX-512, AVX2 or portable
  C++, picked from cpuid; :func:`set_cpu_isa` forces one), registered in C++ for the CPU key.
  Below 32 rows of x (below 256 on AVX-512 VBMI + VNNI CPUs), int8 activations and
  integer dot products (llama.cpp's approach; the "int8" mode of :func:`get_cpu_mode`), exact fp32
  otherwise; ``set_cpu_mode("exact")`` makes every call exact.
- CPU, GPU layout (or ``flute._cpu`` not built): the reference below: the codes are decoded every
  call (nothing is cached), a block of rows is dequantized in float32, multiplied, next block.
- CUDA: the fused kernel from ``flute._C`` when it is built; otherwise the reference runs on the
  GPU tensors (correct, not fast). A CPU-layout (uint8) qweight is rejected there.
- Meta / fake: shape and dtype only (either layout), for ``torch.compile`` and vLLM.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Union

import torch

from .codebooks import SUPPORTED_BITS
from .cpu_layout import cpu_layout_shape
from .format import dequantize_codes, num_groups
from .layout import kernel_layout_shape

QGEMM_SCHEMA = ("qgemm(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
                "int bits, int group_size, int in_features, int out_features) -> Tensor")
DEQUANTIZE_SCHEMA = ("dequantize(Tensor qweight, Tensor scales, Tensor? offsets, Tensor table, "
                     "int bits, int group_size, int in_features, int out_features) -> Tensor")

_lib = torch.library.Library("flute", "DEF")
_lib.define(QGEMM_SCHEMA)
_lib.define(DEQUANTIZE_SCHEMA)
# x @ weight.T for an unquantized bf16 weight (the layers quantization leaves in 16 bits), in fp32:
# flute._cpu's kernel (csrc/cpu/dense_gemv.h), else bf16_gemv_reference.
_lib.define("bf16_gemv(Tensor x, Tensor weight) -> Tensor")

# Rows of W dequantized at once by the reference path: 4M float32 elements (16 MB) per block.
_REFERENCE_BLOCK_ELEMENTS = 1 << 22


def _layout_error(qweight, bits, in_features, out_features) -> str:
    gpu = kernel_layout_shape(bits, in_features, out_features)
    cpu = cpu_layout_shape(bits, in_features, out_features)
    what = f"{out_features}x{in_features} {bits}-bit weight"
    if qweight.dtype == torch.uint8:
        return (f"flute: qweight must be uint8 of shape {cpu} (the CPU layout of a {what}), got "
                f"uint8 {tuple(qweight.shape)}")
    if qweight.dtype == torch.int32:
        return (f"flute: qweight must be int32 of shape {gpu} (the GPU kernel layout of a {what}), "
                f"got int32 {tuple(qweight.shape)}")
    return (f"flute: qweight must be int32 of shape {gpu} (the GPU kernel layout of a {what}) or "
            f"uint8 of shape {cpu} (its CPU layout), got {qweight.dtype} {tuple(qweight.shape)}")


def check_weight_args(qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    """Validate the quantized-weight arguments; every error names the argument and what was expected.
    ``qweight`` may be either device layout (int32 GPU kernel layout, uint8 CPU layout)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"flute: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"flute: group_size must be positive or -1, got {group_size}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"flute: in_features and out_features must be positive, got "
                         f"{in_features} and {out_features}")
    if qweight.dtype == torch.uint8:
        want = cpu_layout_shape(bits, in_features, out_features)
    elif qweight.dtype == torch.int32:
        want = kernel_layout_shape(bits, in_features, out_features)
    else:
        want = None
    if want is None or tuple(qweight.shape) != want:
        raise ValueError(_layout_error(qweight, bits, in_features, out_features))
    g = (out_features, num_groups(group_size, in_features))
    if not scales.is_floating_point() or tuple(scales.shape) != g:
        raise ValueError(f"flute: scales must be floating point of shape {g}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if offsets is not None and (tuple(offsets.shape) != g or offsets.dtype != scales.dtype):
        raise ValueError(f"flute: offsets must have the shape and dtype of scales ({g}, "
                         f"{scales.dtype}), got {offsets.dtype} {tuple(offsets.shape)}")
    if not table.is_floating_point() or table.numel() != 2 ** bits:
        raise ValueError(f"flute: table must be floating point with {2 ** bits} entries for "
                         f"bits={bits}, got {table.dtype} with {table.numel()}")
    dev = qweight.device
    if scales.device != dev or table.device != dev or (offsets is not None and offsets.device != dev):
        tensors = [qweight, scales, table] + ([offsets] if offsets is not None else [])
        raise ValueError(f"flute: all tensors must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")


def check_qgemm_args(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    check_weight_args(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
    if not x.is_floating_point():
        raise ValueError(f"flute: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"flute: x must have last dimension in_features={in_features}, got shape "
                         f"{tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"flute: x is on {x.device} but the weight is on {qweight.device}")


def _codes(qweight, bits, in_features, out_features) -> torch.Tensor:
    """uint8 codes ``[N, K]`` of either device layout, decoded now (never cached: a cache keyed on
    the tensor broke under ``torch.inference_mode`` and could serve stale codes)."""
    from .cpu_layout import codes_from_layout
    return codes_from_layout(qweight, bits, in_features, out_features)


@torch.no_grad()  # a kernel, not a traced computation: gradients come from _qgemm_backward
def qgemm_reference(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    """The reference implementation (any device, either layout): float32 weights, one block of rows
    at a time."""
    check_qgemm_args(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, in_features).to(compute)
    codes = _codes(qweight, bits, in_features, out_features)
    out = torch.empty(x2.shape[0], out_features, dtype=compute, device=x.device)
    block = max(1, _REFERENCE_BLOCK_ELEMENTS // in_features)
    for n0 in range(0, out_features, block):
        n1 = min(out_features, n0 + block)
        w = dequantize_codes(codes[n0:n1], scales[n0:n1],
                             None if offsets is None else offsets[n0:n1], table, group_size, compute)
        torch.matmul(x2, w.t(), out=out[:, n0:n1])
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@torch.no_grad()
def dequantize_reference(qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    check_weight_args(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
    codes = _codes(qweight, bits, in_features, out_features)
    return dequantize_codes(codes, scales, offsets, table, group_size).to(scales.dtype)


# -- the CPU kernel (flute._cpu) -------------------------------------------------------------------

# Why ``flute._cpu`` did not load ("" when it did).
CPU_KERNEL_ERROR = ""


def cpu_extension_file(package_dir: str) -> Optional[str]:
    """The compiled ``_cpu`` extension in ``package_dir`` (any of this Python's extension
    suffixes, ``.abi3.so`` included), or None when the install has none."""
    import importlib.machinery
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_cpu" + suffix)
        if os.path.isfile(path):
            return path
    return None


def cpu_extension_error(exc: BaseException, package_dir: str) -> str:
    """Why ``flute._cpu`` did not load, for the warning: "not built" when ``package_dir`` holds
    no compiled extension (Python's own message for a missing submodule of a package being
    imported blames a circular import), else the import error itself."""
    if cpu_extension_file(package_dir) is None:
        return ("not built: this install has no compiled flute/_cpu extension (reinstall on a "
                "machine with a C++ compiler: pip install --no-build-isolation -e .)")
    return f"{type(exc).__name__}: {exc}"


def _load_cpu_extension() -> bool:
    """Import ``flute._cpu`` (registers flute::cpu_lut_gemm & co.); False, with a one-line warning,
    when it was not built or does not load."""
    global CPU_KERNEL_ERROR
    try:
        from . import _cpu  # noqa: F401
    except (ImportError, OSError) as exc:
        CPU_KERNEL_ERROR = cpu_extension_error(exc, os.path.dirname(os.path.abspath(__file__)))
        warnings.warn(f"flute: CPU kernel flute._cpu not available ({CPU_KERNEL_ERROR}); the CPU op "
                      f"runs the slow reference", RuntimeWarning, stacklevel=2)
        return False
    return True


HAS_CPU_KERNEL = _load_cpu_extension()
if HAS_CPU_KERNEL and os.environ.get("FLUTE_CPU_ISA", "").strip() not in ("", "auto"):
    _want = os.environ["FLUTE_CPU_ISA"].strip()
    if torch.ops.flute.cpu_isa() != _want:
        warnings.warn(f"flute: FLUTE_CPU_ISA={_want!r} is unknown or not supported by this CPU; "
                      f"using {torch.ops.flute.cpu_isa()!r}", RuntimeWarning, stacklevel=2)
if HAS_CPU_KERNEL and os.environ.get("FLUTE_CPU_VNNI", "").strip() not in (
        "", "0", "1", "true", "false", "on", "off", "yes", "no"):
    # a form's name (settings.cpp: initial_vnni); one this CPU or build lacks falls back to the best
    _want = os.environ["FLUTE_CPU_VNNI"].strip()
    if torch.ops.flute.cpu_vnni() != _want:
        warnings.warn(f"flute: FLUTE_CPU_VNNI={_want!r} names no form this CPU and build have "
                      f"(available: {list(torch.ops.flute.cpu_vnni_forms())}); using "
                      f"{torch.ops.flute.cpu_vnni()!r}", RuntimeWarning, stacklevel=2)


def get_cpu_isa() -> str:
    """The CPU kernel path in use: ``"avx512"``, ``"avx2"``, ``"portable"``, or ``"reference"``
    when ``flute._cpu`` is not built."""
    return torch.ops.flute.cpu_isa() if HAS_CPU_KERNEL else "reference"


def set_cpu_isa(name: str) -> str:
    """Force the CPU kernel path (``"avx512"``, ``"avx2"``, ``"portable"``, or ``"auto"`` for the
    best this CPU supports; the environment variable ``FLUTE_CPU_ISA`` sets it at import). Raises
    if the CPU lacks it. Returns the path now in use."""
    if not HAS_CPU_KERNEL:
        raise RuntimeError(f"flute: the CPU kernel is not built ({CPU_KERNEL_ERROR})")
    return torch.ops.flute.cpu_set_isa(name)


def get_cpu_amx() -> bool:
    """Whether bf16 activations from 16 rows take the CPU kernel's AMX paths (CPUs with AMX-BF16,
    e.g. Sapphire Rapids: decoded weight tiles multiplied by ``tdpbf16ps``; weights
    ``bf16(table[q] * s + o)`` as in the panel path, fp32 sums, bf16 output). Up to 64 rows the
    weights stream through once; from 65 rows a blocked kernel (prefill) decodes 128 rows at a
    time into L2. On where the CPU and Linux offer
    AMX tiles unless the environment variable ``FLUTE_CPU_AMX=0`` was set at import; only on the
    ``"avx512"`` path."""
    return bool(torch.ops.flute.cpu_amx()) if HAS_CPU_KERNEL else False


def set_cpu_amx(on: bool) -> bool:
    """Turn the CPU kernel's AMX path (see :func:`get_cpu_amx`) on or off. Raises if turned on
    where the CPU or its Linux kernel offers no AMX-BF16 tiles. Returns the new state."""
    if not HAS_CPU_KERNEL:
        raise RuntimeError(f"flute: the CPU kernel is not built ({CPU_KERNEL_ERROR})")
    return bool(torch.ops.flute.cpu_set_amx(bool(on)))


def get_cpu_vnni() -> str:
    """The form the CPU kernel's AVX2 int8 kernel runs: ``"avxvnni"`` (AVX-VNNI: Alder Lake and
    later client cores, Sierra Forest), ``"avx512vnni_ymm"`` (AVX512-VNNI on 256-bit registers:
    AVX-512 CPUs without VBMI, e.g. Cascade Lake), or, without VNNI, its int16 step: EVEX encoded
    on AVX-512 CPUs (``"avx512bw_ymm"``: e.g. Skylake-SP; 32 vector registers) and VEX encoded
    elsewhere (``""``: 16 registers). Every form gives the same bits; the VNNI ones take fewer
    operations per product, the EVEX ones spill less. By default the CPU's best
    (``"avx512vnni_ymm"`` where it has both VNNI forms); the environment variable
    ``FLUTE_CPU_VNNI``, read at import, picks one by name (a name this CPU or build lacks warns and
    keeps the best) or turns VNNI off (``0``). CPUs with AVX-512 VBMI + VNNI run the AVX-512 int8
    kernel instead (unless :func:`set_cpu_isa` forces ``"avx2"``)."""
    return str(torch.ops.flute.cpu_vnni()) if HAS_CPU_KERNEL else ""


def get_cpu_vnni_forms() -> List[str]:
    """The named forms of the AVX2 int8 kernel that this CPU and build can run besides ``""``
    (see :func:`get_cpu_vnni`); empty without the CPU kernel."""
    return [str(f) for f in torch.ops.flute.cpu_vnni_forms()] if HAS_CPU_KERNEL else []


def set_cpu_vnni(on: Union[bool, str]) -> str:
    """Set the AVX2 int8 kernel's form (see :func:`get_cpu_vnni`): ``True`` the CPU's best VNNI
    form, ``False`` its best int16 one (``"avx512bw_ymm"`` on AVX-512 CPUs, else ``""``), or a
    form by name (``""``, ``"avxvnni"``, ``"avx512vnni_ymm"``, ``"avx512bw_ymm"``). Raises where
    the CPU (or the build) lacks the form asked for. Returns the form now in use."""
    if not HAS_CPU_KERNEL:
        raise RuntimeError(f"flute: the CPU kernel is not built ({CPU_KERNEL_ERROR})")
    if isinstance(on, str):
        return str(torch.ops.flute.cpu_set_vnni_form(on))
    return str(torch.ops.flute.cpu_set_vnni(bool(on)))


def get_cpu_mode() -> str:
    """The arithmetic of the CPU kernel's fused path (batches below the panel threshold):

    * ``"int8"`` (the default; groups of a multiple of 32 or -1): llama.cpp's approach.
      Activations rounded to int8 per 32 columns (chunk scales: integer multiples of one unit per
      block, so that integer sums of a block share a scale), the table to 7-bit integers, integer
      dot products. 2 bits: per pair of activation columns the 16 sums of two table entries
      times the two activations, rounded to int8 per 32 columns, looked up by pairs of codes
      (from 4 rows, ``torch.ops.flute.cpu_rows16_m(2)``, on CPUs with AVX-512 VBMI + VNNI the int8 activations of 3 and 4 bits instead:
      :func:`flute.testing.int8_uses_pair_tables`); :func:`flute.testing.reference_qgemm_int8` is
      its executable spec. Its perplexity cost on
      SmolLM2, measured, is within +-0.5% (``benchmarks/results/int8-quality-*.json``). Other
      group sizes and non-finite activations compute exactly.
    * ``"exact"``: fp32 decode and accumulation, matches the float64 reference to ~1e-6.
    * ``"bf16"`` (AVX512_BF16 + VBMI CPUs; 3 and 4 bits, 2 bits compute exactly): activations and
      table values rounded to bf16, fp32 sums.

    Batches at or above the panel threshold (``torch.ops.flute.cpu_panel_m(bits)``: 32 rows; none,
    0, where the int8 mode has its 16-row kernel, ``torch.ops.flute.cpu_rows16_m(bits)`` > 0, which
    then runs every batch from its threshold on) are exact in every mode. On CPUs with AMX
    (:func:`get_cpu_amx`), bf16 activations from 16 rows take the AMX paths in every mode (3 and 4
    bits).
    """
    return torch.ops.flute.cpu_mode() if HAS_CPU_KERNEL else "exact"


def set_cpu_mode(name: str) -> str:
    """Select the arithmetic of the CPU kernel's fused path (see :func:`get_cpu_mode`; the
    environment variable ``FLUTE_CPU_MODE`` sets it at import). On CPUs without AVX512_BF16 and
    VBMI, and on the AVX2 and portable paths, "bf16" computes exactly. The large-batch path (panels multiplied by
    torch) is the same in every mode. Returns the mode now in use."""
    if not HAS_CPU_KERNEL:
        raise RuntimeError(f"flute: the CPU kernel is not built ({CPU_KERNEL_ERROR})")
    return torch.ops.flute.cpu_set_mode(name)


def qgemm_cpu(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    """Python CPU implementation of flute::qgemm, used when flute._cpu is not loaded (then the
    reference for both layouts; the kernel branch serves tests that toggle HAS_CPU_KERNEL)."""
    if qweight.dtype == torch.uint8 and HAS_CPU_KERNEL:
        check_qgemm_args(x, qweight, scales, offsets, table, bits, group_size, in_features,
                         out_features)
        return torch.ops.flute.cpu_lut_gemm(x, qweight, scales, offsets, table, bits, group_size,
                                            in_features, out_features)
    return qgemm_reference(x, qweight, scales, offsets, table, bits, group_size, in_features,
                           out_features)


def dequantize_cpu(qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    if qweight.dtype == torch.uint8 and HAS_CPU_KERNEL:
        check_weight_args(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
        w = torch.ops.flute.cpu_lut_dequantize(qweight, scales, offsets, table, bits, group_size,
                                               in_features, out_features)
        return w.to(scales.dtype)
    return dequantize_reference(qweight, scales, offsets, table, bits, group_size, in_features,
                                out_features)


def _reject_cpu_layout(qweight):
    if qweight.dtype == torch.uint8:
        raise ValueError("flute: qweight is uint8, the CPU layout; on CUDA the op takes the int32 GPU "
                         "kernel layout: build it with flute.cpu_layout.device_layout(codes, bits, "
                         "device) (QuantLinear does this when moved)")


def _qgemm_cuda_fallback(x, qweight, *args):
    _reject_cpu_layout(qweight)
    return qgemm_reference(x, qweight, *args)


def _dequantize_cuda_fallback(qweight, *args):
    _reject_cpu_layout(qweight)
    return dequantize_reference(qweight, *args)


def _qgemm_fake(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    check_qgemm_args(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)
    return x.new_empty(*x.shape[:-1], out_features)


def _dequantize_fake(qweight, scales, offsets, table, bits, group_size, in_features, out_features):
    check_weight_args(qweight, scales, offsets, table, bits, group_size, in_features, out_features)
    return scales.new_empty(out_features, in_features)


# The reference as ops of its own: flute._cpu's C++ CPU kernel of flute::qgemm / dequantize hands
# GPU-layout (int32) weights to them.
_lib.define("qgemm_reference" + QGEMM_SCHEMA[len("qgemm"):])
_lib.define("dequantize_reference" + DEQUANTIZE_SCHEMA[len("dequantize"):])
_lib.impl("qgemm_reference", qgemm_reference, "CPU")
_lib.impl("dequantize_reference", dequantize_reference, "CPU")
if not HAS_CPU_KERNEL:
    # flute._cpu registers the CPU kernels of flute::qgemm / dequantize in C++ (both layouts; no
    # Python round trip per call); without it, these Python ones (the reference for both layouts).
    _lib.impl("qgemm", qgemm_cpu, "CPU")
    _lib.impl("dequantize", dequantize_cpu, "CPU")
torch.library.register_fake("flute::qgemm", lib=_lib)(_qgemm_fake)
torch.library.register_fake("flute::dequantize", lib=_lib)(_dequantize_fake)


def check_bf16_gemv_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The argument checks of ``flute::bf16_gemv`` (the C++ kernel's, same messages)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"flute: bf16_gemv's weight must be a 2-D bfloat16 tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"flute: bf16_gemv's x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"flute: bf16_gemv's x must have last dimension {weight.shape[1]} (the weight's "
                         f"columns), got shape {list(x.shape)}")


def bf16_gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``flute::bf16_gemv`` without flute._cpu: ``x @ weight.T`` in float32, in x's dtype (the
    kernel's sums run in another order, so the two differ by float32 rounding)."""
    check_bf16_gemv_args(x, weight)
    return (x.float() @ weight.float().t()).to(x.dtype)


def _bf16_gemv_fake(x, weight):
    check_bf16_gemv_args(x, weight)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


if not HAS_CPU_KERNEL:
    _lib.impl("bf16_gemv", bf16_gemv_reference, "CPU")
torch.library.register_fake("flute::bf16_gemv", lib=_lib)(_bf16_gemv_fake)


def _qgemm_setup_context(ctx, inputs, output):
    _, qweight, scales, offsets, table, bits, group_size, in_features, out_features = inputs
    ctx.save_for_backward(qweight, scales, offsets, table)
    ctx.shape = (bits, group_size, in_features, out_features)


def _qgemm_backward(ctx, grad):
    """Gradient with respect to ``x`` only (the quantized weight is frozen): ``grad @ W``, so
    adapters (LoRA) and activations upstream of a quantized layer can be trained."""
    qweight, scales, offsets, table = ctx.saved_tensors
    w = torch.ops.flute.dequantize(qweight, scales, offsets, table, *ctx.shape)
    grad_x = torch.matmul(grad, w.to(grad.dtype))
    return grad_x, None, None, None, None, None, None, None, None


if not HAS_CPU_KERNEL:  # flute._cpu registers the same formula in C++ (cheaper per call)
    torch.library.register_autograd("flute::qgemm", _qgemm_backward,
                                    setup_context=_qgemm_setup_context, lib=_lib)


# Why ``flute._C`` did not load ("" when it did): kept so that a GPU run can report a broken build
# instead of silently falling back to the reference (tests/test_cuda_kernel.py fails with it).
CUDA_KERNEL_ERROR = ""


def _load_cuda_extension() -> bool:
    """Import ``flute._C`` (which registers the CUDA kernels); False when it is missing or fails to
    load, with the reason in ``CUDA_KERNEL_ERROR``."""
    global CUDA_KERNEL_ERROR
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:  # not built (CPU install), or built against another torch
        import importlib.machinery
        import os
        here = os.path.dirname(os.path.abspath(__file__))
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        built = [f for f in os.listdir(here) if f.startswith("_C.") and f.endswith(suffixes)]
        CUDA_KERNEL_ERROR = (f"{type(exc).__name__} from {built[0]}: {exc}" if built else
                             f"not built: no flute/_C extension module in {here}")
        return False
    except OSError as exc:  # e.g. a missing shared library of the CUDA runtime
        CUDA_KERNEL_ERROR = f"{type(exc).__name__}: {exc}"
        return False
    CUDA_KERNEL_ERROR = ""
    return True


HAS_CUDA_KERNEL = _load_cuda_extension()
if not HAS_CUDA_KERNEL:
    # Without the extension, CUDA tensors still work: the reference runs on the GPU.
    _lib.impl("qgemm", _qgemm_cuda_fallback, "CUDA")
    _lib.impl("dequantize", _dequantize_cuda_fallback, "CUDA")


def _direct_qgemm():
    """``flute._cpu.qgemm`` where it runs on this torch, else ``torch.ops.flute.qgemm``."""
    if HAS_CPU_KERNEL:
        from . import _cpu
        if _cpu._init_direct(torch.ops.flute.qgemm.default):
            return _cpu.qgemm
    return torch.ops.flute.qgemm


# What an eager forward calls for flute::qgemm (QuantLinear, the CPU benchmark): ``flute._cpu.qgemm``,
# a direct Python entry to the same dispatcher op that skips torch.ops' boxed call, ~5 us of a
# small layer's 20-30 us with cold caches (csrc/cpu/python_entry.cpp: it hands tensor subclasses,
# torch function modes, symbolic ints and errors to torch.ops.flute.qgemm), where the extension
# finds torch's Python tensor type; else torch.ops.flute.qgemm. Traced code (torch.compile) must
# call torch.ops.flute.qgemm itself: Dynamo cannot see into the C function.
QGEMM_EAGER = _direct_qgemm()

def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
          table: torch.Tensor, bits: int, group_size: int, in_features: int,
          out_features: int) -> torch.Tensor:
    """``torch.ops.flute.qgemm``: ``x @ W.T`` for a quantized weight (see the module docstring);
    in eager code through :data:`QGEMM_EAGER`."""
    op = torch.ops.flute.qgemm if torch.compiler.is_compiling() else QGEMM_EAGER
    return op(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
               table: torch.Tensor, bits: int, group_size: int, in_features: int,
               out_features: int) -> torch.Tensor:
    """``torch.ops.flute.dequantize``: the weight ``[out_features, in_features]`` in scales' dtype."""
    return torch.ops.flute.dequantize(qweight, scales, offsets, table, bits, group_size, in_features,
                                      out_features)
