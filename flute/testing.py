"""Random quantized weights and the float64 reference, shared by the tests and the benchmarks.

Correctness checks compare an implementation of ``torch.ops.flute.qgemm`` (CPU kernel, CUDA kernel,
emulator) against :func:`reference_qgemm` on weights from :func:`random_quantized`: fresh random
codes, scales and table (never zeros), so that a wrong index or a missed element shows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .format import dequantize_codes, num_groups


class RandomWeight(NamedTuple):
    """A quantized weight in the canonical (unpacked) form: ``W = table[codes] * scales (+ offsets)``."""
    codes: torch.Tensor              # uint8 [N, K]
    scales: torch.Tensor             # [N, groups]
    offsets: Optional[torch.Tensor]  # [N, groups] or None
    table: torch.Tensor              # float32 [2**bits]

    @property
    def bits(self) -> int:
        """Bits per code, from the table's size."""
        return self.table.numel().bit_length() - 1


def random_quantized(n: int, k: int, bits: int, group_size: int, *, offsets: bool = False,
                     dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                     seed: int = 0) -> RandomWeight:
    """Random codes, positive scales around ``1/sqrt(K)`` (so outputs stay O(1) in fp16), small
    offsets and a random table, on the CPU. ``generator`` wins over ``seed`` when given."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    ng = num_groups(group_size, k)
    scales = ((torch.rand(n, ng, generator=g) + 0.5) / k ** 0.5).to(dtype)
    offs = (((torch.rand(n, ng, generator=g) - 0.5) * 0.1 / k ** 0.5).to(dtype) if offsets else None)
    table = torch.randn(2 ** bits, generator=g)
    return RandomWeight(codes, scales, offs, table)


def reference_qgemm(x: torch.Tensor, w: RandomWeight, group_size: int) -> torch.Tensor:
    """``x @ W.T`` in float64 on ``x``'s device (the weight is moved there)."""
    dev = x.device
    wt = dequantize_codes(w.codes.to(dev), w.scales.to(dev),
                          None if w.offsets is None else w.offsets.to(dev), w.table.to(dev),
                          group_size, torch.float64)
    return x.double() @ wt.t()


def table7_scale(table: torch.Tensor) -> torch.Tensor:
    """The int8 mode's table scale: ``max|t| / d`` for the ``d`` in [8, 63] (steps of 1/16) with the
    least squared rounding error of ``t`` to 7-bit integers, the largest ``d`` on ties (as the
    kernel: float32 scale and division, float64 error)."""
    t = table.float()
    tmax = float(t.abs().max())
    best, scale = None, torch.tensor(0.0)
    if tmax == 0:
        return scale
    for i in range((63 - 8) * 16 + 1):
        sc = torch.tensor(tmax / (63.0 - i / 16.0), dtype=torch.float32)
        v = torch.round(t / sc).clamp(-63, 63)
        err = float(((t.double() - v.double() * sc.double()) ** 2).sum())
        if best is None or err < best * (1 - 1e-9):
            best, scale = err, sc
    return scale


