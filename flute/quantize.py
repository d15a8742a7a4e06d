"""Group-wise quantizers onto a lookup table: round-to-nearest, MSE-searched scales, learned tables.

Everything is computed in float32 on the weight's own device, a chunk of rows at a time, so that
a 28672 x 8192 matrix quantizes with bounded extra memory. Codes are chosen against the scale as
it will be *stored* (rounded to the scale dtype), so what is saved is what was optimized.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from .codebooks import check_bits, get_table, nf_table
from .format import QuantizedWeight, effective_group_size, pack_codes, packed_row_bytes

SCALE_METHODS = ("absmax", "mse", "absmean")

# Candidate clipping ratios for the MSE scale search: the scale from absmax times r. 1.0 is
# always a candidate, so the search can only lower the error against absmax.
MSE_RATIOS = tuple(1.0 - 0.025 * i for i in range(20))  # 1.0 .. 0.525

# Clipping ratios for the importance-weighted scale search (activation-aware tables, GPTQ-LUT):
# 1.0 down to 0.75 of the absmax scale.
CLIP_RATIOS = MSE_RATIOS[:11]

LLOYD_ITERATIONS = 10  # k-means steps; the table barely moves after this on LLM weights

# A learned table lives in the domain of weights normalized by their group's absmax, [-1, 1]: its
# scales map [min, max] of a group onto this range, not onto the (narrower) span of the table,
# whose outer entries Lloyd pulls inward (that is the clipping it learned).
LEARNED_RANGE = (-1.0, 1.0)


class ScaleOverflowError(ValueError):
    """A scale, offset or table value is not finite once rounded to its stored dtype (the weights
    are too large for it): quantize with a wider ``scale_dtype`` such as float32."""


#: Dtypes a weight may be quantized from, and dtypes scales/offsets may be stored in.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_stored_finite(scales: torch.Tensor, offsets: Optional[torch.Tensor],
                        scale_dtype: torch.dtype, row0: int = 0) -> None:
    """Raise :class:`ScaleOverflowError` at the first (row, group) whose scale or offset is not
    finite. ``scales``/``offsets`` ``[rows, groups]`` hold the values *as stored* (already rounded to
    ``scale_dtype``, in any float dtype); ``row0`` is the index of their first row in the weight.

    This is the one finiteness check of every quantizer (round to nearest, GPTQ-LUT, the
    activation-aware path); the layer name is added where models are walked
    (:func:`name_errors`)."""
    for what, t in (("scale", scales), ("offset", offsets)):
        if t is None:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            r, g = bad.nonzero()[0].tolist()
            name = _dtype_name(scale_dtype)
            hint = ("quantize with a wider scale dtype such as float32"
                    if scale_dtype in (torch.float16, torch.bfloat16) else
                    "the weight values are too large to quantize")
            raise ScaleOverflowError(
                f"row {row0 + r}, group {g}: the {what} is {t[r, g].item()} once stored as {name} "
                f"(the weights of that group are too large for {name}); {hint}")


def check_table_finite(table: torch.Tensor) -> None:
    """Raise :class:`ScaleOverflowError` if a (learned) table holds a non-finite value."""
    bad = ~torch.isfinite(table)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ScaleOverflowError(f"table entry {i} is {table[i].item()}: the weights are too large "
                                 f"to fit a table to")


@contextlib.contextmanager
def name_errors(name: str):
    """Prefix ``name`` (a module name) to a ValueError or :class:`ScaleOverflowError` raised inside,
    keeping its type: ``model.layers.3.mlp.up_proj: row 7, group 2: the scale is inf ...``."""
    try:
        yield
    except ValueError as e:
        if type(e) not in (ValueError, ScaleOverflowError) or not name:
            raise
        raise type(e)(f"{name}: {e}") from e


def check_weight(weight, where: str = "weight") -> None:
    """Refuse what cannot be quantized: not a 2-D float tensor, meta tensors (not loaded yet),
    fp8 or other exotic dtypes, NaN/Inf values."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{where} must be a 2-D floating-point tensor [out_features, in_features], "
                         f"got {type(weight).__name__} {getattr(weight, 'dtype', '')} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.is_meta:
        raise ValueError(f"{where} is on the meta device (not loaded yet); load or materialize it "
                         "before quantizing")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{where} has dtype {_dtype_name(weight.dtype)}; flute quantizes float16, "
                         "bfloat16, float32 or float64 weights (dequantize fp8 weights with their "
                         "own scales first)")


