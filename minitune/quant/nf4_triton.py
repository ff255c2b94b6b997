"""NF4 dequantization as a Triton kernel.

Dequantization is a memory-bound gather: read half a byte per weight, write
2 (bf16/fp16) or 4 (fp32) bytes.  For each weight k (block j = k // blocksize)

    plain NF4:     w_k = NF4_CODE[idx_k] * absmax[j]
    double quant:  w_k = NF4_CODE[idx_k] * (code2[qabsmax[j]] * absmax2[j // 256] + offset)

in float32, rounded once to the output dtype.  The operations and their order
are those of the PyTorch reference `dequantize_nf4`, and we forbid the compiler
to fuse the multiply-add of the scale into one FMA (`enable_fp_fusion=False`):
an FMA rounds once where the reference rounds twice.  So the result is the same
bits as the reference (and as bitsandbytes), not merely close.

One program handles ROWS whole absmax blocks, seen as a 2-D tile of
[ROWS, blocksize // 2] packed bytes: one row per block.  The scale is then
worked out once per row and broadcast along it, instead of being gathered
again for every byte (three dependent loads per byte with double quant).

Triton is imported only when the kernel is first used, so `minitune.quant`
imports on machines without it.  Set TRITON_INTERPRET=1 before triton is
imported to run the kernel on CPU tensors with Triton's interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch

from .nf4 import DOUBLE_QUANT_BLOCKSIZE, FLOAT_DTYPES, NF4_CODE, NF4Tensor

# Measured on an H100 (bench/README.md): 1024 bytes (2048 weights) and 4 warps,
# i.e. 8 packed bytes per thread, beat 2048-8192 bytes and 8-16 warps (likely
# because many small programs overlap well and leave only a short tail).
BYTES_PER_PROGRAM = 1024  # more if one absmax block alone is bigger
NUM_WARPS = 4
_kernel = None
_code_cache: dict = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant_kernel(
        packed_ptr,     # uint8 [n_bytes]: two 4-bit code indices per byte, first in the high nibble
        absmax_ptr,     # float32 [n_blocks] scales, or uint8 [n_blocks] with double quantization
        code_ptr,       # float32 [16]: the NF4 code book
        absmax2_ptr,    # float32 [ceil(n_blocks / 256)]: second-level scales (double quant only)
        code2_ptr,      # float32 [256]: the dynamic 8-bit map (double quant only)
        offset_ptr,     # float32 [1]: mean of the first-level scales (double quant only)
        out_ptr,        # bf16 / fp16 / fp32 [n_elements]: the dequantized weight, flat
        n_elements,     # number of weights (may be odd: the last low nibble is padding)
        n_bytes,        # number of packed bytes = ceil(n_elements / 2)
        n_blocks,       # number of absmax blocks = ceil(n_elements / BLOCKSIZE)
        BLOCKSIZE: tl.constexpr,      # weights per absmax block (a power of two, for tl.arange)
        BLOCKSIZE2: tl.constexpr,     # first-level scales per second-level block (256)
        DOUBLE_QUANT: tl.constexpr,   # compile-time switch: one kernel variant per storage format
        ROWS: tl.constexpr,           # absmax blocks per program (a power of two)
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per block (even BLOCKSIZE: no byte straddles two)
        # The program's first block.  int64 so that tensors beyond 2^31 weights
        # do not overflow; we move the base pointers once, and the offsets inside
        # the tile stay small int32 (fewer instructions than int64 everywhere).
        first = tl.program_id(0).to(tl.int64) * ROWS
        packed_ptr += first * HALF
        out_ptr += first * BLOCKSIZE
        rows = tl.arange(0, ROWS)
        byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [ROWS, HALF], row-major = memory order
        # The last program may run past the end: masked lanes load a harmless 0.
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes - first * HALF, other=0)

        # Split the byte: element 2*byte is the high nibble, 2*byte + 1 the low one.
        idx_hi = (packed >> 4).to(tl.int32)
        idx_lo = (packed & 0x0F).to(tl.int32)

        # One scale per row (a [ROWS] vector), not one per byte.
        block = first + rows
        has_block = block < n_blocks
        if DOUBLE_QUANT:
            # Level 2: the 8-bit scale index selects a value of the dynamic map,
            q_scale = tl.load(absmax_ptr + block, mask=has_block, other=0).to(tl.int32)
            code2 = tl.load(code2_ptr + q_scale)
            # scaled by its block-of-256 scale and shifted back by the mean.
            absmax2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=has_block, other=0.0)
            # Product, then sum: two roundings, like the reference (no FMA, see launch).
            scale = code2 * absmax2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=has_block, other=0.0)
        scale = scale[:, None]  # broadcast along the row

        # Level 1: look the 4-bit indices up in the 16-entry NF4 table (it stays
        # in L1 cache) and multiply by the block's scale, in float32.
        w_hi = tl.load(code_ptr + idx_hi) * scale
        w_lo = tl.load(code_ptr + idx_lo) * scale

        # Put the two halves back in memory order: hi0, lo0, hi1, lo1, ...
        # (interleave joins two [ROWS, HALF] tiles into one [ROWS, BLOCKSIZE]).
        w = tl.interleave(w_hi, w_lo)
        # One rounding to the output dtype, round-to-nearest-even like torch.
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # bf16 is the top half of a float32.  Round by hand: add 0x7FFF, plus
            # 1 if the bit that will become the last kept one is odd (ties to
            # even), then drop the low 16 bits.  Spelled out because Triton's
            # interpreter truncates in .to(tl.bfloat16); compiled, this is a few
            # integer ops in a memory-bound kernel.  (Finite values only.)
            bits = w.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            w = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            w = w.to(out_ptr.dtype.element_ty)

        # Contiguous store of the whole tile; drop the padding nibble and the tail.
        elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + elem, w, mask=elem < n_elements - first * BLOCKSIZE)

    return nf4_dequant_kernel


def _code_on(device: torch.device) -> torch.Tensor:
    """NF4_CODE on the kernel's device, copied there once."""
    key = str(device)
    if key not in _code_cache:
        _code_cache[key] = NF4_CODE.to(device)
    return _code_cache[key]


def dequantize_nf4_triton(q: NF4Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize `q` with the Triton kernel; same bits as `dequantize_nf4(q, out_dtype)`."""
    global _kernel
    import triton

    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize to float32/float16/bfloat16, not {out_dtype}")
    if _kernel is None:
        _kernel = _build_kernel()
    device = q.packed.device
    out = torch.empty(q.numel, dtype=out_dtype, device=device)
    n_blocks = q.absmax.numel()
    if q.double_quant:
        absmax2, code2, offset = q.absmax2, q.code2, q.offset.reshape(1)
    else:  # unused by this kernel variant; any valid pointer will do
        absmax2 = code2 = offset = q.absmax
    # Whole blocks per program: at least one, even when a block alone is bigger.
    rows = max(1, BYTES_PER_PROGRAM // (q.blocksize // 2))
    grid = (triton.cdiv(n_blocks, rows),)
    options = {} if device.type == "cpu" else {"enable_fp_fusion": False, "num_warps": NUM_WARPS}
    _kernel[grid](
        q.packed, q.absmax, _code_on(device), absmax2, code2, offset, out,
        q.numel, q.packed.numel(), n_blocks,
        BLOCKSIZE=q.blocksize, BLOCKSIZE2=DOUBLE_QUANT_BLOCKSIZE,
        DOUBLE_QUANT=q.double_quant, ROWS=rows,
        **options,
    )
    return out.view(q.shape)
