"""Trainable token rows (可训练词元行): train a few rows of the embedding matrix, and the same rows of
a tied LM head, beside any other parameter-efficient method.

A token pretraining never saw (a chat template's <|im_start|> / <|im_end|>, a newly added special
token) keeps its random row of the embedding E [V, d], and with tied embeddings the head scores it
with that same row. LoRA, adapters and soft prompts freeze E, so they can only steer the network
around the row; the model then struggles to read the token, or to emit it. Trainable tokens unfreeze
exactly those k rows:

    E' = E + S Δ          Δ [k, d] trainable, zero at the start (training starts at the base model);
                          S [V, k] puts row j of Δ at row i_j of E, i_j = token_indices[j]
    embed'(t)  = E[t] + Δ[j]  if t = i_j,  else E[t]
    logits'(h) = E' h = E h + S (Δ h)      tied head: logit i_j gains Δ[j] · h, no other logit moves

k * d numbers train; the tied head, being the same matrix, adds none (an untied head is left alone,
as PEFT does). E itself stays frozen and shared: `weight` is still the base matrix, and
`effective_weight()` is E' for code that multiplies by the matrix directly (the fused loss,
minitune/train/loss.py:causal_lm_loss).

This is PEFT's "trainable tokens" (`TrainableTokensConfig`, or `trainable_token_indices` in
`LoraConfig`), which keeps the head tied to the embedding's rows in the same way. LLaMA-Factory's
practice when it adds special tokens (`new_special_tokens` / `resize_vocab`) is to train the whole
`embed_tokens` and `lm_head` beside LoRA (`additional_target`, PEFT's `modules_to_save`), V * d
numbers each; trainable tokens train only the rows that need it.

One difference in representation: PEFT's tensor `trainable_tokens_delta` holds the new rows
themselves, E[i_j] + Δ[j], started as a copy of the old ones. Here Δ is the difference, so weight
decay pulls a row back towards the base model's, not towards zero. The PEFT file layout is
converted on the way out and in (`peft_rows`, `load_rows`): rows = E[idx] + Δ, Δ = rows - E[idx].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# where PEFT keeps the rows in a LoRA / AdaLoRA adapter file saved with trainable_token_indices (a tied head's
# rows are not stored: they are the embedding's)
PEFT_LORA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def check_token_indices(token_indices, vocab_size: int) -> list[int]:
    """The ids as a list of distinct ints inside the vocabulary, or a ValueError saying which is not."""
    ids = list(token_indices) if isinstance(token_indices, (list, tuple)) else None
    if not ids:
        raise ValueError(f"trainable tokens: give a non-empty list of token ids, got {token_indices!r}")
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"trainable tokens: token id {i!r} is not an int")
        if not 0 <= i < vocab_size:
            raise ValueError(f"trainable tokens: token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"trainable tokens: token ids {ids} repeat an id (each row can train once)")
    return ids


def token_ids(tokenizer, tokens) -> list[int]:
    """'<|im_start|>,<|im_end|>' (or a list) -> token ids. An item of digits is an id; any other item
    must be exactly one token of the tokenizer's vocabulary (a word that splits into pieces is not)."""
    items = tokens.split(",") if isinstance(tokens, str) else list(tokens)
    ids = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
            ids.append(int(text))
            continue
        if not text:
            continue
        i = tokenizer.token_to_id(text) if tokenizer is not None else None
        if i is None:
            where = "there is no tokenizer to look it up" if tokenizer is None else "it is not a token of the vocabulary"
            raise ValueError(f"trainable tokens: {text!r}: {where}; give one token such as '<|im_end|>', or its id")
        ids.append(i)
    return ids


