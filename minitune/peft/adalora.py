"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al. 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", ICLR 2023).

LoRA gives every layer the same rank. AdaLoRA writes the update in an SVD-like form and lets
training decide which layers deserve rank:

    h = W0 x + b + (alpha / ranknum) * P diag(Λ) Q x,   Q = lora_A [r, in], Λ = lora_E [r, 1], P = lora_B [out, r]

- P and Q are pushed towards orthonormal by a regulariser, so each Λ_i behaves like a singular value.
  The paper writes R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2; PEFT (followed here) adds the *unsquared*
  Frobenius norms, averaged over all P and Q matrices, times orth_reg_weight.
- Importance of every entry w (of P, Λ, Q) is its sensitivity I = |w * dL/dw|, smoothed by two EMAs:
      Ibar <- beta1 Ibar + (1 - beta1) I          (smoothed sensitivity)
      Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|  (uncertainty)
      s(w) = Ibar * Ubar
  A triplet i (P[:, i], Λ_i, Q[i, :]) scores  S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji).
- The total rank budget falls on a cubic schedule from init_r per layer to target_r per layer between
  step tinit and step total_step - tfinal; every deltaT steps the lowest-scoring triplets are pruned by
  setting their Λ_i to zero (the vectors stay, so a triplet could be revived, as in the paper).
- ranknum stays init_r, so the scaling alpha / init_r does not jump when ranks change.

Same update order, constants and tie rules as PEFT 0.21's AdaLoraModel / RankAllocator, so the same
gradients give the same ranks; the adapter is saved in PEFT's AdaLoRA layout (pruned rows dropped,
rank_pattern in the config).
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_files import (PEFT_PREFIX, UNSUPPORTED, AdapterError, check_modules, check_shape, check_supported,
                            read_token_rows, split_peft_name)
from .targets import match_targets, replace_module, target_modules_for_config
from .trainable_tokens import add_peft_rows, load_rows


@dataclass
class AdaLoRAConfig:
    total_step: int  # training steps; the schedule needs it up front
    init_r: int = 12  # starting rank of every layer
    target_r: int = 8  # average rank per layer at the end
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    tinit: int = 0  # warm-up steps at the full budget
    tfinal: int = 0  # final steps at the target budget, ranks frozen
    deltaT: int = 1  # prune every deltaT steps during the decay
    beta1: float = 0.85  # EMA of sensitivity
    beta2: float = 0.85  # EMA of uncertainty
    orth_reg_weight: float = 0.5
    targets: list | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank_pattern: dict | None = None  # "<module>.lora_E" -> [kept?] per triplet, set by the controller

    def __post_init__(self):
        if not self.total_step or self.total_step <= 0:
            raise ValueError("AdaLoRA needs total_step > 0")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} "
                             "leave no steps for the budget to decrease")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in (0, 1)")
        if self.orth_reg_weight < 0:
            raise ValueError("orth_reg_weight must be >= 0")


