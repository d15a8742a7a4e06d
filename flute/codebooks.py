"""Codebooks: the table of 2**bits values that a code indexes.

One table per weight matrix. A weight is reconstructed as ``table[code] * scale (+ offset)``, so a
table only fixes the *shape* of the grid; its absolute size is carried by the per-group scales.
Every table here is returned as a float32 tensor of exactly ``2**bits`` entries.

Names accepted by :func:`get_table`:

``nf``       NormalFloat (QLoRA): quantiles of N(0, 1), normalized to [-1, 1], with an exact zero.
             NF4 is bit-for-bit the bitsandbytes table.
``int``      uniform integers ``-2**(b-1) .. 2**(b-1)-1`` (the two's-complement grid of GPTQ/AWQ
             "symmetric" int formats, zero exact). With per-group offsets it is exact for
             asymmetric min/max formats (GPTQ/AWQ zero points, GGUF Q4_0/Q4_1).
``fp4``      the FP4 e2m1 values (4 bits only), ``±{0, .5, 1, 1.5, 2, 3, 4, 6}``.
``ternary``  ``{-1, 0, +1}`` as 2-bit codes (BitNet b1.58); the fourth entry repeats 0 and is
             never chosen. Pair it with ``scale_method="absmean"``.

Any user tensor of 2**bits finite values is accepted too (see :func:`as_table`).
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)
CODEBOOKS = ("nf", "int", "fp4", "ternary")

# The bitsandbytes NF4 table (QLoRA, Dettmers et al. 2023), as float32. Pinned so that a change in
# the construction below is caught by a test rather than silently changing the format.
NF4_BITSANDBYTES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported code width, else raise a ValueError naming it."""
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def nf_table(bits: int) -> torch.Tensor:
    """NormalFloat table with 2**bits entries (NF4 is the exact bitsandbytes table)."""
    check_bits(bits)
    if bits == 4:
        # Our ndtri differs from scipy's ppf in the last float32 ulp for a few entries; return
        # the bitsandbytes values themselves (the construction agrees to 2e-7, a test checks it).
        return torch.tensor(NF4_BITSANDBYTES, dtype=torch.float32)
    return nf_construction(bits)


def nf_construction(bits: int) -> torch.Tensor:
    """The NormalFloat construction with 2**bits entries.

    Built as in QLoRA: 2**(b-1) positive and 2**(b-1)-1 negative quantiles of a standard normal,
    taken at evenly spaced probabilities between ``0.5`` and ``offset``, plus an exact zero, then
    normalized by the largest magnitude. ``offset`` is the midpoint between the two outermost
    probabilities ``1 - 1/(2*15)`` and ``1 - 1/(2*16)`` used for NF4, which bitsandbytes also
    uses for other widths.
    """
    check_bits(bits)
    offset = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))
    half = 2 ** (bits - 1)
    # float64 quantiles, rounded to float32 once at the end, as bitsandbytes does with scipy.
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    values, _ = torch.sort(values / values.abs().max())
    return values.to(torch.float32)


def int_table(bits: int) -> torch.Tensor:
    """Uniform integer grid ``-2**(b-1) .. 2**(b-1)-1`` (zero exact)."""
    check_bits(bits)
    return torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32)


def fp4_table(bits: int = 4) -> torch.Tensor:
    """FP4 e2m1 values in code order (sign bit high): 0, .5, 1, 1.5, 2, 3, 4, 6, then negated."""
    if bits != 4:
        raise ValueError(f"the fp4 codebook needs bits=4, got bits={bits}")
    pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([pos, -pos])


def ternary_table(bits: int = 2) -> torch.Tensor:
    """Ternary {-1, 0, +1} as 2-bit codes; code 3 repeats 0 so that every code decodes."""
    if bits != 2:
        raise ValueError(f"the ternary codebook needs bits=2, got bits={bits}")
    return torch.tensor([-1.0, 0.0, 1.0, 0.0])


def as_table(values, bits: int) -> torch.Tensor:
    """Validate a user-supplied table and return it as a float32 CPU tensor of 2**bits values."""
    check_bits(bits)
    table = torch.as_tensor(values, dtype=torch.float32).detach().flatten().cpu()
    if table.numel() != 2 ** bits:
        raise ValueError(f"a {bits}-bit table needs {2 ** bits} values, got {table.numel()}")
    if not torch.isfinite(table).all():
        raise ValueError("the table holds non-finite values")
    if table.max() <= 0 or table.min() >= 0:
        raise ValueError("the table must hold both positive and negative values "
                         f"(got min {table.min().item():g}, max {table.max().item():g})")
    return table


def get_table(codebook, bits: int) -> torch.Tensor:
    """Return the float32 table for ``codebook`` (a name from :data:`CODEBOOKS` or values)."""
    if isinstance(codebook, str):
        builders = {"nf": nf_table, "int": int_table, "fp4": fp4_table, "ternary": ternary_table}
        if codebook not in builders:
            raise ValueError(f"unknown codebook {codebook!r}; choose one of {CODEBOOKS} "
                             "or pass a tensor of 2**bits values")
        return builders[codebook](bits)
    return as_table(codebook, bits)


def pair_table(table: torch.Tensor) -> torch.Tensor:
    """All ordered pairs of table values: ``out[i * 2**b + j] = (table[i], table[j])``.

    Shape ``[4**b, 2]``. The kernel keeps this in shared memory as one half2/bfloat162 per pair,
    so one lookup with a 2b-bit index yields two dequantized weights. Derived at load time, never
    stored in a checkpoint.
    """
    n = table.numel()
    return torch.stack([table.repeat_interleave(n), table.repeat(n)], dim=1)
