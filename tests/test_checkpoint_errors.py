"""Bad checkpoints fail loudly, naming the file, the tensor and the shapes; saving is atomic."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hf_factory import write_checkpoint
from safetensors.torch import load_file, save_file

import minitune
from minitune.model import CheckpointError, ConfigError, ModelConfig, Transformer


@pytest.fixture
def ckpt(tmp_path):
    write_checkpoint("qwen2", tmp_path)
    return tmp_path


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (path / "config.json").write_text(json.dumps(d))


def edit_weights(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_architecture_lists_supported_ones(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        minitune.load_pretrained(ckpt)


def test_missing_config_field_is_named(ckpt):
    edit_config(ckpt, hidden_size=None)
    with pytest.raises(ConfigError, match=r"config\.json: required field 'hidden_size' is missing"):
        minitune.load_pretrained(ckpt)


def test_missing_config_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        minitune.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        minitune.load_pretrained(tmp_path)


def test_missing_weights_file_lists_what_is_there(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        minitune.load_pretrained(ckpt)


def test_missing_tensor_is_named_with_shape(ckpt):
    edit_weights(ckpt, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 tensors missing.*model\.layers\.1\.mlp\.up_proj\.weight.*\(160, 64\)"):
        minitune.load_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    edit_weights(ckpt, lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"no place for.*model\.layers\.9\.mlp\.up_proj\.weight"):
        minitune.load_pretrained(ckpt)


def test_misshaped_tensor_names_file_tensor_and_both_shapes(ckpt):
    edit_weights(ckpt, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(63,\).*expects \(64,\)"):
        minitune.load_pretrained(ckpt)


def test_truncated_file_is_reported(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor .* ends at byte"):
        minitune.load_pretrained(ckpt)


def test_corrupt_file_is_reported(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged or not a safetensors file"):
        minitune.load_pretrained(ckpt)


def test_missing_shard_is_reported(tmp_path):
    write_checkpoint("llama2", tmp_path, sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {shard}, which does not exist"):
        minitune.load_pretrained(tmp_path)


def test_crash_while_saving_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2))
    out = tmp_path / "ckpt"
    minitune.save_pretrained(model, None, out)
    before = sorted(os.listdir(out)), (out / "model.safetensors").read_bytes()

    import minitune.model.checkpoint as ck
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        minitune.save_pretrained(model, None, out, max_shard_size=20_000)  # several shards: dies mid-way
    assert (sorted(os.listdir(out)), (out / "model.safetensors").read_bytes()) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind


def test_loading_peak_host_memory_stays_near_one_copy(tmp_path):
    """Stream tensor by tensor: loading a bf16 checkpoint as bf16 or as fp32 peaks near the size
    of the loaded model, not at an extra full copy (the file, or an fp32 staging model); loading it
    as NF4 peaks well below the bf16 model, so a checkpoint too big for memory in bf16 still loads."""
    model = Transformer(ModelConfig(vocab_size=2000, hidden_size=512, intermediate_size=1408,
                                    num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2))
    minitune.save_pretrained(model.to(torch.bfloat16), None, tmp_path / "big")
    minitune.save_pretrained(Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2)), None, tmp_path / "small")
    script = textwrap.dedent(f"""
        import sys, torch, minitune
        def rss(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
        minitune.load_model({str(tmp_path / 'small')!r})  # first-use costs (lazy imports) out of the way
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
        base = rss("VmRSS")
        quantize = "nf4" if sys.argv[1] == "nf4" else None
        m = minitune.load_model({str(tmp_path / 'big')!r}, dtype=None if quantize else sys.argv[1], quantize=quantize)
        size = {str(model.num_parameters() * 2)} if quantize else sum(p.numel() * p.element_size() for p in m.parameters())
        print((rss("VmHWM") - base) / size)
    """)
    for dtype, bound in (("bfloat16", 1.3), ("float32", 1.3), ("nf4", 0.7)):  # nf4: vs the bf16 model
        # fixed mmap threshold: freed per-tensor temporaries go back to the OS instead of staying in
        # glibc's heap, so RSS measures what the loader holds, not the allocator's fragmentation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        ratio = float(subprocess.check_output([sys.executable, "-c", script, dtype], text=True, env=env).strip())
        print(f"{dtype}: peak {ratio:.2f}x")
        assert ratio < bound, f"{dtype}: peak host memory {ratio:.2f}x the loaded model"
