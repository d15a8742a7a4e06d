"""The benchmark grids: layer shapes of real models (GPU sweep) and the CPU benchmark's shapes.

A shape is one linear layer ``y = x @ W.T`` with ``W`` of ``N`` (out_features) by ``K``
(in_features); ``M`` is the number of rows of ``x`` (tokens).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

#: ``model -> [(layer, in_features K, out_features N, parallel style)]``. Fused q/k/v and gate/up
#: projections as serving engines run them; ``col`` layers split N under tensor parallelism,
#: ``row`` layers split K.
MODELS = {
    "llama3-8b": [("qkv", 4096, 6144, "col"), ("o", 4096, 4096, "row"),
                  ("gate_up", 4096, 28672, "col"), ("down", 14336, 4096, "row")],
    "llama3-70b": [("qkv", 8192, 10240, "col"), ("o", 8192, 8192, "row"),
                   ("gate_up", 8192, 57344, "col"), ("down", 28672, 8192, "row")],
    # hidden 576, intermediate 1536, 9 heads of 64, 3 kv heads: qkv = 576 + 2 * 192 = 960.
    "smollm2-135m": [("qkv", 576, 960, "col"), ("o", 576, 576, "row"),
                     ("gate_up", 576, 3072, "col"), ("down", 1536, 576, "row")],
}
TP_MODELS = ("llama3-8b", "llama3-70b")
TP_DEGREES = (1, 2, 4)

# The GPU sweep (--full, --quick) and the smoke run of its code on the CPU (--smoke).
M_FULL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
BITS_FULL = (2, 3, 4)
GROUPS_FULL = (64, 128)
QUICK_SHAPES = ("llama3-70b/o", "llama3-70b-tp2/gate_up")  # 8192x8192 and 8192->28672
QUICK_M = (1, 16)
QUICK_CONFIGS = ((4, 128), (3, 64))
SMOKE_SHAPES = ("smollm2-135m/o", "smollm2-135m/qkv")
SMOKE_M = (1, 16)
SMOKE_CONFIGS = ((4, 64), (3, 64))

#: The CPU benchmark (``flute bench --device cpu``): ``(N, K)`` of SmolLM2-135M's MLP
#: (1536x576, 576x1536), Llama-3-8B-sized layers (8192x2048, 4096x4096) and Llama-3-8B's MLP
#: (14336x4096 up/gate, 4096x14336 down).
CPU_SHAPES: Tuple[Tuple[int, int], ...] = ((1536, 576), (576, 1536), (8192, 2048), (4096, 4096),
                                           (14336, 4096), (4096, 14336))
CPU_M = (1, 4, 16, 64, 512)
CPU_BITS = (2, 3, 4)
CPU_GROUP = 64
CPU_THREADS = (1, 2)
#: ``--quick``: one small and one large shape, M 1 and 16, one thread count per run.
CPU_QUICK_SHAPES = ((1536, 576), (14336, 4096))
CPU_QUICK_M = (1, 16)


@dataclass(frozen=True)
class Shape:
    name: str      # e.g. "llama3-70b-tp2/gate_up"
    model: str
    layer: str
    tp: int
    K: int         # in_features
    N: int         # out_features


def all_shapes() -> List[Shape]:
    """Every shape of the GPU grid: each model's linears, and Llama's TP 2 and 4 splits.

    Ordered unsplit models first, then TP 2, then TP 4, so that a run stopped by its time budget
    has the most important shapes."""
    out = []
    for tp in TP_DEGREES:
        for model, layers in MODELS.items():
            if tp > 1 and model not in TP_MODELS:
                continue
            prefix = model if tp == 1 else f"{model}-tp{tp}"
            for layer, k, n, style in layers:
                kk, nn_ = (k, n // tp) if style == "col" else (k // tp, n)
                out.append(Shape(f"{prefix}/{layer}", model, layer, tp, kk, nn_))
    return out


def select_shapes(patterns: Optional[Sequence[str]]) -> List[Shape]:
    """Shapes whose name matches any glob pattern (all of them when ``patterns`` is empty)."""
    shapes = all_shapes()
    if not patterns:
        return shapes
    picked = [s for s in shapes if any(fnmatch.fnmatchcase(s.name, p) or s.name == p for p in patterns)]
    if not picked:
        names = ", ".join(s.name for s in shapes)
        raise ValueError(f"no shape matches {list(patterns)}; known shapes: {names}")
    return picked


def parse_nk(text: str) -> Tuple[int, int]:
    """``"4096x14336"`` -> ``(4096, 14336)`` (N x K)."""
    try:
        n, k = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"a CPU shape is NxK, e.g. 4096x14336; got {text!r}") from None
    if n < 1 or k < 1:
        raise ValueError(f"N and K must be positive, got {text!r}")
    return n, k