def check_scale_dtype(scale_dtype: torch.dtype) -> torch.dtype:
    if scale_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"scale_dtype must be one of float16, bfloat16, float32, float64, got "
                         f"{scale_dtype}")
    return scale_dtype


def check_importance(importance, in_features: int, name: str = "importance") -> torch.Tensor:
    """``importance`` as a float32 vector of ``in_features`` values, or a ValueError naming it."""
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of {in_features} values (one per input "
                         f"column), got {type(importance).__name__} "
                         f"{getattr(importance, 'dtype', '')}")
    if importance.numel() != in_features:
        raise ValueError(f"{name} must hold one value per input column ({in_features}), got "
                         f"shape {tuple(importance.shape)}")
    if importance.is_meta:
        raise ValueError(f"{name} is on the meta device")
    imp = importance.detach().flatten().float()
    if not bool(torch.isfinite(imp).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    return imp


def _chunk_rows(n: int, k: int, budget_elements: int = 1 << 21) -> int:
    """Rows per chunk so that one float32 temporary of the chunk stays near 8 MB."""
    return max(1, min(n, budget_elements // max(k, 1)))


def nearest_codes(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for every element of ``u``.

    Ties go to the lower value; a value that appears more than once in the table (the spare zero
    of the ternary table) is always encoded by its first index.
    """
    t = table.to(u.device, torch.float32)
    values, inverse = torch.unique(t, sorted=True, return_inverse=True)
    first = torch.full((values.numel(),), t.numel(), dtype=torch.long, device=u.device)
    first = first.scatter_reduce(0, inverse, torch.arange(t.numel(), device=u.device), "amin")
    mids = (values[1:] + values[:-1]) * 0.5
    return first[torch.bucketize(u, mids)]


class _Groups:
    """A chunk of rows viewed as ``[rows, groups, G]`` with a mask for the short last group."""

    def __init__(self, w: torch.Tensor, group: int):
        n, k = w.shape
        self.k, self.group = k, group
        self.ng = math.ceil(k / group)
        pad = self.ng * group - k
        self.w = torch.nn.functional.pad(w.float(), (0, pad)).view(n, self.ng, group)
        self.valid = None
        if pad:
            self.valid = (torch.arange(self.ng * group, device=w.device) < k).view(self.ng, group)

    def masked(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        return x if self.valid is None else x.masked_fill(~self.valid, fill)

    def count(self) -> torch.Tensor:
        if self.valid is None:
            return torch.full((self.ng,), float(self.group), device=self.w.device)
        return self.valid.sum(-1).float()

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, groups, G]`` back to ``[rows, K]``."""
        return x.reshape(x.shape[0], -1)[:, : self.k]


def _initial_scales(g: _Groups, table: torch.Tensor, method: str, with_offsets: bool,
                    table_range=None):
    """Scale (and offset) per group that maps the group's range onto the table's range
    (or onto ``table_range`` = (low, high) when given)."""
    tmin, tmax = table_range or (table.min().item(), table.max().item())
    if method == "absmean":
        s = g.masked(g.w.abs(), 0.0).sum(-1) / g.count()
        s = s / tmax  # a weight of one mean magnitude lands on the largest positive entry
        return s, None
    wmax = g.masked(g.w, -math.inf).amax(-1)
    wmin = g.masked(g.w, math.inf).amin(-1)
    if with_offsets:
        s = (wmax - wmin) / (tmax - tmin)
        return s, wmin - tmin * s
    # The smallest scale that covers both signs; equals absmax / max|t| for symmetric tables.
    return torch.maximum(wmax / tmax, wmin / tmin), None


def _encode(g: _Groups, table: torch.Tensor, s: torch.Tensor, o: Optional[torch.Tensor],
            scale_dtype: torch.dtype):
    """Round scales/offsets to their stored dtype, then pick codes; returns (codes, s, o, err)."""
    s = s.to(scale_dtype).float()
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-equal group: any scale reproduces it
    if o is not None:
        o = o.to(scale_dtype).float()
        u = (g.w - o.unsqueeze(-1)) / s.unsqueeze(-1)
    else:
        u = g.w / s.unsqueeze(-1)
    codes = nearest_codes(u, table)
    deq = table.to(g.w.device)[codes] * s.unsqueeze(-1)
    if o is not None:
        deq = deq + o.unsqueeze(-1)
    err = g.masked((deq - g.w).square(), 0.0).sum(-1)
    return codes, s, o, err


def _quantize_chunk(w: torch.Tensor, table: torch.Tensor, group: int, method: str,
                    with_offsets: bool, scale_dtype: torch.dtype, table_range=None):
    g = _Groups(w, group)
    s0, o0 = _initial_scales(g, table, method, with_offsets, table_range)
    codes, s, o, err = _encode(g, table, s0, o0, scale_dtype)
    if method == "mse":
        low, high = table_range or (table.min().item(), table.max().item())
        mid = (low + high) * 0.5
        for r in MSE_RATIOS[1:]:
            if with_offsets:
                # shrink the range about its centre, which stays where it was
                s_r = s0 * r
                o_r = o0 + (s0 - s_r) * mid
            else:
                s_r, o_r = s0 * r, None
            c_r, s_r, o_r, e_r = _encode(g, table, s_r, o_r, scale_dtype)
            better = e_r < err
            codes = torch.where(better.unsqueeze(-1), c_r, codes)
            s = torch.where(better, s_r, s)
            if with_offsets:
                o = torch.where(better, o_r, o)
            err = torch.minimum(e_r, err)
    return g.flat(codes), s, o, err.sum()


def weighted_clip_search(w: torch.Tensor, importance: torch.Tensor, sorted_table: torch.Tensor,
                         table_range, scale_dtype: torch.dtype):
    """Per-group scale minimizing the importance-weighted squared error of round to nearest.

    ``w`` is ``[..., G]`` (one group per row of the last dimension), ``importance`` broadcasts
    against it (per input column). Candidates are the covering scale ``max(wmax / hi, wmin / lo)``
    times each of :data:`CLIP_RATIOS`, each rounded to ``scale_dtype``; the first candidate with
    the least ``sum importance * (q - w)^2`` wins. Returns ``(scales [...] float32, idx [..., G])``
    where ``idx`` indexes ``sorted_table`` (the chosen codes in sorted order).
    """
    lo, hi = table_range
    mids = (sorted_table[1:] + sorted_table[:-1]) * 0.5
    s0 = torch.maximum(w.amax(-1) / hi, w.amin(-1) / lo)
    best_err = best_s = best_idx = None
    for r in CLIP_RATIOS:
        s = (s0 * r).to(scale_dtype).float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        idx = torch.bucketize(w / s.unsqueeze(-1), mids)
        err = ((sorted_table[idx] * s.unsqueeze(-1) - w).square() * importance).sum(-1)
        if best_err is None:
            best_err, best_s, best_idx = err, s, idx
        else:
            better = err < best_err
            best_idx = torch.where(better.unsqueeze(-1), idx, best_idx)
            best_s = torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    return best_s, best_idx


def learn_table(weight: torch.Tensor, bits: int, group_size: int, init=None,
                iterations: int = LLOYD_ITERATIONS,
                importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fit one table of 2**bits values to a weight matrix by weighted Lloyd (k-means), deterministically.

    The weights are normalized by their group's absmax (onto :data:`LEARNED_RANGE`) and k-means
    runs in that domain, each element weighted by ``absmax**2`` (its error counts in the weight
    domain) times ``importance[k]`` if given (per input column, e.g. activation second moments).
    Starts from NormalFloat (or ``init``); an entry that loses all its members stays put.
    """
    check_bits(bits)
    check_weight(weight)
    table = (nf_table(bits) if init is None else get_table(init, bits)).to(weight.device)
    n, k = weight.shape
    group = effective_group_size(group_size, k)
    rows = _chunk_rows(n, k)
    imp = None if importance is None else check_importance(importance, k).to(weight.device)
    scale_chunks = []
    for r0 in range(0, n, rows):
        g = _Groups(weight[r0:r0 + rows], group)
        s, _ = _initial_scales(g, table, "absmax", False, LEARNED_RANGE)
        scale_chunks.append(torch.where(s == 0, torch.ones_like(s), s))
    for _ in range(iterations):
        num = torch.zeros(2 ** bits, dtype=torch.float64, device=weight.device)
        den = torch.zeros(2 ** bits, dtype=torch.float64, device=weight.device)
        for i, r0 in enumerate(range(0, n, rows)):
            g = _Groups(weight[r0:r0 + rows], group)
            s = scale_chunks[i].unsqueeze(-1)
            u = g.w / s
            # the weights absmax**2 (* importance) in float64: absmax**2 overflows float32 from
            # |w| ~ 2e19 up, and Lloyd's centroids only depend on their ratios
            s64 = s.double()
            lam = g.masked((s64 * s64).expand(u.shape), 0.0)
            if imp is not None:
                lam = lam * torch.nn.functional.pad(imp, (0, g.ng * group - k)).view(
                    g.ng, group).double()
            codes = nearest_codes(u, table).flatten()
            num.index_add_(0, codes, (lam * u.double()).flatten())
            den.index_add_(0, codes, lam.flatten())
        table = torch.where(den > 0, num / den.clamp_min(1e-300), table.double()).float()
    check_table_finite(table)
    return torch.sort(table)[0].cpu()


def quantize_weight(weight: torch.Tensor, bits: int = 4, group_size: int = 64, codebook="nf",
                    scale_method: Optional[str] = None, offsets: bool = False,
                    learned_table: bool = False, scale_dtype: Optional[torch.dtype] = None,
                    importance: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize a ``[out_features, in_features]`` weight group-wise onto a table.

    Args:
        weight: the float weight (any float dtype, CPU or GPU; the work happens on its device).
        bits: 2, 3 or 4.
        group_size: 32, 64, 128, 256 (any positive int works) or -1 for one group per row. When it
            does not divide ``in_features`` the last group of each row is shorter.
        codebook: ``"nf"``, ``"int"``, ``"fp4"``, ``"ternary"`` or a tensor of 2**bits values.
        scale_method: ``"absmax"`` (default; ``"absmean"`` for ternary), ``"mse"`` (search over
            clipping ratios for the scale with least squared error per group) or ``"absmean"``.
        offsets: store one offset per group too and map each group's [min, max] onto the table's
            range (asymmetric; exact for GPTQ/AWQ zero points and GGUF Q4_1 on the ``int`` table).
        learned_table: fit the table to this matrix with :func:`learn_table`, starting from
            ``codebook`` if it is NormalFloat-like, then quantize with it.
        scale_dtype: dtype of the stored scales/offsets; defaults to the weight's dtype.
        importance: optional per-input-column weights for the learned table (activation-aware).

    Returns:
        A :class:`QuantizedWeight` in the canonical format, on the weight's device.
    """
    check_bits(bits)
    check_weight(weight)
    if scale_method is None:
        scale_method = "absmean" if codebook == "ternary" else "absmax"
    if scale_method not in SCALE_METHODS:
        raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {scale_method!r}")
    if offsets and scale_method == "absmean":
        raise ValueError("scale_method='absmean' does not combine with offsets")
    n, k = weight.shape
    group = effective_group_size(group_size, k)
    if importance is not None:
        check_importance(importance, k)
    name = codebook if isinstance(codebook, str) else "custom"
    if learned_table:
        table = learn_table(weight, bits, group_size, init=codebook if name == "nf" else None,
                            importance=importance)
        name = "learned"
    else:
        table = get_table(codebook, bits)
    scale_dtype = check_scale_dtype(scale_dtype or weight.dtype)
    dev_table = table.to(weight.device)
    table_range = LEARNED_RANGE if learned_table else None
    ng = math.ceil(k / group)
    qcodes = torch.empty(n, packed_row_bytes(k, bits), dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, ng, dtype=scale_dtype, device=weight.device)
    offs = torch.empty_like(scales) if offsets else None
    rows = _chunk_rows(n, k)
    for r0 in range(0, n, rows):
        chunk = weight[r0:r0 + rows]
        if not torch.isfinite(chunk).all():
            raise ValueError(f"weight holds NaN or Inf values (in rows {r0}..{r0 + len(chunk) - 1}); "
                             "refusing to quantize")
        codes, s, o, _ = _quantize_chunk(chunk, dev_table, group, scale_method, offsets,
                                         scale_dtype, table_range)
        check_stored_finite(s, o, scale_dtype, r0)
        qcodes[r0:r0 + rows] = pack_codes(codes, bits)
        scales[r0:r0 + rows] = s.to(scale_dtype)
        if offsets:
            offs[r0:r0 + rows] = o.to(scale_dtype)
    return QuantizedWeight(qcodes=qcodes, scales=scales, table=table, bits=bits,
                           group_size=group_size, in_features=k, out_features=n, offsets=offs,
                           codebook=name)
