"""AdaLoRA's training side: the rank allocator (budget schedule, importance scores, pruning of singular values), the
orthogonality regulariser, and an HF Trainer callback. The layers and the config are in methods/adalora.py.

    allocator = ak.RankAllocator(model)                 # adds orth_reg_weight * regulariser to outputs.loss
    ... loss.backward(); optimizer.step(); allocator.step(global_step); optimizer.zero_grad()
    Trainer(..., callbacks=[ak.AdaLoraCallback(allocator)])   # the same, inside HF Trainer
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .methods.adalora import AdaLoraConfig, AdaLoraLinear
from .state import AdapterState, adapter_state


def _layers(name: str, state: AdapterState) -> dict[str, AdaLoraLinear]:
    return {p: w for p, w in state.wrappers.items() if isinstance(w, AdaLoraLinear) and name in w.records}


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based pruning for one trainable adapter, plus the orthogonality
    regulariser (a forward hook adding it to `outputs.loss`, as PEFT's model does; `remove()` takes it off)."""

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        state = adapter_state(model)
        if state is None or name not in state.configs or not isinstance(state.configs[name], AdaLoraConfig):
            raise ConfigError(f"no AdaLoRA adapter named {name!r} is attached to {type(model).__name__}.")
        self.model, self.name, self.state = model, name, state
        self.layers = _layers(name, state)
        self.init_budget = sum(w.records[name].r for w in self.layers.values())
        self.target_budget = self.cfg.target_r * len(self.layers)
        self.reset()
        self._hook = model.register_forward_hook(self._add_regulariser)

    @property
    def cfg(self) -> AdaLoraConfig:
        return self.state.configs[self.name]

    def reset(self) -> None:
        self.ema_ipt: dict[int, torch.Tensor] = {}
        self.ema_unc: dict[int, torch.Tensor] = {}

    def remove(self) -> None:
        self._hook.remove()

    # -- the regulariser ------------------------------------------------------------------------------------------
    def orth_loss(self) -> torch.Tensor | float:
        """Mean over all A and B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F."""
        total, count = 0.0, 0
        for layer in self.layers.values():
            a, _, b = layer.factors(self.name)
            for cov in (a @ a.T, b.T @ b):
                total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                         device=cov.device))
                count += 1
        return total / count if count else 0.0

    def orth_loss_term(self) -> torch.Tensor:
        """orth_reg_weight * orth_loss(): the term the forward hook adds, for loops that compute their own loss."""
        return self.cfg.orth_reg_weight * self.orth_loss()

    def _add_regulariser(self, module, args, outputs):
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.cfg.orth_reg_weight > 0:
            outputs.loss = loss + self.cfg.orth_reg_weight * self.orth_loss()
        return outputs

    # -- the schedule ---------------------------------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        """(kept triplets in all, whether to prune at this step): constant, cubic decrease, then the target."""
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % cfg.deltaT == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for layer in self.layers.values():
            for p in layer.factors(self.name):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                key = id(p)
                avg = self.ema_ipt.get(key, torch.zeros_like(p))
                unc = self.ema_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.ema_ipt[key], self.ema_unc[key] = avg, b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self.layers.items():
            a, e, b = layer.factors(self.name)
            s = {id(p): self.ema_ipt.get(id(p), torch.zeros_like(p)) * self.ema_unc.get(id(p), torch.zeros_like(p))
                 for p in (a, e, b)}
            out[path] = s[id(e)].view(-1) + s[id(a)].mean(dim=1) + s[id(b)].mean(dim=0)  # (r,)
        return out

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        scores = self._scores()
        k = self.init_budget - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item()
        self._apply({p: (s > threshold).tolist() for p, s in scores.items()})

    @torch.no_grad()
    def _apply(self, masks: dict[str, list[bool]]) -> None:
        for path, mask in masks.items():
            layer = self.layers[path]
            _, e, _ = layer.factors(self.name)
            e.masked_fill_(~torch.tensor(mask, device=e.device).view(-1, 1), 0.0)
            layer.records[self.name].mask = tuple(mask)
        pattern = {f"{p}.lora_E": list(m) for p, m in masks.items()}
        self.state.configs[self.name] = self.cfg.replace(rank_pattern=pattern)

    def step(self, global_step: int) -> None:
        """PEFT's `update_and_allocate`: call after optimizer.step() and before zero_grad()."""
        cfg = self.cfg
        end = cfg.total_step - cfg.tfinal
        if global_step < end:
            self._update_importance()
            budget, prune = self.budget(global_step)
            if prune:
                self._mask_to(budget)
        elif global_step == end:
            self._update_importance()
            self._mask_to(self.budget(global_step)[0])
            self.reset()
        else:
            masks = {p[: -len(".lora_E")]: m for p, m in cfg.rank_pattern.items()}
            if masks:
                self._apply(masks)

    def ranks(self) -> dict[str, int]:
        """Kept rank per layer (all rows until the first pruning)."""
        return {p: sum(w.records[self.name].mask) if w.records[self.name].mask else w.records[self.name].r
                for p, w in self.layers.items()}


def adalora_callback(allocator: RankAllocator):
    """A transformers TrainerCallback calling `allocator.step(global_step)` after every optimizer step."""
    from transformers import TrainerCallback  # optional dependency: only for HF Trainer users

    class AdaLoraCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            allocator.step(state.global_step)

    return AdaLoraCallback()
