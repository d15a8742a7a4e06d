"""The canonical checkpoint format: one layout on disk for every GPU, tile config and batch size.

A quantized ``[out_features, in_features] = [N, K]`` weight is stored as plain tensors:

``qcodes``   uint8 ``[N, ceil(K * bits / 8)]``. Row ``n`` is the little-endian bit stream of the
             codes ``q[n, 0], q[n, 1], ...``, each ``bits`` wide: code ``k`` occupies stream bits
             ``k*bits .. k*bits+bits-1``. Dense (3-bit costs 3 bits), rows start on a byte so that
             row shards (tensor parallelism) are plain slices; the unused tail bits of a row are 0.
``scales``   ``[N, ceil(K / G)]`` in the model dtype (G = group size; -1 means G = K).
``offsets``  optional, same shape and dtype as ``scales``.
``table``    float32 ``[2**bits]``.
``qmeta``    int32 ``[5]`` = (format version, bits, group size, in_features, out_features).

The weight is ``W[n, k] = table[q[n, k]] * scales[n, k // G] (+ offsets[n, k // G])``. When G does
not divide K, the last group of a row is simply shorter (``K - (ceil(K/G) - 1) * G`` columns);
nothing is padded on disk.

The kernel layout (bit slices, fragment order) is derived from this at load time by
:mod:`flute.layout` and never saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .codebooks import check_bits

FORMAT_VERSION = 1
QMETA_FIELDS = ("format_version", "bits", "group_size", "in_features", "out_features")


def check_group_size(group_size: int) -> int:
    """Return ``group_size`` if it is a positive int or -1 (one group per row), else raise."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or \
            (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be a positive integer or -1 (one group per row), "
                         f"got {group_size!r}")
    return group_size


def effective_group_size(group_size: int, in_features: int) -> int:
    """The number of K columns per group: ``group_size``, or ``in_features`` for -1."""
    return in_features if check_group_size(group_size) == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    return math.ceil(in_features / effective_group_size(group_size, in_features))


