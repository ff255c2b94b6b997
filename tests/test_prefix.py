"""Prefix tuning: given PEFT's prompt-encoder weights, minitune's prefix gives PEFT's logits and greedy
text (GQA qwen2 and MHA llama2, direct and reparameterised); counts, training and errors."""

import pytest
import torch
from hf_factory import full_forward_greedy, hf_model, rel_error, write_checkpoint
from peft import PrefixTuningConfig, get_peft_model

import minitune
from minitune.model import ModelConfig
from minitune.peft.prefix import PrefixTuningModel, prefix_tuning_num_params

N = 5
IDS = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(0))
PADDED = torch.ones(2, 11, dtype=torch.long)
PADDED[1, :4] = 0  # row 1 is left-padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    for kind in ("qwen2", "llama2"):
        write_checkpoint(kind, root / kind)
    return root


def make_pair(checkpoints, kind, projection, hidden=None):
    """PEFT's prefix model on the transformers checkpoint, ours on the same weights, same prefix params."""
    torch.manual_seed(3)
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                             encoder_hidden_size=hidden)
    ref = get_peft_model(hf_model(kind), cfg).eval()
    ours = PrefixTuningModel(minitune.load_model(checkpoints / kind), N, prefix_projection=projection,
                             encoder_hidden_size=hidden).eval()
    ours.prompt_encoder.load_state_dict(ref.prompt_encoder["default"].state_dict())  # strict: same names, shapes
    return ours, ref


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


CASES = [("qwen2", False, None), ("qwen2", True, None), ("llama2", False, None), ("llama2", True, 24)]


@pytest.mark.parametrize("kind,projection,hidden", CASES)
def test_logits_match_peft(checkpoints, kind, projection, hidden):
    ours, ref = make_pair(checkpoints, kind, projection, hidden)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits  # prefix tuning adds no positions to the output: [B, T, V]
        got = ours(IDS)
        assert got.shape == want.shape == (2, 11, 320)
        assert rel_error(got, want) < 1e-5
        assert rel_error(ours.base(IDS), want) > 0.05  # the prefix does change the output
        want = ref(input_ids=IDS, attention_mask=PADDED).logits
        got = ours(IDS, attention_mask=PADDED)
    assert rel_error(got[0], want[0]) < 1e-5 and rel_error(got[1, 4:], want[1, 4:]) < 1e-5


@pytest.mark.parametrize("kind,projection,hidden", CASES)
def test_get_prompt_equals_peft_cache_and_counts_equal_peft(checkpoints, kind, projection, hidden):
    ours, ref = make_pair(checkpoints, kind, projection, hidden)
    with torch.no_grad():
        cache = ref.get_prompt(batch_size=2)  # a DynamicCache holding the prefix
        mine = ours.get_prompt(batch_size=2)
    kv_heads = ours.base.config.num_key_value_heads
    for layer, (k, v) in enumerate(mine):
        assert k.shape == (2, kv_heads, N, ours.base.config.head_dim)  # GQA: kv heads, not attention heads
        # bitwise without the MLP; with it PEFT runs the MLP per row, we once for all rows
        assert rel_error(k, cache.layers[layer].keys) < 1e-6 and rel_error(v, cache.layers[layer].values) < 1e-6
    assert trainable(ours) == ref.get_nb_trainable_parameters()[0]
    assert trainable(ours) == prefix_tuning_num_params(ours.base.config, N, projection, hidden)


@pytest.mark.parametrize("kind,projection", [("qwen2", False), ("llama2", True)])
@pytest.mark.parametrize("mask", [None, PADDED], ids=["unpadded", "left-padded"])
def test_greedy_generate_equals_peft_full_forward_greedy(checkpoints, kind, projection, mask):
    ours, ref = make_pair(checkpoints, kind, projection)
    # PEFT's forward, not its generate path; padding takes no position, as in minitune.generate
    want = full_forward_greedy(ref, IDS, 10, attention_mask=mask, positions_from_mask=True)
    assert torch.equal(minitune.generate(ours, IDS, 10, attention_mask=mask), want)


def test_cached_generate_equals_recomputing_with_the_prefix(checkpoints):
    ours, _ = make_pair(checkpoints, "qwen2", True)
    got = minitune.generate(ours, IDS[:1], 12)
    seq = IDS[:1]
    with torch.no_grad():
        for _ in range(12):  # no cache: prefix + the whole sequence each step
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_training_moves_only_the_prefix_and_lowers_the_loss(checkpoints):
    ours, _ = make_pair(checkpoints, "llama2", True)
    base_before = {k: v.clone() for k, v in ours.base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        logits = ours(IDS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in ours.base.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, ours.base.state_dict()[k]) for k, v in base_before.items())


def test_7b_formula():
    llama7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, model_type="llama")
    assert prefix_tuning_num_params(llama7b, 20) == 20 * 2 * 32 * 4096 == 5_242_880
    # reparameterised: embedding 20 x 4096, Linear(4096, 4096), Linear(4096, 2*32*4096)
    assert prefix_tuning_num_params(llama7b, 20, True) == 20 * 4096 + 4096 * 4097 + 4097 * 2 * 32 * 4096


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_virtual_tokens_is_an_error(n):
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningModel(minitune.Transformer(cfg), n)


def test_a_used_cache_without_positions_is_refused(checkpoints):
    ours, _ = make_pair(checkpoints, "qwen2", False)
    cache = minitune.model.KVCache(20)
    cache.update(0, *ours.get_prompt(1)[0])  # buffers exist, length still 0
    with pytest.raises(ValueError, match="fresh KVCache"):
        ours(IDS[:1], cache=cache)
