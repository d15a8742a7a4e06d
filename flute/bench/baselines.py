"""GPU baselines of the kernel sweep: tinygemm (``torch._weight_int4pack_mm``) and the original
IST-DASLab Marlin (when importable). Each has a support check that returns the reason a point
cannot run (recorded in the result's ``skipped`` list) and a random-weight builder."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .weights import generator


def tinygemm_support(N: int, K: int, group_size: int, device: torch.device) -> Optional[str]:
    """None when ``torch._weight_int4pack_mm`` can run this shape, else the reason it cannot."""
    if device.type != "cuda":
        return "tinygemm (torch._weight_int4pack_mm) is benchmarked on CUDA only"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no aten::_weight_int4pack_mm"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0+"
    if group_size not in (32, 64, 128, 256):
        return f"tinygemm supports group sizes 32/64/128/256, not {group_size}"
    if K % group_size or N % 8 or K % 32:
        return f"tinygemm needs K % group == 0, K % 32 == 0 and N % 8 == 0 (N={N}, K={K})"
    return None


def inner_k_tiles(K: int) -> int:
    for t in (8, 4, 2):
        if K % (t * 16) == 0:
            return t
    raise ValueError(f"K={K} is not a multiple of 32")


def random_tinygemm_weights(N: int, K: int, group_size: int, device: torch.device, copies: int,
                            seed: int = 0) -> Dict[str, object]:
    """Random int4 weights packed by ``torch._convert_weight_to_int4pack`` (uint8 [N, K/2] input,
    torch >= 2.5) and bf16 (scale, zero) pairs ``[K/G, N, 2]``, ``copies`` of each."""
    g = generator(device, seed)
    packed = []
    for _ in range(copies if copies <= 4 else 1):
        raw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device, generator=g)
        packed.append(torch.ops.aten._convert_weight_to_int4pack(raw, inner_k_tiles(K)))
    if len(packed) < copies:  # any packed bits are valid codes: replicate to save packing time
        packed = [packed[0]] * copies
    b = torch.stack(packed).contiguous()
    sz = torch.empty(copies, K // group_size, N, 2, dtype=torch.bfloat16, device=device)
    sz[..., 0].uniform_(0.5 / math.sqrt(K), 1.5 / math.sqrt(K), generator=g)
    sz[..., 1].uniform_(-0.01, 0.01, generator=g)
    return {"B": b, "sz": sz, "group_size": group_size}


def tinygemm_call(w: Dict[str, object], i: int, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    b, sz, gs = w["B"][i], w["sz"][i], w["group_size"]
    return lambda: torch.ops.aten._weight_int4pack_mm(x, b, gs, sz)


def load_marlin():
    """``(module, None)`` when the original IST-DASLab Marlin is importable, else ``(None, reason)``."""
    try:
        import marlin  # type: ignore
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build's OSError
        return None, (f"not importable ({type(e).__name__}: {e}); build it from source as "
                      f"benchmarks/MARLIN.md describes")
    if not hasattr(marlin, "mul"):
        return None, f"the importable 'marlin' ({getattr(marlin, '__file__', '?')}) has no mul()"
    return marlin, None


def marlin_support(marlin_mod, marlin_reason: Optional[str], N: int, K: int, group_size: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "Marlin is benchmarked on CUDA only"
    if marlin_mod is None:
        return marlin_reason
    if dtype != torch.float16:
        return "Marlin runs fp16 activations only"
    if group_size != 128:
        return "Marlin supports group size 128 (or per-channel) only"
    if K % 128 or N % 256:
        return f"Marlin needs K % 128 == 0 and N % 256 == 0 (N={N}, K={K})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "Marlin needs compute capability 8.0+"
    return None


def random_marlin_weights(N: int, K: int, device: torch.device, copies: int, seed: int = 0):
    """Random Marlin-format weights: B int32 ``[K/16, N*16/8]`` (any bits are valid packed int4
    codes), fp16 scales ``[K/128, N]``, and a zeroed int32 workspace of ``N/128*16`` entries (the
    kernel's locks; it leaves them zero after each call, so one serves every call)."""
    g = generator(device, seed)
    b = torch.randint(-2 ** 31, 2 ** 31, (copies, K // 16, N * 16 // 8), dtype=torch.int32,
                      device=device, generator=g)
    s = (torch.rand(copies, K // 128, N, device=device, generator=g) + 0.5) / math.sqrt(K)
    ws = torch.zeros(N // 128 * 16, dtype=torch.int32, device=device)
    return {"B": b, "s": s.half(), "workspace": ws}


def marlin_call(marlin_mod, w, i: int, x: torch.Tensor, out: torch.Tensor):
    b, s, ws = w["B"][i], w["s"][i], w["workspace"]

    def call():
        marlin_mod.mul(x, b, out, s, ws, -1, -1, -1, 16)
        return out
    return call