def packed_row_bytes(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (values < 2**bits) into the canonical uint8 ``[N, ceil(K*bits/8)]``.

    Eight codes always fill exactly ``bits`` bytes, so each row is padded to a multiple of eight
    codes, eight codes are gathered into one int32 word, and its low ``bits`` bytes are kept.
    """
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    k8 = math.ceil(k / 8) * 8
    c = torch.zeros(n, k8, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32) * bits
    words = (c.view(n, k8 // 8, 8) << shifts).sum(dim=-1, dtype=torch.int32)  # [N, K8/8]
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int32) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(n, k8 // 8 * bits)
    return out[:, : packed_row_bytes(k, bits)].contiguous()


def unpack_codes(qcodes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[N, ceil(K*bits/8)]`` to uint8 codes ``[N, K]``."""
    check_bits(bits)
    if qcodes.dtype != torch.uint8 or qcodes.dim() != 2:
        raise ValueError(f"qcodes must be a 2-D uint8 tensor, got {qcodes.dtype} "
                         f"of shape {tuple(qcodes.shape)}")
    n, nbytes = qcodes.shape
    if nbytes != packed_row_bytes(in_features, bits):
        raise ValueError(f"qcodes has {nbytes} bytes per row; {in_features} codes of {bits} bits "
                         f"need {packed_row_bytes(in_features, bits)}")
    k8 = math.ceil(in_features / 8) * 8
    b = torch.zeros(n, k8 // 8 * bits, dtype=torch.int32, device=qcodes.device)
    b[:, :nbytes] = qcodes.to(torch.int32)
    byte_shifts = torch.arange(bits, device=qcodes.device, dtype=torch.int32) * 8
    words = (b.view(n, k8 // 8, bits) << byte_shifts).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(8, device=qcodes.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.view(n, k8)[:, :in_features].to(torch.uint8)


@dataclass
class QuantizedWeight:
    """A quantized weight in the canonical format (see the module docstring).

    ``qcodes`` is packed; :meth:`codes` unpacks it. All tensors live on one device.
    """

    qcodes: torch.Tensor
    scales: torch.Tensor
    table: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    offsets: Optional[torch.Tensor] = None
    codebook: str = "custom"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first inconsistency between the tensors and the metadata."""
        check_bits(self.bits)
        check_group_size(self.group_size)
        n, k = self.out_features, self.in_features
        if n < 1 or k < 1:
            raise ValueError(f"in_features and out_features must be positive, got {k} and {n}")
        want = (n, packed_row_bytes(k, self.bits))
        if self.qcodes.dtype != torch.uint8 or tuple(self.qcodes.shape) != want:
            raise ValueError(f"qcodes must be uint8 of shape {want}, got {self.qcodes.dtype} "
                             f"{tuple(self.qcodes.shape)}")
        g = (n, num_groups(self.group_size, k))
        if not self.scales.is_floating_point() or tuple(self.scales.shape) != g:
            raise ValueError(f"scales must be floating point of shape {g}, got "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")
        if self.offsets is not None and (self.offsets.shape != self.scales.shape
                                         or self.offsets.dtype != self.scales.dtype):
            raise ValueError(f"offsets must match scales ({self.scales.dtype} {g}), got "
                             f"{self.offsets.dtype} {tuple(self.offsets.shape)}")
        if self.table.numel() != 2 ** self.bits or not self.table.is_floating_point():
            raise ValueError(f"a {self.bits}-bit table needs {2 ** self.bits} floating values, got "
                             f"{self.table.dtype} with {self.table.numel()}")

    @property
    def shape(self):
        return (self.out_features, self.in_features)

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes ``[N, K]``."""
        return unpack_codes(self.qcodes, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reconstructed weight ``[N, K]`` (computed in float32, returned as ``dtype``)."""
        return dequantize_codes(self.codes(), self.scales, self.offsets, self.table,
                                self.group_size).to(dtype)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, scales, offsets, table)."""
        ts = [self.qcodes, self.scales, self.table] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def qmeta(self) -> torch.Tensor:
        return torch.tensor([FORMAT_VERSION, self.bits, self.group_size, self.in_features,
                             self.out_features], dtype=torch.int32)

    def state_dict(self, prefix: str = "") -> dict:
        sd = {prefix + "qcodes": self.qcodes, prefix + "scales": self.scales,
              prefix + "table": self.table, prefix + "qmeta": self.qmeta()}
        if self.offsets is not None:
            sd[prefix + "offsets"] = self.offsets
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", codebook: str = "custom") -> "QuantizedWeight":
        """Build from canonical tensors, checked by :func:`check_weight_tensors` first: errors name
        a missing tensor, a foreign version, a wrong dtype or shape, or NaN/Inf values."""
        names = ("qcodes", "scales", "table", "qmeta", "offsets")
        tensors = {k: sd[prefix + k] for k in names if prefix + k in sd}
        meta = check_weight_tensors(tensors, prefix)
        return cls(qcodes=tensors["qcodes"], scales=tensors["scales"],
                   table=tensors["table"].float(), offsets=tensors.get("offsets"),
                   codebook=codebook, **{k: meta[k] for k in QMETA_FIELDS[1:]})

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.qcodes.to(device), self.scales.to(device), self.table.to(device),
                               self.bits, self.group_size, self.in_features, self.out_features,
                               None if self.offsets is None else self.offsets.to(device),
                               self.codebook)


def parse_qmeta(qmeta: torch.Tensor, where: str = "", expect: Optional[dict] = None) -> dict:
    """Decode a ``qmeta`` tensor into ``{format_version, bits, group_size, in_features,
    out_features}``. A checkpoint of another format version, a qmeta that is not 5 integers, or
    (when ``expect`` holds some of those fields) a weight other than the one expected raises a
    ValueError that starts with ``where`` (the module prefix)."""
    if not isinstance(qmeta, torch.Tensor) or qmeta.is_floating_point() or qmeta.is_complex() \
            or qmeta.dtype == torch.bool:
        raise ValueError(f"{where}qmeta must be an integer tensor, got "
                         f"{getattr(qmeta, 'dtype', type(qmeta).__name__)}")
    values = [int(v) for v in qmeta.flatten().tolist()]
    if len(values) != len(QMETA_FIELDS):
        raise ValueError(f"{where}qmeta must hold {len(QMETA_FIELDS)} integers {QMETA_FIELDS}, "
                         f"got {values}")
    meta = dict(zip(QMETA_FIELDS, values))
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{where}qmeta says flute format version {meta['format_version']}; this "
                         f"flute reads version {FORMAT_VERSION}")
    wrong = sorted(k for k, v in (expect or {}).items() if meta[k] != v)
    if wrong:
        want = dict(meta, **(expect or {}))
        head = f"{where.rstrip('.')}: " if where else ""
        raise ValueError(
            f"{head}the checkpoint holds a {meta['out_features']}x{meta['in_features']} weight "
            f"({meta['bits']}-bit, group size {meta['group_size']}), but this QuantLinear is "
            f"{want['out_features']}x{want['in_features']} {want['bits']}-bit with group size "
            f"{want['group_size']} (mismatch in {', '.join(wrong)})")
    return meta


#: Dtypes that scales, offsets, tables and biases may have in a checkpoint.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The tensors of one quantized weight: required ones, then the optional ones.
REQUIRED_TENSORS = ("qcodes", "scales", "table", "qmeta")
OPTIONAL_TENSORS = ("offsets", "bias")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _first_non_finite(t: torch.Tensor):
    """``None`` if ``t`` is all finite (or holds no values: meta), else (index tuple, value)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.numel() == 0:
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    idx = tuple(bad.nonzero()[0].tolist())
    return idx, t[idx].item()


def check_tensor(name: str, t, where: str = "", cast: Optional[torch.dtype] = None) -> None:
    """Check the dtype (and, for float tensors, that every value is finite once converted to
    ``cast``, the dtype it will be stored in) of one canonical tensor ``name`` (``qcodes``,
    ``scales``, ``offsets``, ``table``, ``qmeta`` or ``bias``). ``t`` may be a tensor or anything
    with ``dtype`` and ``shape`` (a checkpoint header: then values are not checked). Errors are
    ValueErrors that start with ``where + name`` (the tensor's full key)."""
    key = f"{where}{name}"
    dtype = getattr(t, "dtype", None)
    if name == "qcodes":
        if dtype != torch.uint8:
            raise ValueError(f"{key} must be uint8, got {_dtype_name(dtype)}")
        return
    if name == "qmeta":
        if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex \
                or dtype == torch.bool:
            raise ValueError(f"{key} must be an integer tensor, got {_dtype_name(dtype)}")
        return
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{key} must be a float tensor ({', '.join(map(_dtype_name, FLOAT_DTYPES))}), "
                         f"got {_dtype_name(dtype)}")
    if isinstance(t, torch.Tensor):
        stored = t if cast is None or cast == t.dtype else t.to(cast)
        bad = _first_non_finite(stored)
        if bad is not None:
            idx, value = bad
            at = (f"row {idx[0]}, group {idx[1]}" if len(idx) == 2 and name in ("scales", "offsets")
                  else f"index {list(idx) if len(idx) != 1 else idx[0]}")
            what = "" if cast is None or cast == t.dtype else f" once converted to {_dtype_name(cast)}"
            raise ValueError(f"{key} holds a non-finite value{what} ({value} at {at})")


def check_weight_tensors(tensors, where: str = "", *, expect: Optional[dict] = None,
                         cast: Optional[dict] = None) -> dict:
    """Check the canonical tensors of one quantized weight before any of them is used; return its
    parsed ``qmeta``. The one check of every load path (``QuantLinear.load_state_dict``,
    :meth:`QuantizedWeight.from_state_dict`, the Hugging Face and vLLM loaders).

    ``tensors`` maps ``qcodes``, ``scales``, ``table``, ``qmeta`` (required) and ``offsets``,
    ``bias`` (optional) to tensors (``qmeta`` must be a real tensor; the others may be checkpoint
    headers with ``dtype`` and ``shape`` only). Checked: presence (KeyError), qmeta (format
    version, and the fields in ``expect``), each tensor's dtype and shape against the qmeta, and
    that scales, offsets, table and bias are finite once converted to ``cast[name]`` (the dtype
    they will be stored in; default their own). Every error names the tensor as ``where + name``.
    """
    missing = [f"{where}{k}" for k in REQUIRED_TENSORS if tensors.get(k) is None]
    if missing:
        raise KeyError(f"flute checkpoint is missing tensor(s) {missing}")
    meta = parse_qmeta(tensors["qmeta"], where, expect=expect)
    bits, group, k, n = (meta[f] for f in QMETA_FIELDS[1:])
    check_bits(bits)
    try:
        check_group_size(group)
    except ValueError as e:
        raise ValueError(f"{where}qmeta: {e}") from None
    if n < 1 or k < 1:
        raise ValueError(f"{where}qmeta: in_features and out_features must be positive, got {k} "
                         f"and {n}")
    want = {"qcodes": (n, packed_row_bytes(k, bits)), "scales": (n, num_groups(group, k)),
            "offsets": (n, num_groups(group, k)), "table": (2 ** bits,), "qmeta": (5,),
            "bias": (n,)}
    cast = cast or {}
    for name in REQUIRED_TENSORS + OPTIONAL_TENSORS:
        t = tensors.get(name)
        if t is None:
            continue
        shape = tuple(getattr(t, "shape", ()))
        if name == "table" and math.prod(shape) != 2 ** bits:
            raise ValueError(f"{where}table has {math.prod(shape)} entries; a {bits}-bit table "
                             f"needs {2 ** bits}")
        if shape != want[name]:
            raise ValueError(f"{where}{name} has shape {shape} in the checkpoint; a {n}x{k} "
                             f"{bits}-bit weight with group size {group} needs {want[name]}")
        check_tensor(name, t, where, cast.get(name))
    if tensors.get("offsets") is not None and tensors["offsets"].dtype != tensors["scales"].dtype:
        raise ValueError(f"{where}offsets must have the dtype of {where}scales "
                         f"({_dtype_name(tensors['scales'].dtype)}), got "
                         f"{_dtype_name(tensors['offsets'].dtype)}")
    return meta


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``k // G`` for every column k (int64 ``[K]``)."""
    g = effective_group_size(group_size, in_features)
    return torch.arange(in_features, device=device) // g


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
                     table: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``table[codes] * scales[:, k // G] (+ offsets)`` computed in ``dtype`` (float32 by default)."""
    n, k = codes.shape
    g = effective_group_size(group_size, k)
    ng = scales.shape[1]
    w = table.to(device=codes.device, dtype=dtype)[codes.long()]
    if k == ng * g:  # whole groups: broadcast each scale over its group, no per-column gather
        w = w.view(n, ng, g) * scales.to(dtype).unsqueeze(-1)
        if offsets is not None:
            w = w + offsets.to(dtype).unsqueeze(-1)
        return w.view(n, k)
    gi = group_index(k, group_size, codes.device)
    w = w * scales.to(dtype)[:, gi]
    if offsets is not None:
        w = w + offsets.to(dtype)[:, gi]
    return w
