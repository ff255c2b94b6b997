"""generate(static_cache=True): a pre-allocated cache and a fixed-shape decode step, the same tokens.

  * Greedy tokens identical to the plain loop (decode_loop), batch 1 and batch 3 left-padded, on
    Qwen2-, Qwen3- and LLaMA-3-shaped checkpoints written by transformers, and identical to
    transformers' own greedy `generate` on them; seeded sampling and EOS stopping too.
  * Each step's logits equal the plain loop's within fp32 rounding: max |error| / max |logit| < 1e-5
    (seen: 4.8e-7; attention over all max_len columns, the unwritten ones at probability 0, sums in
    another order than over the written ones only).
  * The decode step is graph-ready: two steps at different cache columns run the same ops on the same
    shapes, read nothing back to the host (no aten._local_scalar_dense, i.e. no .item()/bool()), and
    keep the cache's storage; torch.compile(fullgraph=True) traces it as one graph with no recompile
    over several steps (backend "aot_eager": the tracing is the check, not inductor's code).
  * LoRA layers inside the model change nothing: same tokens as the plain loop.
  * On a CUDA device (skipped elsewhere): the CUDA-graph step gives the eager static step's tokens, also
    when the captured graph is replayed by a second generation on the same cache.
  * A cache that cannot hold prompt + max_new_tokens, another batch size, cuda_graph=True without a
    CUDA device, and a prompt-tuning model are each one GenerationError (a UserError) line.
  * bench/bench_decode_gpu.py --smoke runs on the CPU and writes its JSON.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from hf_factory import hf_load, rel_error, write_checkpoints
from test_generation import tiny
from torch.utils._python_dispatch import TorchDispatchMode

import minitune
from minitune.errors import UserError
from minitune.generation import GenerationError, generate
from minitune.model import StaticKVCache
from minitune.model.static_cache import decode_step, prefill
from minitune.peft import apply_lora
from minitune.peft.prompt import SoftPromptModel

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
KINDS = ["qwen2", "qwen3", "llama3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory, KINDS)


def prompts(batch, vocab, seed=2):
    ids = torch.randint(3, vocab, (batch, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0  # left padding of different lengths
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_gives_the_plain_loops_and_transformers_greedy_tokens(checkpoints, kind, batch):
    ours, _ = minitune.load_pretrained(checkpoints[kind])
    ids, mask = prompts(batch, 320)
    plain = generate(ours, ids, 20, attention_mask=mask, fast_decode=False)
    static = generate(ours, ids, 20, attention_mask=mask, fast_decode=False, static_cache=True)
    assert static.tolist() == plain.tolist()
    assert generate(ours, ids, 20, attention_mask=mask, static_cache=True).tolist() == plain.tolist()  # fast_decode too
    ref = hf_load(checkpoints[kind])
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=0)
    assert static.tolist() == theirs.tolist()


@pytest.mark.parametrize("sampling", [dict(eos_id=[5, 7]), dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)])
def test_static_cache_samples_and_stops_like_the_plain_loop(sampling):
    model = tiny(model_type="llama", tie_word_embeddings=True)
    ids, mask = prompts(3, 97)
    plain = generate(model, ids, 30, attention_mask=mask, **sampling)
    static = generate(model, ids, 30, attention_mask=mask, static_cache=True, **sampling)
    assert static.tolist() == plain.tolist()


def test_static_cache_decodes_a_model_with_lora_layers_like_the_plain_loop():
    model = apply_lora(tiny(), r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the output
                p.normal_(0, 0.5)
    ids, mask = prompts(3, 97)
    plain = generate(model, ids, 16, attention_mask=mask)
    assert generate(model, ids, 16, attention_mask=mask, static_cache=True).tolist() == plain.tolist()


def test_static_step_logits_match_the_plain_loop():
    model = tiny()
    ids, mask = prompts(3, 97)
    seen = {}
    for static in (False, True):
        steps = []
        head = model.lm_head
        orig = head.forward
        head.forward = lambda x, orig=orig, steps=steps: steps.append(orig(x)) or steps[-1]
        try:
            generate(model, ids, 12, attention_mask=mask, fast_decode=False, static_cache=static)
        finally:
            del head.forward
        seen[static] = torch.stack(steps).float()  # [steps, B, vocab]
    assert rel_error(seen[True], seen[False]) < 1e-5  # seen: 4.8e-7


def test_a_reused_cache_forgets_the_previous_generation():
    model = tiny()
    cache = StaticKVCache.for_model(model, batch=3, max_len=40)
    long_ids, long_mask = prompts(3, 97, seed=3)
    generate(model, long_ids, 25, attention_mask=long_mask, static_cache=cache)  # fills 34 columns
    ids, mask = prompts(3, 97, seed=4)
    short = generate(model, ids[:, 3:], 6, attention_mask=mask[:, 3:], static_cache=cache)
    assert short.tolist() == generate(model, ids[:, 3:], 6, attention_mask=mask[:, 3:]).tolist()


class OpTrace(TorchDispatchMode):
    """Every aten op a piece of code runs, with its output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


