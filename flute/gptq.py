"""GPTQ-style error feedback onto a lookup table (core algorithm, no transformers needed).

For one linear layer with weight ``W [N, K]`` and the second moment of its inputs
``H = 2/n * X^T X`` (``X [n, K]``), the columns of ``W`` are quantized left to right; each
column's rounding error is spread over the columns not yet quantized, in the direction that the
inverse Hessian says costs least output error (Frantar et al., "GPTQ", 2022). Here the grid is a
lookup table: a column is rounded to the nearest ``table[c] * scale (+ offset)`` of its group.

- A group's scale (and offset) is fixed when the sweep reaches the group's first column, from the
  group's weights as they are then (already updated by the error of the columns before it):
  ``absmax`` or the ``mse`` clipping search of :mod:`flute.quantize`.
- Damping adds ``damp * mean(diag H)`` to the diagonal; columns whose inputs were always zero are
  pinned to zero weight.
- Columns are processed in blocks (``block_size``, rounded to a multiple of the group size so that
  a group never straddles two blocks); the error of a block reaches the later columns in one
  matrix product.

Any table works (NF, int, fp4, ternary, learned) with any group size, including ``-1`` (one group
per row) and group sizes that do not divide ``K``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .codebooks import check_bits, get_table
from .format import QuantizedWeight, effective_group_size, pack_codes
from .quantize import (LEARNED_RANGE, _quantize_chunk, check_importance, check_scale_dtype,
                       check_stored_finite, check_weight, learn_table, weighted_clip_search)

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


class HessianAccumulator:
    """Running ``H = 2/n * sum_i x_i x_i^T`` over the rows ``x_i`` of every batch given to :meth:`add`.

    Kept in float32 on ``device`` (the layer's device by default); ``n`` counts the rows seen.
    """

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator: inputs have {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        x = x.to(self.sum.device, torch.float32)
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("HessianAccumulator: no calibration inputs were seen")
        return self.sum * (2.0 / self.n)

    def second_moments(self) -> torch.Tensor:
        """``E[x_k^2]`` per input column (the activation-aware table's importance)."""
        if self.n == 0:
            raise RuntimeError("HessianAccumulator: no calibration inputs were seen")
        return torch.diagonal(self.sum) / self.n


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*mean(diag)*I)^-1``, raising the damping if needed."""
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean().item()
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for attempt in range(8):
        lam = damp * (10 ** attempt) * (mean_diag if mean_diag > 0 else 1.0)
        L, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return U
    raise RuntimeError("gptq: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, table: torch.Tensor, group_size: int,
               scale_method: str = "absmax", offsets: bool = False,
               scale_dtype: Optional[torch.dtype] = None, table_range=None,
               damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
               scale_importance: Optional[torch.Tensor] = None):
    """Run the GPTQ sweep for one weight; return ``(codes uint8 [N, K], scales, offsets or None)``.

    ``weight`` ``[N, K]`` and ``hessian`` ``[K, K]`` may be on any device; the work happens on the
    weight's device in float32. ``table`` is the float32 table (``2**bits`` values);
    ``table_range`` is the interval a group's scale maps onto (the table's own [min, max] by
    default, :data:`flute.quantize.LEARNED_RANGE` for learned tables). Scales and offsets are
    returned in ``scale_dtype`` (the weight's dtype by default), and codes are chosen against
    the rounded values, so what is stored is what the error feedback saw.

    With ``scale_importance`` (per input column, e.g. ``diag(H)``; symmetric groups only) a group's
    scale is the absmax scale shrunk by the clipping ratio (1.0 down to 0.75) that minimizes the
    importance-weighted squared error of the group's current weights.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq: weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} "
                         "do not match (want [N, K] and [K, K])")
    scale_dtype = check_scale_dtype(scale_dtype or weight.dtype)
    dev = weight.device
    n, k = weight.shape
    group = effective_group_size(group_size, k)
    ng = math.ceil(k / group)
    table = table.to(dev, torch.float32)
    sorted_t, order = torch.sort(table)
    mids = (sorted_t[1:] + sorted_t[:-1]) * 0.5
    lo, hi = table_range or (sorted_t[0].item(), sorted_t[-1].item())
    imp = None
    if scale_importance is not None:
        imp = check_importance(scale_importance, k, "scale_importance").to(dev).clamp_min(0)
        if offsets:
            imp = None

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(dev, torch.float32).clone()
    dead = torch.diagonal(H) <= 0
    if dead.any():
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    U = _inverse_cholesky(H, damp)
    del H

    block = max(group, math.ceil(block_size / group) * group) if group < k else k
    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)
    scales = torch.empty(n, ng, dtype=torch.float32, device=dev)
    offs = torch.empty(n, ng, dtype=torch.float32, device=dev) if offsets else None

    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        E1 = torch.empty_like(W1)
        U1 = U[b0:b1, b0:b1]
        s = o = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # a new group starts: fix its scale from the current weights
                gi = col // group
                g1 = min(col + group, k) - b0
                if imp is not None:
                    s, _ = weighted_clip_search(W1[:, i:g1], imp[col:col + g1 - i], sorted_t,
                                                (lo, hi), scale_dtype)
                    o_g = None
                else:
                    _, s_g, o_g, _ = _quantize_chunk(W1[:, i:g1], table, g1 - i, scale_method,
                                                     offsets, scale_dtype, table_range)
                    s = s_g[:, 0]
                scales[:, gi] = s
                if offsets:
                    o = o_g[:, 0]
                    offs[:, gi] = o
            w = W1[:, i]
            u = w - o if o is not None else w
            idx = torch.bucketize(u / s, mids)
            c = order[idx]
            q = sorted_t[idx] * s
            if o is not None:
                q = q + o
            codes[:, col] = c.to(torch.uint8)
            err = (w - q) / U1[i, i]
            E1[:, i] = err
            if i + 1 < b1 - b0:
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
        if b1 < k:
            W[:, b1:].addmm_(E1, U[b0:b1, b1:], alpha=-1.0)

    # Every scale/offset was rounded to scale_dtype when its group started; a non-finite one makes
    # its row NaN from there on, so the first bad group of a row is where it overflowed.
    check_stored_finite(scales, offs, scale_dtype)
    return (codes, scales.to(scale_dtype), None if offs is None else offs.to(scale_dtype))


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                         group_size: int = 64, codebook="nf", scale_method: Optional[str] = None,
                         offsets: bool = False, learned_table: bool = False,
                         importance: Optional[torch.Tensor] = None,
                         scale_dtype: Optional[torch.dtype] = None, damp: float = DEFAULT_DAMP,
                         block_size: int = DEFAULT_BLOCK,
                         scale_importance: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """GPTQ-LUT: quantize ``weight`` ``[N, K]`` with error feedback under ``hessian`` ``[K, K]``.

    Arguments as in :func:`flute.quantize_weight`. With ``learned_table`` the table is first fitted
    to this weight by :func:`flute.learn_table`, weighted by ``importance`` (per input column;
    defaults to ``diag(hessian)``, i.e. the activation-aware table), then used for the sweep.
    ``scale_importance`` turns on the importance-weighted clipping search for group scales
    (see :func:`gptq_codes`).
    """
    check_bits(bits)
    check_weight(weight, "gptq: weight")
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq: hessian must be [K, K] = {(weight.shape[1], weight.shape[1])} for a "
                         f"weight of shape {tuple(weight.shape)}, got "
                         f"{tuple(getattr(hessian, 'shape', ()))}")
    if not torch.isfinite(weight).all():
        raise ValueError("gptq: weight holds NaN or Inf values; refusing to quantize")
    if scale_method is None:
        scale_method = "absmean" if codebook == "ternary" else "absmax"
    n, k = weight.shape
    name = codebook if isinstance(codebook, str) else "custom"
    if importance is not None:
        importance = check_importance(importance, k)
    if learned_table:
        imp = torch.diagonal(hessian).float() if importance is None else importance
        table = learn_table(weight, bits, group_size, init=codebook if name == "nf" else None,
                            importance=imp.clamp_min(0))
        name, table_range = "learned", LEARNED_RANGE
    else:
        table, table_range = get_table(codebook, bits), None
    codes, scales, offs = gptq_codes(weight, hessian, table, group_size, scale_method, offsets,
                                     scale_dtype or weight.dtype, table_range, damp, block_size,
                                     scale_importance)
    return QuantizedWeight(qcodes=pack_codes(codes, bits), scales=scales, table=table.cpu().float()
                           .to(weight.device), bits=bits, group_size=group_size, in_features=k,
                           out_features=n, offsets=offs, codebook=name)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer's output error ``tr((W - Q) H (W - Q)^T) / 2``, i.e. the mean of ``|X (W-Q)^T|^2``."""
    d = (weight.float() - approx.float())
    return float((d @ hessian.float() * d).sum() / 2)
