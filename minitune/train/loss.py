"""The LM head and the cross-entropy in one pass, chunk by chunk ("fused linear cross-entropy").

For final hidden states h_i [H], the head weight W [V, H] and labels y_i (IGNORE_INDEX: skipped):

    z_i = W h_i                                        the logits of row i, [V]
    loss = sum_{i: y_i != IGNORE_INDEX}  logsumexp(z_i) - z_i[y_i]
    d loss / d z_i = softmax(z_i) - onehot(y_i)
    d loss / d h_i = W^T (d loss / d z_i),      d loss / d W = sum_i (d loss / d z_i) h_i^T

The plain way, F.cross_entropy(lm_head(h)), makes all N x V logits at once (8 x 256 x 6000 floats =
49 MB in bench/bench_lora.py, 2.5 GB for a 151k vocabulary at 4096 tokens), keeps them and
log_softmax's output for backward, and there makes two more N x V arrays (the loss's zero-filled
gradient and log_softmax's backward): four arrays of that size, each too big for any cache, written
and read again. Here C rows at a time (C x V ~ 4M floats, 16 MB) go head -> log_softmax -> in place
softmax - onehot -> times W, and are dropped, so the logits never exist whole. The gradient is made in
the forward pass, while the chunk's logits are at hand (only when something needs it); the backward
just scales it by the incoming gradient, a scalar. Rows labelled IGNORE_INDEX (an SFT prompt) never
reach the head. Same numbers as the plain way up to float rounding: the sums run in another order.

`causal_lm_loss` shows the plain path (lm_head + F.cross_entropy) first and this one beside it behind
its switch, `fused=` (default True: the trainer's default loss takes this path whenever the model lets
it, i.e. it has `hidden_states` and a bias-free linear head, and the plain one otherwise).
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB in fp32 (but see chunk_rows)


def chunk_rows(vocab: int, hidden: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, but at least `hidden` rows, since every chunk streams all
    of W [V, H] through its matmul and that costs no more than the chunk's own logits [C, V] only
    when C >= H (a 151k vocabulary would otherwise get 27-row chunks that mostly re-read W)."""
    return max(hidden, CHUNK_ELEMENTS // vocab)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels):  # h [N, H], weight [V, H], labels [N] -> summed loss []
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        rows, y = (h, labels) if len(keep) == len(labels) else (h[keep], labels[keep])
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(rows) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = chunk_rows(*weight.shape)
        for i in range(0, len(y), step):
            z = F.linear(rows[i:i + step], weight)  # [C, V], in the head's (or autocast's) dtype
            # log_softmax overwrites z (when float32) rather than take another 16 MB: fresh memory of
            # that size costs more here than the arithmetic done in it
            logp = z.float()
            torch.log_softmax(logp, dim=-1, out=logp)
            yi = y[i:i + step, None]
            total -= logp.gather(1, yi).sum()
            if need_h or need_w:
                dz = logp.exp_()  # softmax, in place
                dz.scatter_add_(1, yi, dz.new_full(yi.shape, -1.0))  # - onehot(y)
                dz = dz.to(z.dtype)
                if need_h:
                    grad_h[i:i + step] = dz @ weight
                if need_w:
                    grad_w += dz.t() @ rows[i:i + step]
        ctx.save_for_backward(grad_h, grad_w, keep)
        ctx.shape, ctx.w_dtype = h.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_w, keep = ctx.saved_tensors
        grad_h = None
        if grad_rows is not None:
            grad_rows = grad_rows * grad_total.to(grad_rows.dtype)
            grad_h = grad_rows if len(keep) == ctx.shape[0] else grad_rows.new_zeros(ctx.shape).index_copy_(0, keep, grad_rows)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.w_dtype)
        return grad_h, grad_w, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over rows with labels != IGNORE_INDEX of cross_entropy(h @ weight.T, labels), computed
    chunk by chunk. h [N, H], weight [V, H] (a bias-free head), labels [N] -> fp32 scalar."""
    return LinearCrossEntropy.apply(h, weight, labels)


def head_weight(head) -> torch.Tensor | None:
    """The [V, H] matrix a bias-free linear LM head multiplies by, or None (then the loss calls the model).

    A plain nn.Linear's `weight`; a head whose effective matrix is not its `weight` says so with
    `effective_weight()` (trainable token rows, minitune/peft/trainable_tokens.py: E + S delta, through
    which the gradient reaches delta). Any other module (a subclass, a LoRA-wrapped head) is not trusted.
    """
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    effective = getattr(head, "effective_weight", None)
    return effective() if callable(effective) else None


def causal_lm_loss(model, batch: dict, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: logits at position t predict labels at t + 1; -100 is skipped.

    Returns (mean loss over the trainable tokens, their count); 0 loss when there are none.

    The plain path is lm_head -> F.cross_entropy (`fused=False`). The speed switch `fused=True` (the
    default, which the lessons' numbers were measured with) runs the head and the loss chunk by chunk
    (LinearCrossEntropy above: same numbers up to float rounding, no [B, T, V] logits) whenever the model
    lets it: `hidden_states` and a bias-free linear `lm_head` (Transformer, prompt and prefix tuning,
    with or without trainable token rows). Anything else, e.g. a DDP wrapper, whose forward syncs the
    gradients, takes the plain path.
    """
    # shift the labels, not the logits: slicing logits[:, :-1] would copy the largest tensor of the
    # step; the last position gets label -100 instead, since it has nothing to predict
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]
    n = (labels != IGNORE_INDEX).sum()
    weight = head_weight(getattr(model, "lm_head", None)) if fused and hasattr(model, "hidden_states") else None
    if weight is None:  # the plain path: all the logits, then the loss
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # [B, T, V]
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    else:  # the speed variant: head and loss fused, chunk by chunk
        h = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # [B, T, H]
        total = linear_cross_entropy(h.flatten(0, 1), weight, labels.flatten())
    return total / n.clamp(min=1), n
