"""The Triton NF4 dequant kernel is bit-identical to the PyTorch reference.

On CPU the kernel runs in Triton's interpreter.  TRITON_INTERPRET=1 must be set
before triton is imported, and other test modules (bitsandbytes among them)
import triton at collection time, so the interpreted runs happen in one
subprocess: this file run as a script, which prints one JSON line per case.
On a CUDA machine the compiled kernel is also checked, in process.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

SHAPES = [((64, 64), 64), ((33, 65), 64), ((7,), 64), ((3, 5, 7), 32), ((300, 37), 128),
          ((40, 130), 64), ((2, 4096), 4096)]  # (40, 130): 5200 weights, 3 programs
IN_DTYPES = ["float32", "float16", "bfloat16"]
OUT_DTYPES = [None, "float32", "float16", "bfloat16"]
CASES = [(shape, bs, dq, dt) for shape, bs in SHAPES for dq in (False, True) for dt in IN_DTYPES]


def case_id(shape, bs, dq, dt):
    return f"{'x'.join(map(str, shape))}-bs{bs}-{'dq' if dq else 'plain'}-{dt}"


def compare(device):
    """Yield (case id, out dtype, identical, max abs diff) for every case and out dtype."""
    from minitune.quant.nf4 import dequantize_nf4, quantize_nf4
    from minitune.quant.nf4_triton import dequantize_nf4_triton

    for shape, bs, dq, dt in CASES:
        g = torch.Generator().manual_seed(len(shape) * 1000 + bs)
        w = torch.randn(shape, generator=g).to(getattr(torch, dt)).to(device)
        q = quantize_nf4(w, blocksize=bs, double_quant=dq)
        for od in OUT_DTYPES:
            out_dtype = None if od is None else getattr(torch, od)
            got = dequantize_nf4_triton(q, out_dtype)
            ref = dequantize_nf4(q, out_dtype)
            same = got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
            diff = (got.float() - ref.float()).abs().max().item() if got.shape == ref.shape else None
            yield case_id(shape, bs, dq, dt), str(od), same, diff


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[(r["case"], r["out"])] = r
    return results


@pytest.mark.parametrize("out", [str(o) for o in OUT_DTYPES])
@pytest.mark.parametrize("case", [case_id(*c) for c in CASES])
def test_interpreted_kernel_is_bit_identical_to_reference(interpreted, case, out):
    r = interpreted[(case, out)]
    assert r["identical"], f"max abs diff {r['diff']}"


def test_minitune_quant_imports_lazily_and_works_without_triton():
    code = ("import sys, torch, minitune.quant as mq\n"
            "print('triton' in sys.modules)\n"  # importing minitune.quant must not import it
            "sys.modules['triton'] = None\n"  # now `import triton` fails, as on a bare CPU box
            "assert not mq.triton_available()\n"
            "layer = mq.Linear4bit.from_linear(torch.nn.Linear(64, 8))\n"
            "print(tuple(layer(torch.randn(2, 64)).shape))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "(2,", "8)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
def test_compiled_kernel_on_cuda_is_bit_identical_to_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for this process")
    pytest.importorskip("triton")
    bad = [(c, o, d) for c, o, same, d in compare("cuda") if not same]
    assert not bad


if __name__ == "__main__":  # the interpreter worker (see the module docstring)
    for case, out, same, diff in compare("cpu"):
        print(json.dumps({"case": case, "out": out, "identical": same, "diff": diff}), flush=True)
