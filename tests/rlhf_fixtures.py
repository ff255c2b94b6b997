"""Small worlds shared by the RLHF tests (reward model, DPO, PPO, GRPO), so each test file keeps only
what it tests.

- `pair_world(pairs)`: a BPE tokenizer trained on preference pairs' text and a 2-layer config for it;
- the token world of the rollout loops: a 16-token vocabulary, PAD 0, EOS 1, and a rule reward that
  pays for TARGET tokens, with prompts of two lengths so left padding happens.
"""

import torch

from minitune.model import ModelConfig, Transformer
from minitune.rlhf import sample_rollout
from minitune.tokenizer.bpe_trainer import train_bpe

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def pair_world(pairs: list[dict]):
    """(config, tokenizer) for a tiny model that reads these {"prompt", "chosen", "rejected"} rows."""
    lines = [f"{r['prompt']} {r['chosen']} {r['rejected']}" for r in pairs]
    tok = train_bpe(lines, vocab_size=300, special_tokens=SPECIALS, eos_token="<|endoftext|>",
                    pad_token="<|endoftext|>")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_id)
    return cfg, tok


def fresh_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


# --- the token world of the PPO and GRPO loops ---------------------------------------------------
PAD, EOS, TARGET = 0, 1, 5
CFG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
PROMPTS = [[2 + i % 7, 3 + i % 5, 4][: 2 + i % 2] for i in range(32)]  # lengths 2 and 3: left padding happens


def tiny(seed: int = 0) -> Transformer:
    return fresh_model(CFG, seed)


def target_rate(prompt_ids, response_ids) -> float:
    """The rule reward: the fraction of response tokens that are TARGET (EOS excluded)."""
    body = [t for t in response_ids if t != EOS]
    return sum(t == TARGET for t in body) / max(len(body), 1)


def mean_target_rate(actor, n: int = 64, seed: int = 123) -> float:
    roll = sample_rollout(actor, [PROMPTS[i % len(PROMPTS)] for i in range(n)], 6, [EOS], PAD, seed=seed)
    rows = [[t for t, m in zip(r, mk) if m] for r, mk in zip(roll.responses.tolist(), roll.response_mask.tolist())]
    return sum(target_rate(None, r) for r in rows) / n