def pair_tables(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The 2-bit int8 mode's pair tables (``csrc/cpu/pair_lut.h``) of activations ``x [rows, K]``,
    float64 ``[rows, ceil(K / 32) * 16, 16]``: for each pair of columns ``(x0, x1)`` and 4-bit index
    ``e``, ``v = t[e & 3] * x0 + t[e >> 2] * x1`` (float32: two products, then their sum), rounded to
    int8 per 32-column chunk with the scale ``mx / 127`` (``mx``: the chunk's max |v|; ties to even),
    times that scale. A chunk whose ``mx`` is so small that ``127 / mx`` overflows float32 rounds to
    zeros, as a chunk of zeros does."""
    rows, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, -k % 32))
    t, e = table.float(), torch.arange(16)
    v = t[e & 3] * xp[:, 0::2, None] + t[e >> 2] * xp[:, 1::2, None]
    vc = v.reshape(rows, -1, 16, 16)
    mx = vc.abs().amax(dim=(-1, -2), keepdim=True)
    # a tensor over a tensor: torch computes ``127.0 / mx`` as ``mx.reciprocal() * 127``, two roundings,
    # one ulp off the kernels' division for ~25% of values (and then some entries round the other way)
    r = torch.full_like(mx, 127.0) / mx
    q = torch.round(vc * torch.where((mx > 0) & (r <= torch.finfo(torch.float32).max), r, torch.zeros_like(mx)))
    return (q.double() * (mx / 127.0).double()).reshape(rows, -1, 16)


def reference_qgemm_pair(x: torch.Tensor, w: RandomWeight, group_size: int) -> torch.Tensor:
    """The CPU kernel's int8 mode for 2 bits (the pair tables of :func:`pair_tables`), executable in
    float64: each weight row's pair index selects an entry of each pair's table, times the row's
    group scale; offsets multiply the exact ``x``."""
    k = x.shape[-1]
    xf = x.float().reshape(-1, k)
    e = pair_tables(xf, w.table)                               # [rows, pairs, 16]
    n = w.codes.shape[0]
    c = torch.nn.functional.pad(w.codes.long(), (0, -k % 32))
    idx = c[:, 0::2] | (c[:, 1::2] << 2)                      # [N, pairs]
    g = torch.clamp(torch.arange(idx.shape[1]) * 2 // (group_size if group_size > 0 else k),
                    max=w.scales.shape[1] - 1)
    onehot = torch.zeros(n, idx.shape[1], 16, dtype=torch.float64)
    onehot.scatter_(2, idx.unsqueeze(-1), w.scales.double()[:, g].unsqueeze(-1))
    y = e.reshape(e.shape[0], -1) @ onehot.reshape(n, -1).t()
    if w.offsets is not None:
        zeros = torch.zeros_like(w.table, dtype=torch.float32)  # table of zeros: only the offsets
        y = y + xf.double() @ dequantize_codes(w.codes, w.scales, w.offsets, zeros, group_size,
                                               torch.float64).t()
    return y.reshape(*x.shape[:-1], -1)


def int8_uses_pair_tables(bits: int, rows: int) -> bool:
    """Whether the CPU kernel's int8 mode computes a batch of ``rows`` activation rows of a
    ``bits``-bit weight on pair tables (:func:`reference_qgemm_pair`): 2 bits below the row count
    from which the CPU's 16-row kernel takes over (``torch.ops.flute.cpu_rows16_m(2)``; CPUs with
    AVX-512 VBMI + VNNI), every 2-bit batch elsewhere."""
    if bits != 2:
        return False
    from . import ops  # the extension's own choice, where it is built
    start = int(torch.ops.flute.cpu_rows16_m(2)) if ops.HAS_CPU_KERNEL else 0
    return not start or rows < start


def reference_qgemm_int8(x: torch.Tensor, w: RandomWeight, group_size: int,
                         pair: Optional[bool] = None) -> torch.Tensor:
    """The CPU kernel's "int8" mode (``flute.set_cpu_mode("int8")``), executable: float64 ``x @ W.T``
    after the two roundings that mode makes. 2 bits with ``pair`` (default: as the kernel does for
    this batch, :func:`int8_uses_pair_tables`): :func:`reference_qgemm_pair`. The table becomes 7-bit integers times one scale
    (:func:`table7_scale`). Each row of ``x`` is rounded to int8 per 32-column chunk with the chunk
    scale ``k * u`` of its block (128 columns for 4 bits, 256 for 2 and 3): ``u = bmax / 127 / 8191``
    for the block's max|x|, ``k = min(8191, ceil(cmax / (bmax / 8191)))`` for the chunk's max|x|
    (float32 arithmetic, ties to even, as the kernel). Offsets multiply the exact ``x`` (their group
    sums are exact in the kernel too)."""
    if pair if pair is not None else int8_uses_pair_tables(w.bits, x.numel() // x.shape[-1]):
        return reference_qgemm_pair(x, w, group_size)
    t = w.table.float()
    tscale = table7_scale(t)
    t7 = torch.round(t / tscale).clamp(-63, 63) * tscale if tscale > 0 else torch.zeros_like(t)
    k = x.shape[-1]
    xf = x.float().reshape(-1, k)
    cols = 128 if w.bits == 4 else 256
    xc = torch.nn.functional.pad(xf, (0, -k % cols)).reshape(xf.shape[0], -1, cols // 32, 32)
    cmax = xc.abs().amax(-1)                                  # [rows, blocks, chunks]
    bmax = cmax.amax(-1, keepdim=True)
    d, u = bmax / 8191, bmax / 127 / 8191
    kc = torch.where(d > 0, torch.ceil(cmax / torch.where(d > 0, d, 1)), 0).clamp(max=8191)
    cs = (kc * u).unsqueeze(-1)
    x8 = torch.where(cs > 0, torch.round(xc / torch.where(cs > 0, cs, 1)), 0).clamp(-127, 127)
    xq = (x8 * cs).reshape(xf.shape[0], -1)[:, :k].double()
    y = xq @ dequantize_codes(w.codes, w.scales, None, t7, group_size, torch.float64).t()
    if w.offsets is not None:
        ones = torch.zeros_like(w.table, dtype=torch.float32)  # table of zeros: only the offsets
        y = y + xf.double() @ dequantize_codes(w.codes, w.scales, w.offsets, ones, group_size,
                                               torch.float64).t()
    return y.reshape(*x.shape[:-1], -1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` when ``out`` holds a NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def save_tiny_llama(path, vocab: int = 512, hidden: int = 256, layers: int = 2,
                    intermediate: Optional[int] = None, seed: int = 0):
    """Write a random tiny Llama (bf16) with a word-level tokenizer (``w3 w4 ...``) to ``path``, as
    ``save_pretrained`` lays it out: a real checkpoint for smoke tests, without a download."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path