class TrainableTokensEmbedding(nn.Embedding):
    """The base embedding (same frozen `weight`) with rows `token_indices` read as E[i_j] + delta[j]."""

    def __init__(self, base: nn.Embedding, token_indices: list[int]):
        # a meta-device shell with base's settings; the real matrix is base's Parameter itself, so a tied
        # head keeps sharing it and the state dict keeps its name (model.embed_tokens.weight)
        super().__init__(base.num_embeddings, base.embedding_dim, base.padding_idx, base.max_norm, base.norm_type,
                         base.scale_grad_by_freq, base.sparse, device="meta")
        self.weight = base.weight.requires_grad_(False)
        self._original = [base]  # a list: not a submodule; unload_trainable_tokens puts it back
        ids = check_token_indices(token_indices, base.num_embeddings)
        w = base.weight
        self.delta = nn.Parameter(torch.zeros(len(ids), base.embedding_dim, device=w.device, dtype=w.dtype))
        # buffers move with .to(); not persistent: a saved model holds E' (merged), never these
        self.register_buffer("token_indices", torch.tensor(ids, device=w.device), persistent=False)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=w.device)  # token -> row of delta
        slot[self.token_indices] = torch.arange(len(ids), device=w.device)
        self.register_buffer("slot", slot, persistent=False)

    def forward(self, ids):  # [B, T] -> [B, T, d]
        x = super().forward(ids)  # E[t], the frozen rows
        j = self.slot[ids]  # [B, T]: which row of delta each token takes, -1 for the untrained ones
        rows = self.delta.to(x.dtype)[j.clamp(min=0)]  # [B, T, d]
        return x + torch.where(j[..., None] >= 0, rows, 0)

    def effective_weight(self) -> torch.Tensor:
        """E' = E + S delta, [V, d]; differentiable in delta."""
        return self.weight.index_add(0, self.token_indices, self.delta.to(self.weight.dtype))

    def extra_repr(self):
        return f"{super().extra_repr()}, trainable rows {self.token_indices.tolist()}"


class TrainableTokensHead(nn.Linear):
    """A tied, bias-free LM head that scores with E': logits = E h, plus delta[j] . h on logit i_j.

    A subclass of nn.Linear so that code which treats the head as a linear layer (the decode weight
    layout in minitune/generation.py) still does; `type(head) is nn.Linear` is False, which keeps the
    fused loss from reading the frozen `weight` instead of `effective_weight()`.
    """

    def __init__(self, base: nn.Linear, rows: TrainableTokensEmbedding):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the embedding's matrix (tied)
        self._original = [base]
        self._rows = [rows]  # a list, so the module tree and the state dict hold delta once, under the embedding

    def forward(self, h):  # [..., d] -> [..., V]
        e = self._rows[0]
        z = F.linear(h, self.weight)
        # only k logits change: add their [..., k] corrections in place rather than build E' [V, d]
        return z.index_add_(-1, e.token_indices, F.linear(h, e.delta.to(z.dtype)).to(z.dtype))

    def effective_weight(self) -> torch.Tensor:
        return self._rows[0].effective_weight()


def language_model(model: nn.Module) -> nn.Module:
    """The Transformer itself, or the one a soft-prompt wrapper holds as `base`."""
    while isinstance(getattr(model, "base", None), nn.Module):
        model = model.base
    return model


def trainable_tokens_layer(model: nn.Module) -> TrainableTokensEmbedding | None:
    emb = language_model(model).model.embed_tokens
    return emb if isinstance(emb, TrainableTokensEmbedding) else None


def apply_trainable_tokens(model: nn.Module, token_indices: list[int]) -> nn.Module:
    """Train rows `token_indices` of the input embedding, and of the LM head when it is tied to it.

    Composes with every method here: call it on the model LoRA / AdaLoRA / adapters were applied to,
    or on a PrefixTuningModel / PromptTuningModel / PTuningModel (they read the base model's
    embed_tokens and lm_head). Only E is frozen here; what else trains is the method's business (on a
    bare model, model.requires_grad_(False) first trains the rows alone). Returns `model`.
    """
    lm = language_model(model)
    emb = lm.model.embed_tokens
    if isinstance(emb, TrainableTokensEmbedding):
        raise ValueError("the model already has trainable token rows; apply them once")
    rows = TrainableTokensEmbedding(emb, token_indices)
    tied = lm.lm_head.weight is emb.weight
    lm.model.embed_tokens = rows
    if tied:
        lm.lm_head = TrainableTokensHead(lm.lm_head, rows)
    return model


