"""Prompt tuning and P-tuning: given PEFT's prompt-encoder weights, minitune's soft prompt gives PEFT's
logits and greedy text (GQA qwen2, MHA llama2); text init, parameter counts, training and errors."""

import warnings

import pytest
import torch
from hf_factory import full_forward_greedy, hf_model, rel_error, write_checkpoint
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

import minitune
from minitune.model import ModelConfig
from minitune.peft.prompt import (PromptTuningModel, PTuningModel, p_tuning_num_params, prompt_tuning_num_params,
                                  text_init_ids)

N = 4
IDS = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(0))
PADDED = torch.ones(2, 11, dtype=torch.long)
PADDED[1, :4] = 0  # row 1 is left-padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints and a word-level tokenizer ("w7" -> id 10) that AutoTokenizer loads, for TEXT init."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("prompt")
    for kind in ("qwen2", "llama2"):
        write_checkpoint(kind, root / kind)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(300)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "tokenizer")
    return root


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_pair(checkpoints, kind, peft_config, ours_cls, **kw):
    torch.manual_seed(3)
    ref = get_peft_model(hf_model(kind), peft_config).eval()
    ours = ours_cls(minitune.load_model(checkpoints / kind), peft_config.num_virtual_tokens, **kw).eval()
    ours.prompt_encoder.load_state_dict(ref.prompt_encoder["default"].state_dict())  # strict: same names, shapes
    return ours, ref


def prompt_tuning(checkpoints, kind):
    return make_pair(checkpoints, kind, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                     PromptTuningModel)


def p_tuning(checkpoints, kind, encoder, hidden=24, layers=2):
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_reparameterization_type=encoder,
                              encoder_hidden_size=hidden, encoder_num_layers=layers)
    return make_pair(checkpoints, kind, cfg, PTuningModel, encoder=encoder.lower(), encoder_hidden_size=hidden,
                     encoder_num_layers=layers)


METHODS = {"prompt": prompt_tuning, "ptuning-mlp": lambda c, k: p_tuning(c, k, "MLP"),
           "ptuning-lstm": lambda c, k: p_tuning(c, k, "LSTM")}


@pytest.mark.parametrize("kind", ["qwen2", "llama2"])
@pytest.mark.parametrize("method", METHODS)
def test_logits_match_peft_and_counts_equal_peft(checkpoints, kind, method):
    ours, ref = METHODS[method](checkpoints, kind)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits  # PEFT returns the virtual positions too: [B, N + T, V]
        got = ours(IDS)  # ours only the real tokens' [B, T, V]
        assert want.shape == (2, N + 11, 320) and got.shape == (2, 11, 320)
        assert rel_error(got, want[:, N:]) < 1e-5
        assert rel_error(ours.base(IDS), want[:, N:]) > 0.05  # the soft prompt does change the output
        want = ref(input_ids=IDS, attention_mask=PADDED).logits[:, N:]
        got = ours(IDS, attention_mask=PADDED)
        assert rel_error(got[0], want[0]) < 1e-5 and rel_error(got[1, 4:], want[1, 4:]) < 1e-5
        assert rel_error(ours.get_prompt(2), ref.get_prompt(2)) < 1e-6
    assert trainable(ours) == ref.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("encoder,hidden,layers", [("mlp", None, 2), ("mlp", 24, 2), ("lstm", 24, 1),
                                                   ("lstm", 24, 3), ("lstm", None, 2)])
def test_p_tuning_count_formula(encoder, hidden, layers):
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = PTuningModel(minitune.Transformer(cfg), 3, encoder, hidden, layers)
    assert trainable(model) == p_tuning_num_params(cfg, 3, encoder, hidden, layers)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_generate_equals_peft_full_forward_greedy(checkpoints, method):
    ours, ref = METHODS[method](checkpoints, "llama2")
    want = full_forward_greedy(ref, IDS, 10)  # PEFT's forward, not its generate path (changes between releases)
    assert torch.equal(minitune.generate(ours, IDS, 10), want)


def test_left_padded_generate_equals_recomputing_without_cache(checkpoints):
    """With padding PEFT numbers positions through the padding; minitune.generate counts real tokens
    only, so the padded row must give what the unpadded prompt gives."""
    ours, _ = prompt_tuning(checkpoints, "qwen2")
    got = minitune.generate(ours, IDS, 10, attention_mask=PADDED)
    seq = IDS[1:, 4:]
    with torch.no_grad():
        for _ in range(10):  # no cache, no padding: soft prompt + the whole sequence each step
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got[1, 4:], seq[0])


@pytest.mark.parametrize("text,n", [("w5 w7 w9", 7), ("w5 w7 w9 w11", 4), ("w5 w7 w9 w11 w13", 2)])
def test_text_init_equals_peft(checkpoints, text, n):
    from transformers import AutoTokenizer

    tok_dir = str(checkpoints / "tokenizer")
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text=text, tokenizer_name_or_path=tok_dir)
    ref = get_peft_model(hf_model("llama2"), cfg)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = PromptTuningModel(minitune.load_model(checkpoints / "llama2"), n, init="text", init_text=text,
                                 tokenizer=tok)
    truncated = len(text.split()) > n  # PEFT cuts silently; we warn
    assert any("only the first" in str(w.message) for w in caught) == truncated
    assert torch.equal(ours.prompt_encoder.embedding.weight, ref.prompt_encoder["default"].embedding.weight)
    assert text_init_ids([8, 10, 12], 7) == [8, 10, 12, 8, 10, 12, 8]


@pytest.mark.parametrize("cls", [PromptTuningModel, PTuningModel])
def test_training_moves_only_the_prompt_and_lowers_the_loss(checkpoints, cls):
    ours = cls(minitune.load_model(checkpoints / "qwen2"), N)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(ours(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in ours.base.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_7b_formulas():
    llama7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, model_type="llama")
    assert prompt_tuning_num_params(llama7b, 20) == 20 * 4096 == 81_920
    assert p_tuning_num_params(llama7b, 20, "mlp") == 20 * 4096 + 3 * (4096 * 4096 + 4096) == 50_425_856


class _Tok:
    def __init__(self, ids):
        self.ids = ids

    def encode(self, text):
        return self.ids


@pytest.mark.parametrize("make,match", [
    (lambda b: PromptTuningModel(b, 0), "num_virtual_tokens"),
    (lambda b: PTuningModel(b, -2), "num_virtual_tokens"),
    (lambda b: PromptTuningModel(b, 1.5), "num_virtual_tokens"),
    (lambda b: PTuningModel(b, 4, encoder="gru"), "'mlp' or 'lstm'"),
    (lambda b: PromptTuningModel(b, 4, init="text"), "init_text and a tokenizer"),
    (lambda b: PromptTuningModel(b, 4, init="text", init_text="", tokenizer=_Tok([])), "no tokens"),
    (lambda b: PromptTuningModel(b, 4, init="text", init_text="x", tokenizer=_Tok([3, 50])), "vocabulary"),
    (lambda b: PromptTuningModel(b, 4, init="texts"), "init must be"),
])
def test_bad_input_is_a_clear_error(make, match):
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match=match):
        make(minitune.Transformer(cfg))
