"""Soft prompts: prompt tuning and P-tuning. The model stays frozen; n learned vectors go in front
of the input embeddings, where n "virtual tokens" of a text prompt would be:

    x = [P ; embed(ids)]           P: [n, hidden]          logits of the real tokens are kept

* Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
  P itself is the parameter (n * hidden numbers), randomly initialised or from the embeddings of a
  text such as "Classify the sentiment:". It works well only for large models.
* P-tuning (Liu et al. 2021, "GPT Understands, Too"): P = encoder(E), E: [n, hidden] learned, the
  encoder an MLP, or a bidirectional LSTM followed by an MLP, so that the virtual tokens depend on
  each other; this trains more stably than free vectors. Only P is needed at inference.

Unlike prefix tuning, the virtual tokens are real inputs: they get positions 0..n-1, RoPE, and a
query of their own, and pass through every layer. Modules and parameter names are PEFT's
(`embedding`, `lstm_head`, `mlp_head`), so its `prompt_encoder` weights load with load_state_dict.

The wrappers return logits of the real tokens only, [B, T, vocab] (PEFT returns [B, n + T, vocab]:
compare with its `logits[:, n:]`), so a trainer's labels line up without padding them.
"""

import math
import warnings

import torch
import torch.nn as nn

from ..model.kv_cache import KVCache


def _check_num_virtual_tokens(n):
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")


def text_init_ids(token_ids: list[int], num_virtual_tokens: int) -> list[int]:
    """PEFT's rule for initialising n virtual tokens from a text of m tokens: the first n if m > n,
    else the text repeated and cut to n ("abc", n=7 -> "abcabca")."""
    if not token_ids:
        raise ValueError("prompt init text encodes to no tokens")
    if len(token_ids) > num_virtual_tokens:
        warnings.warn(f"prompt init text has {len(token_ids)} tokens; only the first {num_virtual_tokens} are used")
    return (list(token_ids) * math.ceil(num_virtual_tokens / len(token_ids)))[:num_virtual_tokens]


class PromptEmbedding(nn.Module):
    """Prompt tuning: the soft prompt is the parameter. forward() -> [n, hidden]."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)  # N(0, 1), PEFT's "RANDOM"

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's encoder: E [n, hidden] -> MLP, or -> BiLSTM -> MLP, -> P [n, hidden].

    mlp:  Linear(hidden, h) ReLU Linear(h, h) ReLU Linear(h, hidden)
    lstm: LSTM(hidden -> h per direction, num_layers, bidirectional) then Linear(2h, 2h) ReLU Linear(2h, hidden)
    """

    def __init__(self, num_virtual_tokens: int, hidden_size: int, encoder: str = "mlp",
                 encoder_hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        h = encoder_hidden_size or hidden_size
        self.encoder = encoder.lower()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
        if self.encoder == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, h, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, hidden_size))
        elif self.encoder == "mlp":  # always three layers (PEFT ignores num_layers here, so do we)
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, hidden_size))
        else:
            raise ValueError(f"P-tuning encoder must be 'mlp' or 'lstm', got {encoder!r}")

    def forward(self) -> torch.Tensor:
        # BEGIN EXERCISE 08.3: P-tuning's prompt encoder
        e = self.embedding.weight[None]  # [1, n, hidden]: the LSTM reads the virtual tokens as one sequence
        if self.encoder == "lstm":
            e = self.lstm_head(e)[0]  # [1, n, 2h]
        return self.mlp_head(e)[0]  # [n, hidden]
        # END EXERCISE


class SoftPromptModel(nn.Module):
    """A frozen `Transformer` with a soft prompt in front of every input.

    `forward` -> logits [B, T, vocab] of the real tokens; `hidden_states` and `lm_head` as the base
    model, so `minitune.generate` works: the prompt goes in on the first (prefill) call only, and
    later tokens find its keys/values in the cache.
    """

    def __init__(self, base, prompt_encoder: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.prompt_encoder = prompt_encoder.to(next(base.parameters()).device)
        self.num_virtual_tokens = num_virtual_tokens

    @property
    def lm_head(self):
        return self.base.lm_head

    @property
    def config(self):
        return self.base.config

    def get_prompt(self, batch_size: int = 1) -> torch.Tensor:
        """The soft prompt as the model reads it: [B, n, hidden] (PEFT `get_prompt`)."""
        p = self.prompt_encoder()  # computed once, shared by every row
        return p[None].expand(batch_size, *p.shape)

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None, inputs_embeds=None):
        """Final-norm hidden states [B, T, hidden] of the real tokens; mask [B, past+T] and
        position ids are in the caller's frame, without the virtual tokens."""
        x = self.base.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, n = x.shape[0], self.num_virtual_tokens
        prefill = cache is None or cache.length == 0
        if prefill:
            if cache is not None:
                if cache.keys:
                    raise ValueError("cache has buffers but no positions; pass a fresh KVCache")
                cache.max_len += n  # generate() sized it for the real tokens only; buffers are allocated lazily
            x = torch.cat([self.get_prompt(B).to(x.dtype), x], dim=1)  # [B, n + T, hidden]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
        if position_ids is not None:  # virtual tokens take 0..n-1, real ones move up by n
            position_ids = position_ids + n
            if prefill:
                virtual = torch.arange(n, device=x.device).expand(B, n)
                position_ids = torch.cat([virtual, position_ids], dim=1)
        h = self.base.hidden_states(None, attention_mask, position_ids, cache, x)
        return h[:, n:] if prefill else h

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, inputs_embeds=None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds))


