"""Run by torchrun from test_trainer_ddp.py: Trainer (DDP over gloo on CPU) on an adapterkit model; rank 0 writes the
per-step losses and final adapter weights to <out>/result-<tag>.pt."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import adapterkit as ak


def main(base: str, out: str, tag: str, resume: str | None) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    ak.attach(model, ak.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(32):
        ids = torch.randint(0, 128, (12,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 12})
    args = TrainingArguments(
        output_dir=out, max_steps=6, save_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, warmup_steps=1, disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.args.world_size == 2, trainer.args.world_size
    if dist.get_rank() == 0:
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"losses": losses, "weights": weights}, f"{out}/result-{tag}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    if dist.is_initialized():  # the Trainer opened it; leaving it open lets gloo's threads abort the exit at random
        dist.barrier()
        dist.destroy_process_group()
