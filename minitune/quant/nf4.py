"""NF4: the 4-bit NormalFloat data type of QLoRA, with block-wise absmax and
double quantization.  Reference: Dettmers, Pagnoni, Holtzman, Zettlemoyer,
"QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (arXiv 2305.14314).

The idea in three equations
---------------------------
1. The code book.  Pre-trained weights are roughly N(0, sigma^2).  After
   dividing a block by its absolute maximum they lie in [-1, 1], and a 4-bit
   code that puts its 16 levels at *quantiles* of N(0, 1) gives every level the
   same share of the weights (an information-theoretically good use of 4 bits):

       q_i = 1/2 * (Phi^-1(i / (2^k + 1)) + Phi^-1((i + 1) / (2^k + 1)))

   QLoRA builds it asymmetrically so that 0 is represented exactly: 8 positive
   levels from the upper quantiles, 7 negative ones from the lower, plus 0,
   then everything is normalised to [-1, 1].  The values are in `NF4_CODE`.

2. Block-wise absmax.  The flat tensor is cut into blocks of B values (B = 64
   in QLoRA).  Each block keeps one float32 scale c = max |w| and every weight
   becomes the index of its nearest level:

       idx = argmin_i | w / c - q_i |        w_hat = q_idx * c

   Two 4-bit indices share one byte: the first element in the high nibble.

3. Double quantization.  A float32 per 64 weights costs 32/64 = 0.5 bits per
   parameter.  QLoRA quantizes these constants again: subtract their mean
   (`offset`, so the values are centred on 0 and the signed code fits), then
   quantize them block-wise to 8 bits with the "dynamic" 8-bit map, blocks of
   256 with one float32 scale each:

       c_hat = code2[q_c] * c2 + offset
       bits/param = 4 + 8/64 + 32/(64*256) = 4.127

All arithmetic follows bitsandbytes' `quantize_4bit` / `dequantize_4bit`
(`quant_type="nf4"`, `compress_statistics=True` for double quantization) so the
packed bytes, the scales and the dequantized weights are the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# The 16 NF4 levels (QLoRA appendix; bitsandbytes hard-codes the same float32
# values, produced by its create_normal_map(offset=0.9677083)).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes accepts these block sizes for 4-bit blocks (its CUDA kernels are
# templated on them).  All are even, so the two nibbles of a byte always share a block.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DOUBLE_QUANT_BLOCKSIZE = 256  # block size of the second level, fixed as in QLoRA
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dynamic_map_8bit() -> torch.Tensor:
    """The signed "dynamic" 8-bit code (Dettmers 2015, "8-Bit Approximations for
    Parallelism in Deep Learning") that double quantization uses for the scales.

    A dynamic exponent e = 0..6 picks a decade 10^(e-6); the remaining bits form
    a linear fraction with 2^e steps in [0.1, 1].  Small magnitudes get few
    levels, large ones many: 254 signed values, plus 0 and 1, sorted (the
    smallest is -0.993, not -1).  Built with the same float32 operations as
    bitsandbytes' create_dynamic_map, so the 256 floats are identical.
    """
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0  # bin centres of the fraction
        values += ((10 ** (e - 6)) * mids).tolist()  # positive branch
        values += (-(10 ** (e - 6)) * mids).tolist()  # negative branch
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# bitsandbytes' CPU 8-bit quantizer does not search the 256 levels for each
# value: it rounds the normalised value to a grid of 65536 points over [-1, 1]
# and reads the level from a table built once for that grid.  We do the same,
# so the 8-bit scales are the same bytes (an exact nearest-level search differs
# for values within ~1.5e-5 of a midpoint between two levels).
_GRID = 65536


def _grid_table(code: torch.Tensor) -> torch.Tensor:
    """table[i] = the level nearest to grid point g_i = -1 + 2i / 65535 (ties down)."""
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_GRID, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * i) / torch.full_like(i, _GRID - 1)  # float32 division, as in C
    return torch.searchsorted(mids, grid, side="left")  # how many midpoints lie below g_i


def _nearest_level_on_grid(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Level index of values in [-1, 1]: snap to the grid (round half up), look up."""
    t = (normed.clamp(-1, 1) + 1.0) * 0.5 * float(_GRID - 1) + 0.5
    return _grid_table(code)[t.long()]  # .long() truncates, like the C cast


@dataclass
class NF4Tensor:
    """A weight stored as NF4.  Flat element k lives in byte k // 2 of `packed`
    (high nibble if k is even) and belongs to block k // blocksize."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 [n_blocks] with double quantization
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    offset: Optional[torch.Tensor] = None   # float32 scalar: mean of the float32 absmax
    absmax2: Optional[torch.Tensor] = None  # float32 [ceil(n_blocks / 256)]: second-level scales
    code2: Optional[torch.Tensor] = None    # float32 [256]: the dynamic 8-bit map

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(move(self.packed), move(self.absmax), self.shape, self.dtype,
                         self.blocksize, move(self.offset), move(self.absmax2), move(self.code2))


def check_blocksize(blocksize: int) -> None:
    if not (isinstance(blocksize, int) and not isinstance(blocksize, bool)) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize!r} is not supported: NF4 blocks must be one of "
            f"{SUPPORTED_BLOCKSIZES}. Two 4-bit values share one byte, so an odd block size "
            "would split a byte between two blocks (two scales for one byte); and "
            "bitsandbytes' layout and kernels only exist for these powers of two."
        )


def _check_float(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"NF4 quantizes float32/float16/bfloat16 weights, got dtype {w.dtype}"
            + (" (cast float64 to float32 first)" if w.dtype == torch.float64 else "")
        )
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| over consecutive blocks of a flat float32 tensor; the last block may be short."""
    n = x.numel()
    pad = -n % blocksize
    # Padding with zeros cannot change a maximum of absolute values.
    return torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, blocksize).amax(dim=1)


