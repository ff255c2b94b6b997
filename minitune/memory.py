"""How much memory does fine-tuning need? Parameters, gradients, optimizer states, activations.

Bytes per parameter, for the three methods of lessons 04-07 (p = parameter count):

    full, fp32 weights      4 (weights) + 4 (grads) + 8 (AdamW m, v in fp32)            = 16 p
    full, bf16/fp16 weights 2 (weights) + 2 (grads) + 4 (fp32 master copy) + 8 (AdamW)  = 16 p
    LoRA                    base weights in dtype, frozen: no grads, no moments;
                            the r * (in + out) adapter weights per adapted Linear train in fp32: 16 each
    QLoRA                   as LoRA, but the Linear weights of the blocks in 4-bit NF4 with double
                            quantisation (Dettmers et al. 2023): 0.5 + 1/64 + 4/(64*256) bytes each

(mixed-precision accounting as in Rajbhandari et al. 2020, ZeRO, section 3.1.)

Activations, the tensors autograd keeps for backward, grow with batch b and length s. Per layer,
per token, with hidden size h, key/value width kv = kv_heads * head_dim and MLP width i, a block
keeps roughly

    2h (the two RMSNorm inputs) + h (the normed input to q/k/v) + h + 2kv (q, k, v)
    + h (attention output) + h (normed MLP input) + 4i (gate, up, silu(gate), their product)
    = 6h + 2kv + 4i values,

in 2 bytes under bf16/fp16 autocast, else 4; no s x s score matrix is kept, since
scaled_dot_product_attention's fused kernels recompute it. The logits add b * s * vocab values in
fp32 twice (the logits and their gradient), often the largest single item for small models; with
the trainer's fused head + loss (train/loss.py) only one chunk of C rows exists at a time, twice
(its logits and their softmax), plus the b * s * h gradient the loss keeps for backward.
With fp32 weights under 16-bit autocast (the trainer's `bf16`), each matmul casts its weight to 16
bits and autograd keeps that copy for the backward: 2 bytes more per block Linear weight, and per
head weight when it trains (measured on an H100, Qwen2.5-0.5B's shape: without this line the
estimate missed ~0.7 GB of a LoRA run's 1.6 GB and ~1.0 GB of full fine-tuning's 8.0 GB).
It is a rough guide (allocator slack, temporary buffers and CUDA context come on top), which
is why the trainer prints torch.cuda.max_memory_allocated beside it on a GPU.
"""

from dataclasses import dataclass

import torch

from .model import ModelConfig
from .train.loss import chunk_rows

GB = 1e9
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit block absmax + fp32 absmax per 256 blocks


def _bytes(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.tensor([], dtype=dtype).element_size()


def layer_linears(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the Linear layers in one block."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'linear': block Linear weights, 'other': embeddings, head, norms, biases}, summed over layers."""
    lin = layer_linears(cfg)
    weights = sum(a * b for a, b in lin.values())
    biases = 0
    if cfg.qkv_bias:
        biases += sum(lin[n][1] for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.o_bias:
        biases += cfg.hidden_size
    if cfg.mlp_bias:
        biases += 2 * cfg.intermediate_size + cfg.hidden_size
    norms = 2 * cfg.hidden_size + (2 * cfg.head_dim if cfg.qk_norm else 0)
    L = cfg.num_hidden_layers
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else embed
    return {"linear": L * weights, "other": L * (biases + norms) + embed + head + cfg.hidden_size}


def count_parameters(cfg: ModelConfig) -> int:
    """Exactly Transformer(cfg).num_parameters(), from the config alone (a formula: no model is built).
    To count a built model's parameters, trainable and total, use minitune.peft.count_parameters(model)."""
    return sum(parameter_counts(cfg).values())


def lora_parameters(cfg: ModelConfig, r: int, targets=ALL_LINEAR) -> int:
    """r * (in + out) per adapted Linear: A is [r, in], B is [out, r]."""
    return cfg.num_hidden_layers * sum(r * (a + b) for n, (a, b) in layer_linears(cfg).items() if n in targets)


@dataclass
class MemoryEstimate:
    method: str
    dtype: str
    n_params: int
    n_trainable: int
    batch_size: int
    seq_len: int
    parameters: float  # bytes
    gradients: float
    optimizer_states: float
    master_weights: float
    activations: float
    weight_copies: float = 0.0  # 16-bit casts of fp32 weights that autocast makes and autograd keeps

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer_states + self.master_weights + self.activations
                + self.weight_copies)

    def __str__(self) -> str:
        p = self.n_params
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("AdamW moments (2 x fp32)", self.optimizer_states), ("fp32 master weights", self.master_weights),
                (f"activations (batch {self.batch_size} x {self.seq_len} tokens)", self.activations)]
        if self.weight_copies:
            rows.append(("16-bit weight copies (autocast)", self.weight_copies))
        width = max(len(name) for name, _ in rows) + 2
        lines = [f"memory estimate: {self.method} fine-tuning, weights in {self.dtype}, "
                 f"{_count(self.n_trainable)} of {_count(p)} parameters trainable"]
        lines += [f"  {name:<{width}}{human_bytes(b):>10}" for name, b in rows]
        lines.append(f"  {'total':<{width}}{human_bytes(self.total):>10}")
        lines.append(f"  ({_count(p)} params = {human_bytes(p * 4)} in fp32, {human_bytes(p * 2)} in bf16)")
        return "\n".join(lines)


def human_bytes(b: float) -> str:
    """Decimal units, as the "1B params = 4 GB in fp32" rule of thumb counts them."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if b >= div:
            return f"{b / div:.3g} {unit}"
    return f"{b:.0f} B"


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def estimate_memory(config: ModelConfig, method: str = "full", dtype=torch.float32, batch_size: int = 1,
                    seq_len: int = 512, lora_r: int = 8, lora_target=ALL_LINEAR, optimizer: str = "adamw",
                    autocast: bool | None = None, fused_loss: bool = True) -> MemoryEstimate:
    """Bytes for training `config` with `method` (full | lora | qlora) and weights in `dtype`.

    autocast: activations in 16 bits (bf16/fp16 autocast); default: whenever dtype is 16-bit.
    optimizer: "adamw" (two fp32 moments per trainable parameter) or "sgd" (none).
    fused_loss: the LM head and cross-entropy run chunk by chunk, as the trainer does by default.
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    w = _bytes(dtype)
    autocast = w == 2 if autocast is None else autocast
    counts = parameter_counts(config)
    n = sum(counts.values())
    if method == "full":
        trainable, params = n, n * w
        grads, master = n * w, (n * 4 if w < 4 else 0)
    else:
        trainable = lora_parameters(config, lora_r, lora_target)
        base = counts["linear"] * NF4_BYTES + counts["other"] * w if method == "qlora" else n * w
        params, grads, master = base + trainable * 4, trainable * 4, 0
    states = trainable * 8 if optimizer == "adamw" else 0
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    tokens = batch_size * seq_len
    acts = tokens * config.num_hidden_layers * (6 * h + 2 * kv + 4 * i) * (2 if autocast else 4)
    acts += tokens * h * (2 if autocast else 4)  # the embeddings' output
    if fused_loss:  # one chunk's logits and softmax at a time, and the [tokens, h] gradient kept for backward
        acts += 2 * min(tokens, chunk_rows(config.vocab_size, h)) * config.vocab_size * 4 + tokens * h * 4
    else:  # all the logits and their gradient
        acts += 2 * tokens * config.vocab_size * 4
    copies = 0
    if autocast and w == 4 and method != "qlora":  # see the module docstring
        copies = 2 * counts["linear"] + (2 * config.vocab_size * h if method == "full" else 0)
    name = str(dtype).replace("torch.", "")
    return MemoryEstimate(method, name, n, trainable, batch_size, seq_len, params, grads, states, master, acts, copies)


# ----------------------------------------------------------------------------- per rank, N data-parallel ranks

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "offload")


