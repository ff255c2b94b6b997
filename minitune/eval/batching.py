"""Batched scoring without the full logits: left padding, and the LM head only where it is needed.

A forward pass over B sequences of T tokens makes logits of shape [B, T, V]; with a 150k vocabulary
that is the largest tensor by far, and evaluation needs only a few rows of it: the last position
(the answer letter), or the positions of a continuation's tokens. So the model runs up to its final
norm (`hidden_states`, [B, T, H]), and the LM head is applied to the chosen positions only.

Rows are padded on the left, so every row's last token sits at position T-1. Position ids count
real tokens only (0, 1, 2, ... from each row's first real token), and the attention mask hides the
padding: each row then computes exactly what it would alone.

    log p(x_t | x_<t) = logits_{t-1}[x_t] - logsumexp(logits_{t-1})
"""

from __future__ import annotations

import torch

HEAD_CHUNK = 1024  # positions per LM-head call: bounds the [N, V] logits held at once


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ids [B, T], attention mask [B, T] (0 on padding) and each row's padding length."""
    T = max(map(len, rows))
    pads = [T - len(r) for r in rows]
    ids = torch.tensor([[pad_id] * p + r for p, r in zip(pads, rows)], device=device)
    mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pads, rows)], device=device)
    return ids, mask, pads


def hidden(model, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """The final-norm states [B, T, H] of left-padded rows, and the padding lengths."""
    device = next(model.parameters()).device
    ids, mask, pads = left_pad(rows, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: 0 at each row's first real token
    return model.hidden_states(ids, attention_mask=mask, position_ids=positions), pads


@torch.no_grad()
def last_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each row's last token: [B, V], in float32."""
    h, _ = hidden(model, rows, pad_id)
    return model.lm_head(h[:, -1]).float()  # [B, H] -> [B, V]


@torch.no_grad()
def target_logprobs(model, rows: list[list[int]], starts: list[int], pad_id: int) -> list[torch.Tensor]:
    """For each row, log p(row[t] | row[:t]) for t = start .. len(row)-1: a list of [len(row) - start].

    start >= 1: the first token has nothing to be predicted from.
    """
    h, pads = hidden(model, rows, pad_id)  # [B, T, H]
    # the state at padded position p + t - 1 predicts row token t
    picks = [(b, pads[b] + t - 1, row[t]) for b, (row, s) in enumerate(zip(rows, starts)) for t in range(s, len(row))]
    out = []
    for i in range(0, len(picks), HEAD_CHUNK):
        chunk = picks[i:i + HEAD_CHUNK]
        b, pos, tok = (torch.tensor(x, device=h.device) for x in zip(*chunk))
        logits = model.lm_head(h[b, pos]).float()  # [N, V]
        out.append(logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))  # [N]
    flat = torch.cat(out) if out else torch.zeros(0)
    return list(flat.cpu().split([len(r) - s for r, s in zip(rows, starts)]))
