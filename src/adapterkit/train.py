"""The training loop behind `adapterkit train`: AdamW on the adapter parameters, gradient accumulation, eval loss.

UI-free and reusable from Python: progress goes to an optional callback; Ctrl-C stops after the last completed
optimizer step and returns normally with `interrupted=True`, so the caller can still save a usable adapter.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .losses import chunked_loss, split_head
from .memory import checkpoint_layers, uncheckpoint_layers
from .optim import loraplus_param_groups
from .training_data import IGNORE_INDEX, batches
from .verbs import trainable_parameters


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps (each one is batch_size * grad_accum examples)
    lr: float = 1e-3  # peak learning rate of the adapter parameters
    batch_size: int = 8  # examples per forward/backward
    grad_accum: int = 1  # forward/backward passes per optimizer step
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the adapter gradients' global norm (0 disables)
    seed: int = 0  # adapter init, data order
    max_seconds: float | None = None  # wall-time budget: stop after the step that crosses it; the schedule follows
    loss_chunk: int | None = None  # tokens per chunk of the output loss (None: the head's logits in one piece)
    checkpoint: bool = False  # recompute each decoder layer in backward instead of keeping its activations
    offload: bool | int = False  # keep what the layers keep for backward in host memory (an int: the first N layers)
    loraplus_ratio: float | None = None  # LoRA+: lora_B learns this many times faster than lora_A (optim.py)


@dataclass
class StepLog:
    step: int
    loss: float  # mean token loss of this optimizer step
    lr: float
    tokens: int  # labelled tokens in this step
    seconds: float  # wall time since training started


@dataclass
class TrainResult:
    steps: list[StepLog] = field(default_factory=list)
    eval_before: float | None = None
    eval_after: float | None = None
    seconds: float = 0.0
    tokens_seen: int = 0  # all input tokens (padding excluded) of completed steps
    interrupted: bool = False
    stopped_by_time: bool = False  # the max_seconds budget ended training before max_steps

    @property
    def completed_steps(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["completed_steps"] = self.completed_steps
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _token_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None, whole: bool = False
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over labelled tokens, and their count (so accumulation weights tokens, not batches).

    The output head runs only at positions that predict a labelled token: on a chat dataset that is a third of the
    positions, and the head (vocab x hidden) is a fifth of a small model's compute. With `chunk`, the head and the
    loss run that many tokens at a time (losses.chunked_loss): the (tokens, vocab) logits never exist at once.
    `whole`: call the model itself (a DDP / FSDP2 model must see its own forward for its gradient sync and
    unsharding).
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    parts = None if whole else split_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]  # (B, T, H)
        if chunk:
            loss = chunked_loss(hidden[:, :-1][keep], head, targets[keep], chunk_size=chunk, reduction="sum")
            return loss, int(keep.sum())
        logits = head(hidden[:, :-1][keep]).float()  # (N, V)
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        shifted = logits[:, :-1].float()
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: Sequence[dict], pad_id: int, batch_size: int = 16, chunk: int | None = None,
    whole: bool = False,
) -> float | None:
    """Mean token loss over `examples` (None when there are none). The model's train/eval mode is restored."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches(examples, batch_size, pad_id, seed=None):
            loss, n = _token_loss_sum(model, _to(batch, model), chunk, whole)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then cosine down to 10% of the peak at `max_steps` (or at `max_seconds`,
    whichever comes first: with a time budget the schedule follows the clock)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.max_seconds:
        progress = max(progress, min(elapsed / cfg.max_seconds, 1.0))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _to(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def _rows(batch: dict[str, torch.Tensor], part: tuple[int, int]) -> dict[str, torch.Tensor]:
    """This rank's contiguous rows of a global batch (part = (rank, world size))."""
    rank, world = part
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def _micro_batches(examples: Sequence[dict], batch_size: int, pad_id: int, seed: int):
    """Endless stream of training batches: a fresh shuffle every epoch."""
    epoch = 0
    while True:
        yield from batches(examples, batch_size, pad_id, seed=seed + epoch)
        epoch += 1


def train(
    model: nn.Module,
    train_examples: Sequence[dict],
    eval_examples: Sequence[dict] = (),
    cfg: TrainConfig | None = None,
    *,
    pad_id: int = 0,
    on_step: Callable[[StepLog], None] | None = None,
    forward: nn.Module | None = None,
    part: tuple[int, int] = (0, 1),
    regularizer: Callable[[], torch.Tensor] | None = None,
    after_optimizer_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the model's trainable (adapter) parameters on tokenized examples ({"input_ids", "labels"} lists).

    Runs `cfg.max_steps` optimizer steps, or fewer when `cfg.max_seconds` of wall time run out first.

    Evaluates the mean token loss on `eval_examples` before and after. A KeyboardInterrupt stops training: the
    gradients of the unfinished step are dropped, the weights are those of the last completed step, and the result
    says `interrupted=True` (evaluation after is skipped).

    Data parallel (torchrun): `forward` is the DDP / FSDP2-wrapped model (called whole), `part` = (rank, world).
    Every rank draws the same global batches and trains on its rows; the loss is divided by the labelled tokens of
    the whole global batch, so the averaged gradient is the single-process gradient of that batch. The logged loss
    is the global one. `cfg.batch_size` (the global micro-batch) must be divisible by the world size.
    regularizer: a loss term added once per optimizer step (AdaLoRA's orthogonality term).
    after_optimizer_step(step): called after each optimizer step, before the gradients are cleared (AdaLoRA's
    rank allocation).
    """
    cfg = cfg or TrainConfig()
    rank, world = part
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} processes")
    net, whole = (forward, True) if forward is not None else (model, False)
    if not train_examples:
        raise ValueError("no training examples")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first")
    # On CUDA the fused AdamW (one kernel for every tensor, as transformers' Trainer defaults to with torch >= 2.8):
    # the step's host time is a few launches instead of each foreach op per group of tensors.
    fused = {"fused": True} if all(p.is_cuda for p in params) else {}
    if cfg.loraplus_ratio is not None:
        groups = loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio, loraplus_weight_decay=cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    # The schedule scales every group's own learning rate (LoRA+ groups keep their ratios to the peak).
    lr_scales = [group["lr"] / cfg.lr for group in optimizer.param_groups]
    result = TrainResult()
    result.eval_before = evaluate(net, eval_examples, pad_id, cfg.batch_size, cfg.loss_chunk, whole)
    if cfg.checkpoint or cfg.offload:
        checkpoint_layers(model, offload=cfg.offload, recompute=cfg.checkpoint)

    stream = _micro_batches(train_examples, cfg.batch_size, pad_id, cfg.seed)
    model.train()
    start = time.perf_counter()
    try:
        for step in range(cfg.max_steps):
            elapsed = time.perf_counter() - start
            if cfg.max_seconds is not None and step > 0 and elapsed >= cfg.max_seconds:
                result.stopped_by_time = True
                break
            lr = _lr_at(step, cfg, elapsed)
            for group, scale in zip(optimizer.param_groups, lr_scales):
                group["lr"] = lr * scale
            group_batches = [next(stream) for _ in range(cfg.grad_accum)]
            labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group_batches)
            loss_total = 0.0
            for batch in group_batches:
                loss, _ = _token_loss_sum(net, _to(_rows(batch, part), model), cfg.loss_chunk, whole)
                # DDP and FSDP2 average gradients over ranks: scale by `world` to get the global-batch sum.
                (loss * world / max(labelled, 1)).backward()
                loss_total += float(loss.detach())
            if world > 1:
                loss_total = _summed(loss_total, model)
            if regularizer is not None:
                regularizer().backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if after_optimizer_step is not None:
                after_optimizer_step(step)
            optimizer.zero_grad(set_to_none=True)
            result.tokens_seen += sum(int(b["attention_mask"].sum()) for b in group_batches)
            log = StepLog(step + 1, loss_total / max(labelled, 1), lr, labelled, time.perf_counter() - start)
            result.steps.append(log)
            if on_step is not None:
                on_step(log)
    except KeyboardInterrupt:
        # optimizer.step either ran fully or not at all for the step in flight; drop its partial gradients.
        optimizer.zero_grad(set_to_none=True)
        result.interrupted = True
    finally:
        if cfg.checkpoint or cfg.offload:
            uncheckpoint_layers(model)
        model.eval()
        result.seconds = time.perf_counter() - start
    if not result.interrupted:
        try:
            result.eval_after = evaluate(net, eval_examples, pad_id, cfg.batch_size, cfg.loss_chunk, whole)
        except KeyboardInterrupt:  # training itself completed: keep its result, skip the evaluation
            result.interrupted = True
    return result


def _summed(value: float, model: nn.Module) -> float:
    """`value` summed over the ranks of the default process group."""
    t = torch.tensor([value], dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(t)
    return float(t.item())