@dataclass
class RankMemory:
    """What one of `ranks` data-parallel processes holds (bytes), on its device and in CPU memory."""
    strategy: str
    ranks: int
    parameters: float
    gradients: float
    optimizer_states: float  # AdamW moments, plus fp32 master weights under 16-bit weights
    activations: float  # never sharded: each rank runs its own share of the batch
    cpu: float = 0.0  # offload: the shards, gradients and moments in host memory instead

    @property
    def total(self) -> float:
        """On the device."""
        return self.parameters + self.gradients + self.optimizer_states + self.activations


def per_rank_memory(est: MemoryEstimate, ranks: int, strategy: str) -> RankMemory:
    """Split a one-process estimate over `ranks` processes (ZeRO, Rajbhandari et al. 2020, table 1):

        ddp      everything whole on every rank
        zero1    optimizer states (and master weights) / N
        zero2    + gradients / N                      (fsdp shard_grad_op, DeepSpeed stage 2)
        zero3    + parameters / N                     (fsdp full_shard, stage 3)
        offload  zero3's shards, gradients and states in CPU memory (fsdp "full_shard offload")

    A frozen base (LoRA) is sharded like the rest under zero3. Peak figures: under zero2 the whole
    weights are there from forward to backward, under zero3 one unit (block) is all-gathered at a
    time, which is left out here (one block of a 7B model is ~1/32 of it). Activations and autocast's
    16-bit weight copies are per rank and never divided."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    level = STRATEGIES.index(strategy)  # 0 ddp .. 4 offload: each level shards one more thing
    states = (est.optimizer_states + est.master_weights) / (ranks if level >= 1 else 1)
    grads = est.gradients / (ranks if level >= 2 else 1)
    params = est.parameters / (ranks if level >= 3 else 1)
    acts = est.activations + est.weight_copies
    if strategy == "offload":
        return RankMemory(strategy, ranks, 0.0, 0.0, 0.0, acts, cpu=params + grads + states)
    return RankMemory(strategy, ranks, params, grads, states, acts)


def per_rank_table(est: MemoryEstimate, ranks: int) -> str:
    """The strategies side by side, for one model on `ranks` processes (lesson 14)."""
    lines = [f"per rank of {ranks} ({est.method} fine-tuning, weights in {est.dtype}):",
             f"  {'strategy':<9}" + "".join(f"{h:>10}" for h in ("weights", "grads", "AdamW", "device", "CPU"))]
    for s in STRATEGIES:
        m = per_rank_memory(est, ranks, s)
        lines.append(f"  {s:<9}" + "".join(f"{human_bytes(b):>10}" for b in
                                           (m.parameters, m.gradients, m.optimizer_states, m.total, m.cpu)))
    return "\n".join(lines)
