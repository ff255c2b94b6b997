"""Rollouts: sampling responses and reading their log-probabilities (PPO and GRPO share these).

Steps 1-2 of every RL step in lessons 11 and 13:

    1. rollout:  sample a response to each prompt with the actor (the KV-cache generator of
                 lesson 03); the response runs up to and including its first stop token
    2. score:    log pi(a_t|s_t) of every response token under the actor and the reference,
                 and one score per response from a reward model or a rule

Shapes: B = rollouts, P = prompt columns (left-padded), N = response columns, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..data.templates import render
from ..generation import generate
from ..peft.lora import disable_lora
from .logprobs import entropy_from_logits, logprobs_from_logits

__all__ = ["Rollout", "left_pad", "response_mask_from", "sample_rollout", "response_logprobs", "reference_logprobs",
           "user_message", "text_reward", "score_responses"]


@dataclass
class Rollout:
    """One batch of sampled responses. P = prompt columns (left-padded), N = response columns."""

    ids: torch.Tensor  # [B, P + N] prompt then response tokens
    attention_mask: torch.Tensor  # [B, P + N] 1 = real (left padding and after-EOS filler are 0)
    response_mask: torch.Tensor  # [B, N] real response tokens, the stop token included
    prompt_len: int  # P

    @property
    def responses(self) -> torch.Tensor:  # [B, N]
        return self.ids[:, self.prompt_len:]

    def index(self, rows) -> "Rollout":
        return Rollout(self.ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) left-padded, so every row's next token is column P."""
    P = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def response_mask_from(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[B, N] -> [B, N] 1 up to and including the first stop token (all N if none: truncated)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    # stops strictly before column t: cumsum shifted right by one
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (before == 0).long()


@torch.no_grad()
def sample_rollout(actor: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   pad_id: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> Rollout:
    """Sample one response per prompt with the KV-cache generator."""
    device = next(actor.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)  # [B, P]
    was_training = actor.training
    actor.eval()
    out = generate(actor, ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=stop_ids,
                   attention_mask=mask, seed=seed)  # [B, P + N]
    actor.train(was_training)
    resp_mask = response_mask_from(out[:, ids.shape[1]:], stop_ids)  # [B, N]
    return Rollout(out, torch.cat([mask, resp_mask], dim=1), resp_mask, ids.shape[1])


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, as the generator used them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: nn.Module, roll: Rollout, with_entropy: bool = False, temperature: float = 1.0):
    """log pi(a_t | s_t) of every response token: -> logp [B, N] (and entropy [B, N]).

    The logits at column P-1+t predict response token t, hence the slice [P-1 : -1].
    ``temperature``: the logits are divided by it first, so that with the rollout's sampling temperature
    these are the log-probs of the distribution the tokens were drawn from (as trl and OpenAI's
    lm-human-preferences do); PPO's ratio and KL are then about the policy that actually acted.
    """
    logits = model(roll.ids, attention_mask=roll.attention_mask, position_ids=_positions(roll.attention_mask))
    logits = logits[:, roll.prompt_len - 1:-1]  # [B, N, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, roll.responses)
    if with_entropy:
        return logp, entropy_from_logits(logits)
    return logp


@torch.no_grad()
def reference_logprobs(reference: nn.Module | None, actor: nn.Module, roll: Rollout,
                       temperature: float = 1.0) -> torch.Tensor:
    """log pi_ref of the response tokens (logits divided by ``temperature``, as for the actor).
    reference=None: the actor with its LoRA adapters off (the same frozen base weights the actor
    started from), so no second copy of the model."""
    if reference is not None:
        return response_logprobs(reference, roll, temperature=temperature)
    with disable_lora(actor):
        return response_logprobs(actor, roll, temperature=temperature)


def user_message(prompt_text: str, template: str = "chatml") -> str | None:
    """The user's message inside a one-turn prompt rendered by ``template`` with the generation prompt
    ("<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n" -> "What is 3+4?"), or None
    when ``prompt_text`` is not such a prompt (several turns, another template)."""
    before, after = render(template, [{"role": "user", "content": "\x00"}], add_generation_prompt=True).split("\x00")
    fits = len(prompt_text) >= len(before) + len(after)
    if not (fits and prompt_text.startswith(before) and prompt_text.endswith(after)):
        return None
    return prompt_text[len(before):len(prompt_text) - len(after)]


def text_reward(rule, tok, stop_ids: list[int], template: str | None = "chatml"):
    """Turn a text rule ``rule(prompt, response) -> float`` into the token reward ``score_responses`` takes.

    The rule gets the user's message, not the rendered prompt. Decoded, a ChatML prompt reads
    "user\nReverse the words: sun fish apple\nassistant\n", and a rule written for the bare question
    can misread the role names around it: the tiny world's reversal check wants the word list at the
    end of the text, found "assistant" there, and paid nothing for a correct reversal.
    ``template``: how the prompts were rendered; a prompt that is not one user turn of it (or
    template=None) goes to the rule whole, special tokens dropped. The response is decoded without
    its stop tokens and stripped.
    """
    def reward(prompt_ids: list[int], response_ids: list[int]) -> float:
        prompt = user_message(tok.decode(prompt_ids), template) if template else None
        if prompt is None:
            prompt = tok.decode(prompt_ids, skip_special_tokens=True)
        response = tok.decode([t for t in response_ids if t not in stop_ids], skip_special_tokens=True).strip()
        return float(rule(prompt, response))
    return reward


@torch.no_grad()
def score_responses(reward, roll: Rollout) -> torch.Tensor:
    """Sequence scores [B]: a reward model (nn.Module, read at the last real token) or a rule
    ``reward(prompt_ids, response_ids) -> float`` on the real tokens of each row."""
    if isinstance(reward, nn.Module):
        return reward(roll.ids, roll.attention_mask).float()
    P, scores = roll.prompt_len, []
    for ids, m in zip(roll.ids.tolist(), roll.attention_mask.tolist()):
        prompt = [t for t, real in zip(ids[:P], m[:P]) if real]
        response = [t for t, real in zip(ids[P:], m[P:]) if real]
        scores.append(float(reward(prompt, response)))
    return torch.tensor(scores, device=roll.ids.device)