class PromptTuningModel(SoftPromptModel):
    """Prompt tuning (Lester et al. 2021). init: "random" (N(0, 1)), "sample_vocab" (embeddings of random
    vocabulary tokens) or "text" (embeddings of `init_text`'s tokens, repeated or cut to n as PEFT does;
    `tokenizer` is anything with `.encode(text) -> ids`, e.g. minitune's or a transformers tokenizer)."""

    def __init__(self, base, num_virtual_tokens: int, init: str = "random", init_text: str | None = None,
                 tokenizer=None):
        _check_num_virtual_tokens(num_virtual_tokens)
        if init not in ("random", "sample_vocab", "text"):
            raise ValueError(f"init must be 'random', 'sample_vocab' or 'text', got {init!r}")
        embed = base.model.embed_tokens
        encoder = PromptEmbedding(num_virtual_tokens, embed.embedding_dim)
        ids = None
        if init == "text":
            if init_text is None or tokenizer is None:
                raise ValueError("init='text' needs init_text and a tokenizer")
            ids = torch.tensor(text_init_ids(tokenizer.encode(init_text), num_virtual_tokens))
            if int(ids.min()) < 0 or int(ids.max()) >= embed.num_embeddings:
                raise ValueError(f"init text token ids fall outside the model's vocabulary ({embed.num_embeddings})")
        elif init == "sample_vocab":
            ids = torch.randint(0, embed.num_embeddings, (num_virtual_tokens,))
        if ids is not None:  # a copy in float32, as PEFT keeps it, whatever the model's dtype
            encoder.embedding.weight.data = embed.weight.detach()[ids.to(embed.weight.device)].float().cpu()
        super().__init__(base, encoder, num_virtual_tokens)


class PTuningModel(SoftPromptModel):
    """P-tuning (Liu et al. 2021): the soft prompt from a `PromptEncoder` ("mlp" or "lstm")."""

    def __init__(self, base, num_virtual_tokens: int, encoder: str = "mlp", encoder_hidden_size: int | None = None,
                 encoder_num_layers: int = 2, encoder_dropout: float = 0.0):
        _check_num_virtual_tokens(num_virtual_tokens)
        prompt_encoder = PromptEncoder(num_virtual_tokens, base.config.hidden_size, encoder, encoder_hidden_size,
                                       encoder_num_layers, encoder_dropout)
        super().__init__(base, prompt_encoder, num_virtual_tokens)


def prompt_tuning_num_params(cfg, num_virtual_tokens: int) -> int:
    """n * hidden. LLaMA-7B, n = 20: 20 * 4096 = 81,920 (0.001% of 6.7B)."""
    return num_virtual_tokens * cfg.hidden_size


def p_tuning_num_params(cfg, num_virtual_tokens: int, encoder: str = "mlp", encoder_hidden_size: int | None = None,
                        encoder_num_layers: int = 2) -> int:
    """Embedding n * d plus the encoder (d = hidden, h = encoder hidden; Linear(a, b) has a*b + b):
    mlp:  (d h + h) + (h h + h) + (h d + d)
    lstm: per direction, layer 0: 4h (d + h) + 8h, later layers 4h (2h + h) + 8h; then (2h 2h + 2h) + (2h d + d).
    LLaMA-7B, n = 20, mlp with h = d = 4096: 81,920 + 3 * (4096^2 + 4096) = 50,425,856."""
    d = cfg.hidden_size
    h = encoder_hidden_size or d
    if encoder == "mlp":
        head = (d * h + h) + (h * h + h) + (h * d + d)
    elif encoder == "lstm":
        lstm = sum(2 * (4 * h * ((d if i == 0 else 2 * h) + h) + 8 * h) for i in range(encoder_num_layers))
        head = lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    else:
        raise ValueError(f"P-tuning encoder must be 'mlp' or 'lstm', got {encoder!r}")
    return num_virtual_tokens * d + head