class SVDLinear(nn.Module):
    """y = base_layer(x) + scaling * B ((A * E) dropout(x)),   scaling = alpha / (ranknum + 1e-5)  (PEFT's epsilon).

    `scaling` means what it means in LoRALinear: the number that multiplies the low-rank product.
    `alpha` is PEFT's lora_alpha (r when it is 0); `ranknum` (init_r) is its divisor and never changes."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, ranknum: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.randn(r, base_layer.in_features, **kw) * 0.02)  # Q [r, in]
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))  # Λ [r, 1]: zero, so training starts at W0
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, r, **kw) * 0.02)  # P [out, r]
        self.r, self.dropout = r, dropout
        self.alpha = alpha if alpha > 0 else float(r)
        self.ranknum = float(r if ranknum is None else ranknum)  # not a parameter: PEFT never saves it
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        """scaling * P diag(Λ) Q: the [out, in] update this layer adds to W0."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def forward(self, x):  # [..., in] -> [..., out]
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        if self.merged:
            return y
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        lora = F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B)
        return y + lora * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return (f"r={self.r}, ranknum={self.ranknum:g}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, "
                f"dropout={self.dropout}")


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def apply_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Wrap the target linear layers in SVDLinear(init_r) and freeze everything else."""
    if svd_layers(model):
        raise ValueError("the model already has AdaLoRA layers")
    names = match_targets(model, config.targets)
    model.requires_grad_(False)
    for name in names:
        replace_module(model, name, SVDLinear(model.get_submodule(name), config.init_r, config.lora_alpha, config.lora_dropout))
    model.adalora_config = config  # plain attribute: what save_adapter writes, rank_pattern included
    return model


def orth_regularizer(model: nn.Module, weight: float) -> torch.Tensor:
    """weight * mean over all P, Q of ||P^T P - I||_F and ||Q Q^T - I||_F; add it to the loss."""
    terms = []
    for m in svd_layers(model).values():
        for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # [r, r] each
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


def ranks(rank_pattern: dict) -> dict[str, int]:
    """{"<module>": rank kept} from a rank pattern."""
    return {k.removesuffix(".lora_E"): int(sum(v)) for k, v in rank_pattern.items()}


class AdaLoRAController:
    """The rank allocator. Each step: loss.backward(); optimizer.step();
    controller.update_and_allocate(model, step); optimizer.zero_grad()."""

    def __init__(self, model: nn.Module, config: AdaLoRAConfig | None = None):
        self.config = config or model.adalora_config
        layers = svd_layers(model)
        self.init_bgt = sum(m.lora_A.shape[0] for m in layers.values())  # total rank now
        self.target_bgt = self.config.target_r * len(layers)  # total rank at the end
        self.budget = self.init_bgt
        self.reset_ipt()

    def reset_ipt(self):
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}  # "<module>.lora_X" -> like the parameter

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to prune now)."""
        # BEGIN EXERCISE 07.1: the cubic budget schedule
        c = self.config
        if step <= c.tinit:  # warm-up: full budget
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:  # final fine-tuning: target budget, ranks frozen
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * progress ** 3 + self.target_bgt), step % c.deltaT == 0
        # END EXERCISE

    @torch.no_grad()
    def update_ipt(self, model: nn.Module):
        # BEGIN EXERCISE 07.2: sensitivity and its two moving averages
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in svd_layers(model).items():
            for part in ("lora_A", "lora_B", "lora_E"):
                p, key = getattr(m, part), f"{name}.{part}"
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                self.ipt[key] = (p * p.grad).abs()  # sensitivity |w * dL/dw|
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
        # END EXERCISE

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """"<module>.lora_E" -> S [r, 1] = s(E) + mean over Q's row + mean over P's column."""
        out = {}
        for key in self.exp_avg_ipt:
            if key.endswith(".lora_E"):
                name = key.removesuffix(".lora_E")
                score = {p: self.exp_avg_ipt[f"{name}.{p}"] * self.exp_avg_unc[f"{name}.{p}"] for p in ("lora_A", "lora_B", "lora_E")}
                a = score["lora_A"].mean(dim=1)  # [r]
                b = score["lora_B"].mean(dim=0)  # [r]
                out[key] = (score["lora_E"].view(-1) + (a + b)).view(-1, 1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict:
        """Zero Λ_i of the (init_bgt - budget) lowest-scoring triplets over all layers (ties at the
        threshold go too, as in PEFT); returns the rank pattern."""
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for name, m in svd_layers(model).items():
            pruned = scores[f"{name}.lora_E"] <= threshold  # [r, 1]
            m.lora_E.masked_fill_(pruned, 0.0)
            pattern[f"{name}.lora_E"] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, pattern: dict):
        for name, m in svd_layers(model).items():
            keep = torch.tensor(pattern[f"{name}.lora_E"], device=m.lora_E.device).view(-1, 1)
            m.lora_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int):
        """Call after backward (grads present), before zero_grad. Returns (budget, rank_pattern or None)."""
        c = self.config
        last = c.total_step - c.tfinal
        pattern = None
        if global_step < last:  # decay phase (and warm-up): learn importance, prune on schedule
            self.update_ipt(model)
            self.budget, prune = self.budget_schedule(global_step)
            if prune:
                pattern = c.rank_pattern = self.mask_to_budget(model, self.budget)
        elif global_step == last:  # final allocation, then forget the statistics
            self.budget, _ = self.budget_schedule(global_step)
            pattern = c.rank_pattern = self.mask_to_budget(model, self.budget)
            self.reset_ipt()
        elif c.rank_pattern is not None:  # keep pruned triplets at zero while fine-tuning
            self.mask_using_rank_pattern(model, c.rank_pattern)
        return self.budget, pattern


