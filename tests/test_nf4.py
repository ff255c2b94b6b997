"""NF4 quantization against bitsandbytes (CPU), the library QLoRA made standard."""
import copy

import pytest
import torch

from minitune.quant.nf4 import (NF4_CODE, bits_per_param, dequantize_nf4, dynamic_map_8bit,
                                nbytes, quantize_nf4)

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (33, 65), (7,), (3, 5, 7), (1000, 37), (128, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    """bitsandbytes torch.compile's its portable dequant, once per shape: seconds per
    call on CPU.  Run it eagerly (the same float32 operations) to keep the tests fast."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(shape, generator=g)).to(dtype)


def bnb_quantize(w, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4")


def bnb_dequantize(packed, state, shape):
    # bitsandbytes 0.50.2's AVX-512 CPU dequant indexes the scales per row and is
    # wrong when the block size does not divide the last dimension (e.g. (64, 64)
    # with blocksize 128, off by up to 1.2 on N(0,1) weights).  Its blocks are
    # flat, so asking for a 1-D result takes the correct path; we reshape after.
    state.shape = torch.Size([shape.numel()])
    return bnbF.dequantize_4bit(packed, state).view(shape)


def test_code_book_equals_bitsandbytes():
    ref = bnbF.get_4bit_type("nf4", device="cpu")
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.allclose(NF4_CODE, ref, atol=1e-6, rtol=0)
    assert torch.equal(NF4_CODE, ref)  # in fact the same floats


def test_code_book_is_sorted_with_exact_zero_and_unit_ends():
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1


def test_dynamic_8bit_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map_8bit(), bnbF.create_dynamic_map())


def test_first_element_goes_to_high_nibble():
    w = torch.tensor([1.0, -1.0, 0.0])  # absmax 1: indices 15, 0, 7 (+ pad 7)
    q = quantize_nf4(w)
    assert q.packed.tolist() == [0xF0, 0x77]
    assert torch.equal(q.packed, bnb_quantize(w, 64, False)[0].flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_bytes_and_absmax_identical_to_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w, 64, False)
    q = quantize_nf4(w, blocksize=64)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == (w.numel() + 1) // 2
    assert torch.equal(q.packed, packed.flatten())
    assert q.absmax.dtype == torch.float32
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == w.shape and q.dtype == dtype and q.blocksize == 64


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_block_sizes_identical_to_bitsandbytes(blocksize):
    w = weight((33, 65), torch.float32, seed=1)
    packed, state = bnb_quantize(w, blocksize, False)
    q = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(q.packed, packed.flatten()) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(packed, state, w.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_identical_to_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w, 64, False)
    out = dequantize_nf4(quantize_nf4(w))
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, bnb_dequantize(packed, state, w.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(300, 300)], ids=str)
def test_double_quant_constants_identical_to_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(q.packed, packed.flatten())
    assert q.absmax.dtype == torch.uint8 and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.absmax2, state.state2.absmax)
    assert torch.equal(q.code2, state.state2.code)
    assert state.state2.blocksize == 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(300, 300)], ids=str)
def test_double_quant_dequantize_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w, 64, True)
    ref = bnb_dequantize(packed, state, w.shape)
    out = dequantize_nf4(quantize_nf4(w, double_quant=True))
    rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert rel <= 5e-3  # what the issue asks for ...
    # ... and what we get: the same bits as bitsandbytes' float32 result, rounded once to the dtype.
    # (Its own fp16 output matches that on AMD; on an Intel Xeon its CPU kernel left 5-30 values per
    # tensor one fp16 step away, so a test against it would depend on the machine.)
    state32 = copy.deepcopy(state)
    state32.dtype = torch.float32
    assert torch.equal(out, bnb_dequantize(packed, state32, w.shape).to(dtype))


def test_double_quant_single_block_of_scales_matches_bitsandbytes():
    # One block: the centred scale is 0, its second-level absmax is 0.
    w = weight((64,), torch.float32)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w, double_quant=True)
    assert torch.equal(q.absmax, state.absmax) and torch.equal(q.absmax2, state.state2.absmax)
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(packed, state, w.shape))


def test_all_zero_blocks_dequantize_to_zero_like_bitsandbytes():
    w = torch.zeros(256)
    w[64:128] = torch.linspace(-1, 1, 64)
    packed, state = bnb_quantize(w, 64, False)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.flatten()) and torch.equal(q.absmax, state.absmax)
    out = dequantize_nf4(q)
    assert torch.equal(out[:64], torch.zeros(64)) and torch.equal(out[128:], torch.zeros(128))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_to_requested_dtype_is_float32_result_rounded_once(out_dtype):
    q = quantize_nf4(weight((33, 65), torch.bfloat16), double_quant=True)
    out = dequantize_nf4(q, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, dequantize_nf4(q, torch.float32).to(out_dtype))


def test_quantization_error_is_small_and_shrinks_with_block_size():
    w = weight((256, 256), torch.float32, seed=3)
    errs = [(dequantize_nf4(quantize_nf4(w, bs)) - w).pow(2).mean().sqrt().item() / w.std().item()
            for bs in (64, 256, 4096)]
    assert errs[0] < 0.11 and errs[0] < errs[1] < errs[2]


def test_bits_per_parameter_of_4096x4096_layer():
    w = torch.randn(4096, 4096)
    dq = quantize_nf4(w, double_quant=True)
    plain = quantize_nf4(w[:256], double_quant=False)  # same ratio, less time
    # 4 bits + one float32 per 64 = 4.5; with double quantization
    # 4 + 8/64 + 32/(64*256) = 4.127, plus the 256-entry map and the offset.
    assert bits_per_param(plain) == 4.5
    assert bits_per_param(dq) <= 4.13
    assert nbytes(dq) == 4096 * 4096 // 2 + 4096 * 64 + 4 * 1024 + 4 * 256 + 4


@pytest.mark.parametrize("blocksize", [0, 16, 48, 63, 65, 100, 8192, 64.0])
def test_unsupported_block_size_is_a_clear_error(blocksize):
    with pytest.raises(ValueError, match="blocksize.*not supported.*share one byte"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_non_float_tensor_is_a_clear_error(dtype):
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_nf4(torch.ones(64, dtype=dtype))


def test_empty_tensor_and_non_tensor_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="dequantize to"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), torch.int8)