def _per_element(scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """Broadcast one scale per block to one per element (length n)."""
    return scales.repeat_interleave(blocksize)[:n]


def _quantize_scales(absmax: torch.Tensor):
    """Second level of double quantization, as bitsandbytes' quantize_4bit with
    compress_statistics=True: subtract the mean, then 8-bit blockwise
    quantization of the centred scales in blocks of 256."""
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _blockwise_absmax(centred, DOUBLE_QUANT_BLOCKSIZE)
    # Multiply by the reciprocal, as its kernel does (0 for an all-zero block).
    inv = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    normed = centred * _per_element(inv, DOUBLE_QUANT_BLOCKSIZE, centred.numel())
    code2 = dynamic_map_8bit().to(absmax.device)
    q = _nearest_level_on_grid(normed, code2)
    # An all-zero block (possible only if all its scales equal the mean) gets
    # index 0 in bitsandbytes; it decodes to code2[0] * 0 + offset = offset.
    q = q.masked_fill(_per_element(absmax2 == 0, DOUBLE_QUANT_BLOCKSIZE, q.numel()), 0)
    return q.to(torch.uint8), offset, absmax2, code2


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize any-shaped float tensor to NF4 (flattened in row-major order)."""
    _check_float(w)
    check_blocksize(blocksize)
    x = w.detach().reshape(-1).float()  # all maths in float32, whatever the input dtype
    n = x.numel()
    # BEGIN EXERCISE 09.3: blockwise absmax and the nearest NF4 level
    absmax = _blockwise_absmax(x, blocksize)
    # Normalise to [-1, 1]: multiply by the reciprocal like the CUDA kernel does;
    # the clamp keeps an all-zero block finite (0 * 1e38 = 0 -> code 0.0).
    # (bitsandbytes' portable CPU op divides in the last, partial block instead;
    # the two can differ by an ulp, which changes a code only on an exact midpoint.)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (x * _per_element(inv, blocksize, n)).clamp(-1, 1)
    # Nearest level = the interval between consecutive midpoints that holds x.
    # bucketize(right=False) puts a value exactly on a midpoint in the lower level.
    code = NF4_CODE.to(x.device)
    mids = (code[:-1] + code[1:]) / 2
    if n % 2:  # odd count: the last byte's low nibble encodes a padding 0.0 (index 7)
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, mids).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]  # first element -> high nibble
    # END EXERCISE
    q = NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    if double_quant:
        q.absmax, q.offset, q.absmax2, q.code2 = _quantize_scales(absmax)
    return q


def dequantize_scales(q: NF4Tensor) -> torch.Tensor:
    """The float32 per-block scales; with double quantization
    c = code2[q_c] * c2 + offset, as two roundings (a product, then a sum)
    so the Triton kernel, forced to the same order, gives the same bits."""
    if not q.double_quant:
        return q.absmax
    c2 = _per_element(q.absmax2, DOUBLE_QUANT_BLOCKSIZE, q.absmax.numel())
    return q.code2[q.absmax.long()] * c2 + q.offset


def unpack_indices(q: NF4Tensor) -> torch.Tensor:
    """The int64 code index of every element, in flat order."""
    hi = q.packed >> 4
    lo = q.packed & 0x0F
    return torch.stack([hi, lo], dim=1).reshape(-1)[: q.numel].long()


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """PyTorch reference: w_hat = NF4_CODE[idx] * absmax[block], in float32,
    rounded once to `dtype` (default: the dtype the weight had)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize to float32/float16/bfloat16, not {dtype}")
    # BEGIN EXERCISE 09.1: NF4 dequantize
    values = NF4_CODE.to(q.device)[unpack_indices(q)]
    scales = _per_element(dequantize_scales(q), q.blocksize, q.numel)
    return (values * scales).to(dtype).view(q.shape)
    # END EXERCISE


def nbytes(q: NF4Tensor) -> int:
    """Bytes this tensor occupies: packed indices, scales and, with double
    quantization, the offset, the second-level scales and the 8-bit map
    (bitsandbytes stores that map with every tensor too)."""
    parts = [q.packed, q.absmax, q.offset, q.absmax2, q.code2]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def bits_per_param(q: NF4Tensor) -> float:
    return 8 * nbytes(q) / q.numel