def prefilled(batch=3):
    model = tiny(qk_norm=True)
    ids, mask = prompts(batch, 97)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache.for_model(model, batch, max_len=16)
    with torch.inference_mode():  # the step's inputs made where generate makes them
        logits = prefill(model, cache, ids, mask, position_ids)
        return model, cache, logits, position_ids[:, -1:] + 1, torch.tensor([ids.shape[1]])


def test_the_decode_step_runs_the_same_ops_on_the_same_shapes_without_host_syncs():
    model, cache, logits, position_ids, column = prefilled()
    storage = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.key_mask.data_ptr())
    traces = []
    with torch.inference_mode():
        for _ in range(3):
            with OpTrace() as trace:
                logits = decode_step(model, cache, logits.argmax(-1)[:, None], position_ids, column)
            traces.append(trace.ops)
            position_ids, column = position_ids + 1, column + 1
    assert traces[0] == traces[1] == traces[2]
    assert logits.shape == (3, 97)
    names = {name for name, _ in traces[0]}
    assert not {n for n in names if "_local_scalar_dense" in n or "nonzero" in n}, names  # .item(), bool(t), t[mask]
    assert (cache.keys.data_ptr(), cache.values.data_ptr(), cache.key_mask.data_ptr()) == storage
    assert cache.key_mask[:, 9:12].all() and not cache.key_mask[:, 12:].any()  # three columns written, in place


def test_the_decode_step_compiles_to_one_graph_without_recompiles():
    model, cache, logits, position_ids, column = prefilled()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=counting_backend)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for _ in range(4):  # a new column and new positions every step: still the same graph
            expected = decode_step(model, cache, logits.argmax(-1)[:, None], position_ids, column)
            logits = step(model, cache, logits.argmax(-1)[:, None], position_ids, column)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
            position_ids, column = position_ids + 1, column + 1
    torch._dynamo.reset()
    assert len(graphs) == 1


def test_a_static_cache_too_short_for_the_generation_is_one_user_error():
    model = tiny()
    ids, mask = prompts(3, 97)
    cache = StaticKVCache.for_model(model, batch=3, max_len=16)
    with pytest.raises(GenerationError, match=r"prompt \(9 columns\) \+ max_new_tokens \(8\) = 17 positions do not "
                                              r"fit the static cache's 16") as err:
        generate(model, ids, 8, attention_mask=mask, static_cache=cache)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    generate(model, ids, 7, attention_mask=mask, static_cache=cache)  # 16 fits
    with pytest.raises(GenerationError, match="batch of 3 rows; the prompts are 1 rows"):
        generate(model, ids[:1], 4, static_cache=cache)
    with pytest.raises(GenerationError, match=r"\(layers, kv_heads, head_dim, dtype, device\) = \(2, 2, 12, "
                                              r"torch.float32, device\(type='cpu'\)\); the model needs \(3, "):
        generate(tiny(num_hidden_layers=3), ids, 4, attention_mask=mask, static_cache=cache)


def test_cuda_graph_needs_a_cuda_device_and_static_needs_a_plain_transformer():
    model = tiny()
    ids = torch.randint(3, 97, (1, 5))
    if not torch.cuda.is_available():
        with pytest.raises(GenerationError, match="cuda_graph=True needs the model on a CUDA device; it is on cpu"):
            generate(model, ids, 4, cuda_graph=True)
    prompt_tuned = SoftPromptModel(model, torch.nn.Linear(1, 1), num_virtual_tokens=2)
    with pytest.raises(GenerationError, match="not a SoftPromptModel"):
        generate(prompt_tuned, ids, 4, static_cache=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_graph_step_gives_the_static_and_plain_tokens_on_a_gpu(dtype):
    model = tiny().to("cuda", dtype)
    ids, mask = prompts(3, 97)
    ids, mask = ids.cuda(), mask.cuda()
    static = generate(model, ids, 20, attention_mask=mask, static_cache=True)
    cache = StaticKVCache.for_model(model, batch=3, max_len=40)
    graphed = generate(model, ids, 20, attention_mask=mask, static_cache=cache, cuda_graph=True)
    assert graphed.tolist() == static.tolist()  # the graph replays the eager step's kernels
    assert generate(model, ids, 20, attention_mask=mask, static_cache=cache, cuda_graph=True).tolist() == static.tolist()
    if dtype == torch.float32:  # bf16: the plain loop's attention kernels round differently
        assert static.tolist() == generate(model, ids, 20, attention_mask=mask).tolist()


def test_static_cache_is_off_by_default():
    model = tiny()
    ids = torch.randint(3, 97, (1, 5))
    calls = []
    orig = StaticKVCache.__init__
    StaticKVCache.__init__ = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        generate(model, ids, 4)
    finally:
        StaticKVCache.__init__ = orig
    assert calls == []


def test_the_gpu_decode_benchmark_runs_on_cpu_with_smoke(tmp_path):
    out = tmp_path / "decode.json"
    spec = importlib.util.spec_from_file_location("bench_decode_gpu", ROOT / "bench" / "bench_decode_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # in this process: torch and transformers are imported already
    bench.main(["--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] == torch.__version__
    rows = result["rows"]
    assert {r["variant"] for r in rows} >= {"minitune plain", "minitune static", "transformers eager",
                                            "transformers static"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_bandwidth_limit"], r
        if r["variant"].startswith("minitune"):
            assert r["tokens_identical_to_plain"] is True, r