@torch.no_grad()
def unload_trainable_tokens(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain embedding (and head) back; with merge, first fold delta into E: E[i_j] += delta[j]
    (one write, which a tied head shares). Outputs do not change when merging."""
    lm = language_model(model)
    rows = trainable_tokens_layer(lm)
    if rows is None:
        return model
    if merge:
        rows.weight.index_add_(0, rows.token_indices, rows.delta.to(rows.weight.dtype))
    lm.model.embed_tokens = rows._original[0]
    if isinstance(lm.lm_head, TrainableTokensHead):
        lm.lm_head = lm.lm_head._original[0]
    return model


# ----------------------------------------------------------------------------- PEFT's file layout


@torch.no_grad()
def peft_rows(model: nn.Module) -> tuple[list[int], torch.Tensor] | None:
    """(token ids, their new rows E[i_j] + delta[j] [k, d]) as PEFT stores them; None: no trainable tokens."""
    rows = trainable_tokens_layer(model)
    if rows is None:
        return None
    return rows.token_indices.tolist(), rows.weight[rows.token_indices] + rows.delta.to(rows.weight.dtype)


def peft_token_indices(value, embed_name: str = "embed_tokens") -> list[int] | None:
    """A config's `trainable_token_indices`: a list of ids, or {module name: ids} with the embedding as the
    only module (the rows of a tied head follow it; other modules minitune does not train)."""
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)).split(".")[-1] != embed_name:
            raise ValueError(f"trainable_token_indices for {sorted(value)}: minitune trains rows of {embed_name} "
                             "(and of a head tied to it) only")
        value = next(iter(value.values()))
    return value


def add_peft_rows(model: nn.Module, config: dict, tensors: dict):
    """Put the trainable token rows into a LoRA / AdaLoRA adapter's config and tensors, as PEFT saves them."""
    found = peft_rows(model)
    if found is not None:
        config["trainable_token_indices"], tensors[PEFT_LORA_KEY] = found


def read_peft_rows(model: nn.Module, config: dict, tensors: dict) -> tuple[list[int], torch.Tensor] | None:
    """A LoRA / AdaLoRA adapter's (token ids, rows), checked against the model before anything changes, and
    taken out of `tensors`; None when the adapter trained no token rows. ValueError says what does not fit."""
    ids = peft_token_indices(config.get("trainable_token_indices"))
    rows = tensors.pop(PEFT_LORA_KEY, None)
    if ids is None and rows is None:
        return None
    if ids is None or rows is None:
        raise ValueError(f"trainable_token_indices {ids} in the config but tensor {PEFT_LORA_KEY} "
                         f"{'missing' if rows is None else 'present'} (both or neither)")
    emb = language_model(model).model.embed_tokens
    ids = check_token_indices(ids, emb.num_embeddings)
    if tuple(rows.shape) != (len(ids), emb.embedding_dim):
        raise ValueError(f"{PEFT_LORA_KEY} has shape {list(rows.shape)}, but {len(ids)} tokens of this model's "
                         f"embedding need {[len(ids), emb.embedding_dim]}")
    return ids, rows


@torch.no_grad()
def load_rows(model: nn.Module, token_indices: list[int], new_rows: torch.Tensor) -> nn.Module:
    """apply_trainable_tokens, then set delta = new_rows - E[idx], so that the rows read `new_rows` [k, d]
    (PEFT's values; read_peft_rows checks them against the model first)."""
    rows = trainable_tokens_layer(apply_trainable_tokens(model, token_indices))
    rows.delta.copy_(new_rows.to(rows.weight) - rows.weight[rows.token_indices])
    return model


def trainable_tokens_num_params(cfg, k: int) -> int:
    """k * hidden: the tied head adds nothing. Two chat tokens of LLaMA-7B: 2 * 4096 = 8,192."""
    return k * cfg.hidden_size
