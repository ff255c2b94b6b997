"""A text rule as the RL reward (rollout.text_reward): the rule sees the user's message, not the
chat-rendered prompt around it. Regression test: rendered through ChatML and decoded, a tiny-world
reversal prompt ends in "assistant", the reversal check found no question there, and PPO (lesson 11)
was never paid for a correct reversal."""

import pytest
import torch

from minitune.data import encode_segments, get_template
from minitune.rlhf import score_responses, text_reward, user_message
from minitune.rlhf.rollout import Rollout
from minitune.tiny.tasks import preference_score
from minitune.tokenizer.bpe_trainer import train_bpe

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tok():
    lines = ["Reverse the words: sun fish apple", "apple fish sun.", "What is 3+4? 7.", "user assistant"] * 20
    return train_bpe(lines, vocab_size=300, special_tokens=SPECIALS, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")


def chat_prompt(tok, question: str) -> list[int]:
    segments = get_template("chatml").segments([{"role": "user", "content": question}], add_generation_prompt=True)
    return encode_segments(tok, segments)[0]


def test_user_message_of_a_rendered_prompt():
    text = "<|im_start|>user\nReverse the words: sun fish apple<|im_end|>\n<|im_start|>assistant\n"
    assert user_message(text, "chatml") == "Reverse the words: sun fish apple"
    assert user_message("no template here", "chatml") is None
    assert user_message(text + "<|im_start|>user\nmore", "chatml") is None  # not one user turn


def test_the_rule_sees_the_question_and_a_correct_reversal_is_paid(tok):
    stops = [tok.token_to_id("<|im_end|>")]
    prompt = chat_prompt(tok, "Reverse the words: sun fish apple")
    reply = tok.encode("apple fish sun.") + stops
    seen = []

    def rule(p, r):
        seen.append((p, r))
        return preference_score(p, r)

    assert text_reward(rule, tok, stops)(prompt, reply) == 3.0  # +2 correct, +1 full stop
    assert seen == [("Reverse the words: sun fish apple", "apple fish sun.")]
    # Without a template the rule gets the whole decoded prompt, role names included; it used to read
    # the word list up to the end of the text ("apple\nassistant"), and now stops at the list's end.
    assert tok.decode(prompt, skip_special_tokens=True) == "user\nReverse the words: sun fish apple\nassistant\n"
    assert text_reward(preference_score, tok, stops, template=None)(prompt, reply) == 3.0


def test_score_responses_uses_the_rule_on_each_rollout_row(tok):
    stops, pad = [tok.token_to_id("<|im_end|>")], tok.pad_id
    p1, p2 = chat_prompt(tok, "What is 3+4?"), chat_prompt(tok, "Reverse the words: sun fish apple")
    r1, r2 = tok.encode("7.") + stops, tok.encode("sun fish apple") + stops
    P, N = max(len(p1), len(p2)), max(len(r1), len(r2))
    ids = torch.tensor([[pad] * (P - len(p)) + p + r + stops * (N - len(r)) for p, r in ((p1, r1), (p2, r2))])
    resp = torch.tensor([[1] * len(r) + [0] * (N - len(r)) for r in (r1, r2)])
    mask = torch.cat([torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in (p1, p2)]), resp], dim=1)
    scores = score_responses(text_reward(preference_score, tok, stops), Rollout(ids, mask, resp, P))
    assert scores.tolist() == [3.0, 0.0]  # right with a stop; a wrong reversal without one