def to_peft(model: nn.Module, base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's AdaLoRA layout as (adapter_config.json, tensors): pruned triplets dropped from the tensors,
    rank_pattern in the config. adapter_io.save_adapter writes them."""
    layers, c = svd_layers(model), getattr(model, "adalora_config", None)
    if not layers or c is None:
        raise ValueError("the model has no AdaLoRA layers to save (call apply_adalora or load_adapter first)")
    tensors = {}
    for name, m in layers.items():
        keep = (c.rank_pattern or {}).get(f"{name}.lora_E")
        if keep is None or len(keep) != m.lora_A.shape[0]:  # no pruning yet, or loaded already pruned
            keep = [True] * m.lora_A.shape[0]
        keep = torch.tensor(keep, dtype=torch.bool, device=m.lora_A.device)
        tensors[f"{PEFT_PREFIX}{name}.lora_A"] = m.lora_A[keep]
        tensors[f"{PEFT_PREFIX}{name}.lora_E"] = m.lora_E[keep]
        tensors[f"{PEFT_PREFIX}{name}.lora_B"] = m.lora_B[:, keep]
    fields = {k: v for k, v in asdict(c).items() if k != "targets"}
    config = dict(fields, peft_type="ADALORA", task_type="CAUSAL_LM", r=8, bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, modules_to_save=None, use_dora=False,
                  target_modules=target_modules_for_config(model, list(layers)),
                  base_model_name_or_path=base_model_name_or_path)
    add_peft_rows(model, config, tensors)  # trainable token rows, if any, as PEFT saves them beside AdaLoRA
    return config, tensors


def from_peft(model: nn.Module, cfg_file, config: dict, w_file, tensors: dict) -> nn.Module:
    """Apply AdaLoRA from a PEFT AdaLoRA folder's config (read by adapter_io.load_adapter) and load its
    (possibly rank-pruned) tensors."""
    if config.get("peft_type") != "ADALORA":
        raise AdapterError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not an AdaLoRA adapter")
    check_supported(cfg_file, config, {k: v for k, v in UNSUPPORTED.items() if k != "rank_pattern"})
    known = AdaLoRAConfig.__dataclass_fields__
    try:
        c = AdaLoRAConfig(**{k: v for k, v in config.items() if k in known and k not in ("targets", "rank_pattern")},
                          targets=config.get("target_modules"))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    pattern = {k.removesuffix(".default"): v for k, v in (config.get("rank_pattern") or {}).items()}
    names = match_targets(model, c.targets, source=f"{cfg_file}: ")
    tokens = read_token_rows(model, cfg_file, config, w_file, tensors)
    by_module = {}
    for key, t in tensors.items():
        module, part = split_peft_name(w_file, key, ("lora_A", "lora_B", "lora_E"))
        by_module.setdefault(module, {})[part] = (key, t)
    check_modules(model, names, by_module, cfg_file, w_file)
    rank = {}
    for name in names:
        base, parts = model.get_submodule(name), by_module[name]
        if pattern and f"{name}.lora_E" not in pattern:
            raise AdapterError(f"{cfg_file}: rank_pattern has no entry for {name}.lora_E")
        keep = pattern.get(f"{name}.lora_E", [True] * c.init_r)
        if len(keep) != c.init_r:
            raise AdapterError(f"{cfg_file}: rank_pattern[{name}.lora_E] has {len(keep)} entries, init_r is {c.init_r}")
        r = rank[name] = int(sum(keep))
        for part, want in (("lora_A", (r, base.in_features)), ("lora_E", (r, 1)), ("lora_B", (base.out_features, r))):
            if part not in parts:
                raise AdapterError(f"{w_file}: {PEFT_PREFIX}{name}.{part} is missing")
            check_shape(w_file, parts[part][0], parts[part][1].shape, want,
                        f"{name} (in={base.in_features}, out={base.out_features}, rank {r} of init_r={c.init_r})")
    c.rank_pattern = pattern or None
    model.requires_grad_(False)
    with torch.no_grad():
        for name in names:
            layer = SVDLinear(model.get_submodule(name), rank[name], c.lora_alpha, c.lora_dropout, ranknum=c.init_r)
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, part).copy_(by_module[name][part][1])
            replace_module(model, name, layer)
    model.adalora_config = c
    if tokens is not None:
        load_rows(model, *tokens)
    return model
