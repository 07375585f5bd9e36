"""Hugging Face `Trainer` with the chunked output loss: the (tokens x vocab) logits of a training step never exist.

    class MyTrainer(ChunkedLossMixin, Trainer):
        loss_chunk_size = 2048

or call `chunked_compute_loss(trainer, model, inputs, ...)` from your own `compute_loss`. Evaluation that asks for
outputs (logits for metrics) and batches without labels take the Trainer's own path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..losses import DEFAULT_CHUNK, IGNORE_INDEX, causal_lm_loss


def chunked_compute_loss(
    trainer: Any,
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """The loss `Trainer.compute_loss` would return for a causal LM batch with labels, computed chunk by chunk.

    With `num_items_in_batch` (the labelled tokens of the whole accumulated step, as the Trainer counts them) the
    loss is the token sum divided by it, and `trainer.loss_is_scaled_for_ga` is set so the Trainer does not divide
    again; without, it is this batch's token mean and the Trainer scales it for accumulation as usual.
    """
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
    if num_items_in_batch is None:
        loss = causal_lm_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                              chunk_size=chunk_size, ignore_index=IGNORE_INDEX, **rest)
        trainer.loss_is_scaled_for_ga = False
        return loss
    total = causal_lm_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                           chunk_size=chunk_size, reduction="sum", ignore_index=IGNORE_INDEX, **rest)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    loss = total / num_items_in_batch
    args = getattr(trainer, "args", None)
    if getattr(args, "average_tokens_across_devices", False):
        # The count is global; DDP averages gradients over processes, so undo that average (as the Trainer does).
        loss = loss * trainer.accelerator.num_processes
    trainer.loss_is_scaled_for_ga = True
    return loss


class ChunkedLossMixin:
    """Put before `Trainer` in the bases: training steps use the chunked output loss (`loss_chunk_size` tokens)."""

    loss_chunk_size: int = DEFAULT_CHUNK

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or inputs.get("labels") is None:
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return chunked_compute_loss(self, model, inputs, num_items_in_batch, chunk_size=self.loss_chunk_size)
