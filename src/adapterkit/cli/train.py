"""`adapterkit train`: fine-tune an adapter (LoRA, DoRA, LoHa, LoKr, IA3, VeRA, OFT: any method of the table) on a
JSONL/text file and write it with a JSON log and a loss plot (the plot where matplotlib is installed)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import typer

from ..quantized import QUANT_KINDS
from . import dist_setup
from .common import CliError, console, human_size, load_base, pyplot

# Defaults tuned on the shipped dataset and SmolLM2-135M on 2 CPU cores: all linear layers at r=16 learn the facts
# in ~100 steps of 8 examples (about two minutes); attention-only targets need about twice the steps.
DEFAULT_TARGETS = "all-linear"


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def train_command(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the adapter to."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: embedded name, directory, .gguf file "
                                        "or cached hub id (default: the embedded SmolLM2-135M-Instruct)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="JSONL (chat / prompt-completion / text records) "
                                        "or .txt file (default: the shipped Zephyrine Q7 dataset)."),
    method: str = typer.Option("lora", "--method", help="Adapter method: lora, dora, loha, lokr, ia3, vera, oft (any "
                               "method adapterkit implements)."),
    r: int = typer.Option(16, "--r", "--lora-r", help="Rank (LoRA, DoRA, LoHa, LoKr, VeRA) or block size (OFT); IA3 "
                          "has none. Spell it --lora-r under torchrun, whose parser takes --r for an abbreviation."),
    target_r: Optional[int] = typer.Option(None, "--target-r", help="AdaLoRA: average rank per layer at the end "
                                           "(default: half of --r)."),
    alpha: float = typer.Option(32, "--alpha", help="Alpha (scale = alpha / r)."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Modules to adapt: names or suffixes "
                                                "(repeat or comma-separate), or 'all-linear' (default)."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout: LoRA's input dropout, LoHa/LoKr's rank dropout."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Adapt only these layer indices, e.g. '15-29' or "
                                         "'0,4,8' (upper layers only also skip the lower layers' backward pass)."),
    max_steps: int = typer.Option(100, "--max-steps", help="Optimizer steps."),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="Wall-time budget in seconds: training stops "
                                             "(and the learning-rate schedule ends) when it is spent."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (warm-up then cosine decay)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward/backward pass."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Passes accumulated per optimizer step."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate examples to this many tokens."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Held-out share of the data for eval loss."),
    seed: int = typer.Option(0, "--seed", help="Seed for adapter init, data split and order."),
    add_tokens: Optional[list[str]] = typer.Option(None, "--add-tokens", help="New tokens to add to the vocabulary "
                                                   "(repeat or comma-separate)."),
    loraplus_ratio: Optional[float] = typer.Option(None, "--loraplus-ratio", help="LoRA+: lora_B's learning rate is "
                                                   "this many times --lr (e.g. 16)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    loss_chunk: Optional[int] = typer.Option(None, "--loss-chunk", help="Compute the output head and loss this many "
                                             "tokens at a time (the full logits never exist; for long contexts)."),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="Recompute each decoder layer in backward instead of "
                                    "keeping its activations."),
    offload: bool = typer.Option(False, "--offload", help="Keep what the layers save for backward in host memory "
                                 "(with --checkpoint: only the layer inputs)."),
    offload_layers: Optional[int] = typer.Option(None, "--offload-layers", help="With --checkpoint: offload only the "
                                                 "first N decoder layers' inputs; the rest stay on the accelerator "
                                                 "(when host memory cannot hold all of them)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="QLoRA: quantize the base's linear layers (all "
                                           "but the output head) with bitsandbytes: nf4, fp4 or int8."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard the model with FSDP2 (fully_shard) "
                              "instead of replicating it with DDP."),
) -> None:
    """Fine-tune an adapter; writes the adapter, training.json and loss.png to --out. Ctrl-C saves the last step.

    Under `torchrun --nproc_per_node N` the model is replicated with DDP (or sharded with --fsdp) over N processes
    (gloo on CPU, NCCL on GPUs); each rank trains on its rows of every global batch of --batch-size examples, and
    only rank 0 prints and writes files.
    """
    options = dict(locals())  # every option by name, handed to _train as is
    import torch

    if add_tokens and method.lower() not in ("lora", "dora"):
        raise CliError("--add-tokens trains the new embedding rows with LoRA's trainable tokens; use --method lora")
    for name, value in (("--max-steps", max_steps), ("--batch-size", batch_size), ("--grad-accum", grad_accum),
                        ("--r", r), ("--max-length", max_length),
                        ("--loss-chunk", 1 if loss_chunk is None else loss_chunk)):
        if value < 1:
            raise CliError(f"{name} must be at least 1, got {value}")
    if offload_layers is not None:
        if not checkpoint:
            raise CliError("--offload-layers offloads the checkpointed layers' inputs: add --checkpoint")
        if offload_layers < 0:
            raise CliError(f"--offload-layers must be 0 or more, got {offload_layers}")
        options["offload"] = offload_layers  # the first N layers (checkpoint_layers refuses more than the model has)
    del options["offload_layers"]
    if loraplus_ratio is not None and not loraplus_ratio > 0:
        raise CliError(f"--loraplus-ratio must be a positive number, got {loraplus_ratio}")
    if threads:
        torch.set_num_threads(threads)
    if quantize is not None and quantize.lower() not in QUANT_KINDS:
        raise CliError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANT_KINDS)}")

    from ..checkpoint.io import output_folder_problem

    problem = output_folder_problem(out)
    if problem is not None:  # found before the training run, not after it
        raise CliError(f"--out: {problem}")
    schedule = _adalora_schedule(method, r, target_r, max_steps)
    config_for_method(method, r=r, alpha=alpha, dropout=dropout, targets=["probe"], **schedule)  # bad options early
    group = dist_setup.start()  # None outside torchrun
    if fsdp and group is None:
        raise CliError("--fsdp shards the model over torchrun processes; run under torchrun --nproc_per_node N")
    if group is not None and batch_size % group.world:
        raise CliError(f"--batch-size {batch_size} must be divisible by the {group.world} torchrun processes "
                       "(it is the global batch, split between them)")
    try:
        _train(group=group, **options)
    finally:
        dist_setup.finish(group)


def _adalora_schedule(method: str, r: int, target_r: int | None, max_steps: int) -> dict:
    """AdaLoRA's budget schedule follows the run's length; other methods have none."""
    if method.lower() != "adalora":
        return {}
    return dict(init_r=r, target_r=target_r or max(r // 2, 1), total_step=max_steps, tinit=max_steps // 10,
                tfinal=max_steps // 5)


def _train(*, out, model, data, method, r, target_r, alpha, targets, dropout, layers, max_steps, max_time, lr,
           batch_size, grad_accum, max_length, eval_fraction, seed, add_tokens, loraplus_ratio, threads, loss_chunk,
           checkpoint, offload, quantize, fsdp, group) -> None:
    import adapterkit as ak

    from .. import training_data as D
    from ..train import TrainConfig, seed_everything, train

    data_path = data if data is not None else D.default_dataset_path()
    records = D.load_records(data_path)  # checked before the (slower) model load
    t0 = time.perf_counter()
    base, tokenizer, resolved = load_base(model)
    if group is not None:
        base.to(group.device)
    console.print(f"model  {resolved.name_or_path} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M "
                  f"parameters, loaded in {time.perf_counter() - t0:.1f} s)")

    new_tokens = _split(add_tokens)
    new_ids = _add_tokens(base, tokenizer, new_tokens) if new_tokens else None
    if quantize is not None:
        try:
            ak.quantize_model(base, quantize.lower())
        except ak.ConfigError as err:  # bitsandbytes not installed
            raise CliError(str(err)) from err
        console.print(f"quant  {quantize.lower()} (bitsandbytes) on every linear layer but the output head")

    seed_everything(seed)
    target_list = _split(targets) or [DEFAULT_TARGETS]
    target_spec = _linear_leaf_names(base) if target_list == [DEFAULT_TARGETS] else target_list
    extra = {"trainable_token_indices": new_ids} if new_ids else {}  # only the new rows (and a tied head) train
    extra.update(_adalora_schedule(method, r, target_r, max_steps))
    cfg = config_for_method(method, r=r, alpha=alpha, dropout=dropout, targets=target_spec,
                            layers_to_transform=_layer_list(layers), task_type="CAUSAL_LM", **extra)
    ak.attach(base, cfg)
    allocator = ak.RankAllocator(base) if method.lower() == "adalora" else None
    trainable, total = ak.count_parameters(base)
    resolved_targets = ak.adapters(base)["default"].target_modules

    examples = D.tokenize_records(records, tokenizer, max_length=max_length)
    if not examples:
        raise CliError(f"{data_path}: no record has a trainable token within --max-length {max_length}")
    train_set, eval_set = D.split_train_eval(examples, eval_fraction, seed=seed)
    console.print(f"data   {data_path} ({len(records)} records: {len(train_set)} train, {len(eval_set)} held out)")
    console.print(f"{method.lower():<6} {_knobs_text(cfg)} on {_describe(resolved_targets)}: {trainable:,} trainable of "
                  f"{total:,} parameters ({100 * trainable / total:.2f}%)")

    tcfg = TrainConfig(max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                       warmup_steps=min(10, max(max_steps // 10, 1)), max_seconds=max_time,
                       loss_chunk=loss_chunk, checkpoint=checkpoint, offload=offload, loraplus_ratio=loraplus_ratio)
    if checkpoint or offload:
        from ..memory import decoder_layers

        blocks = decoder_layers(base)
        if not blocks:
            raise CliError(f"--checkpoint/--offload: found no decoder layers in {type(base).__name__}")
        if not isinstance(offload, bool) and offload > len(blocks):
            raise CliError(f"--offload-layers {offload}: {type(base).__name__} has {len(blocks)} decoder layers")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forward = dist_setup.wrap(base, group, fsdp) if group is not None else None
    part = (group.rank, group.world) if group is not None else (0, 1)
    hooks = {} if allocator is None else {"regularizer": allocator.orth_loss_term,
                                          "after_optimizer_step": allocator.step}
    result = _train_with_progress(base, train_set, eval_set, tcfg, pad_id, train, forward, part, **hooks)
    if allocator is not None:
        allocator.remove()
        console.print(f"adalora kept ranks {sorted(set(allocator.ranks().values()))} "
                      f"(budget {allocator.target_budget} over {len(allocator.layers)} layers)")

    writer = group is None or group.rank == 0
    saved = ak.save(base, out, writer=writer)  # sharded: gathered on every rank, written by rank 0
    if not writer:
        return
    if new_tokens:
        tokenizer.save_pretrained(saved)
    log = {
        "model": resolved.name_or_path,
        "data": str(data_path),
        "config": {"method": method.lower(), "r": r, "alpha": alpha, "dropout": dropout, "targets": resolved_targets,
                   "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
                   "max_length": max_length, "eval_fraction": eval_fraction, "seed": seed,
                   "layers": _layer_list(layers), "max_time": max_time,
                   "add_tokens": new_tokens, "loss_chunk": loss_chunk, "checkpoint": checkpoint,
                   "offload": offload, "quantize": quantize.lower() if quantize else None,
                   "loraplus_ratio": loraplus_ratio,
                   **({"adalora_ranks": allocator.ranks()} if allocator is not None else {})},
        "trainable_parameters": trainable,
        "processes": 1 if group is None else group.world,
        "parallel": None if group is None else ("fsdp2" if fsdp else "ddp"),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        **result.to_dict(),
    }
    (saved / "training.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    plotted = _plot_loss(result, saved / "loss.png")

    size = (saved / "adapter_model.safetensors").stat().st_size
    if result.stopped_by_time:
        console.print(f"time budget of {max_time:g} s spent after {result.completed_steps} of {max_steps} steps")
    if result.interrupted:
        console.print(f"[yellow]interrupted[/]: saved the adapter of the last completed step "
                      f"({result.completed_steps} of {max_steps})")
    before = "n/a" if result.eval_before is None else f"{result.eval_before:.3f}"
    after = "n/a" if result.eval_after is None else f"{result.eval_after:.3f}"
    console.print(f"eval loss {before} -> {after}; {result.completed_steps} steps in {result.seconds:.1f} s")
    written = ", ".join([f"adapter_model.safetensors {human_size(size)}", *(["loss.png"] if plotted else []),
                         "training.json"])
    console.print(f"saved  {saved}/ ({written})")


# The CLI's method-independent knobs, and the config field each method calls them (first one the config has).
_KNOB_FIELDS = {
    "r": ("r",),
    "alpha": ("lora_alpha", "alpha"),
    "dropout": ("lora_dropout", "rank_dropout", "vera_dropout", "oft_dropout", "module_dropout"),
}
# Names that are not a peft_type: the method table entry and fixed fields they mean.
_ALIASES = {"dora": ("LORA", {"use_dora": True})}


def _ia3_config(*, r, alpha, dropout, targets, layers_to_transform=None, **fields):
    from ..methods.ia3 import IA3Config

    if layers_to_transform:
        raise CliError("--layers is not an IA3 option; pass the wanted modules with --targets")
    return IA3Config(target_modules=targets, **fields)


def _oft_config(*, r, alpha, dropout, targets, **fields):
    from ..methods.oft import OFTConfig

    # --r is the block size (PEFT's recommended knob); the number of blocks follows from each layer's width.
    return OFTConfig(r=0, oft_block_size=r, target_modules=targets, **fields)


# Methods whose knobs do not map one to one onto --r / --alpha / --dropout.
_SPECIAL = {"ia3": _ia3_config, "oft": _oft_config}


def _knobs_text(cfg) -> str:
    """The method's size knobs for the console line (r, alpha, block size), whichever it has."""
    parts = [f"{name}={getattr(cfg, name):g}" for name in ("r", "lora_alpha", "alpha", "oft_block_size")
             if isinstance(getattr(cfg, name, None), (int, float)) and getattr(cfg, name)]
    return " ".join(parts) or "vectors"


def config_for_method(method: str, *, r: int, alpha: float, dropout: float, targets, **fields):
    """The config for `--method` from the method table, with the generic knobs put in that method's fields.

    `fields`: more config fields by their own names (layers_to_transform, task_type, ...). A knob the method does
    not have is refused unless it is left at its default (alpha for a method without one, say).
    """
    from ..errors import ConfigError
    from ..methods import METHODS

    special = _SPECIAL.get(method.lower())
    if special is not None:
        return special(r=r, alpha=alpha, dropout=dropout, targets=targets, **fields)
    peft_type, fixed = _ALIASES.get(method.lower(), (method.upper(), {}))
    entry = METHODS.get(peft_type)
    if entry is None:
        names = sorted({n.lower() for n in METHODS} | set(_ALIASES))
        raise CliError(f"unknown --method {method!r}; adapterkit implements: {', '.join(names)}")
    known = {f.name for f in dataclasses.fields(entry.config)}
    kwargs = {"target_modules": targets, **fixed, **fields}
    defaults = {"r": 16, "alpha": 32, "dropout": 0.0}
    for knob, value in (("r", r), ("alpha", alpha), ("dropout", dropout)):
        name = next((n for n in _KNOB_FIELDS[knob] if n in known), None)
        if name is not None:
            kwargs[name] = value
        elif value != defaults[knob]:
            raise CliError(f"--{knob} does not apply to --method {method}: {entry.config.__name__} has no such field")
    try:
        return entry.config(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise CliError(f"--method {method}: {exc}") from exc


def _split(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _linear_leaf_names(model) -> list[str]:
    """'all-linear' as PEFT writes it: the leaf names of every linear layer except the output head.

    Leaf names (q_proj, ...) rather than full paths, so that --layers still filters them.
    """
    from ..base_layers import is_linear
    from ..structure import iter_modules, output_head_path

    head = output_head_path(model)
    head_leaf = head.rsplit(".", 1)[-1] if head else None
    leaves = {name.rsplit(".", 1)[-1] for name, module in iter_modules(model) if name and name != head
              and is_linear(module)}
    if head_leaf in leaves:
        raise CliError(f"cannot express 'all-linear' by layer names: the output head's name {head_leaf!r} is also "
                       "used by other linear layers; pass --targets explicitly")
    return sorted(leaves)


def _layer_list(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise CliError(f"--layers {text!r}: expected indices like '15-29' or '0,4,8'") from None
    return sorted(set(out))


def _describe(targets) -> str:
    if isinstance(targets, str):
        return targets
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return ", ".join(names)


def _add_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    try:
        from ..vocab import add_tokens
    except ImportError:
        raise CliError("--add-tokens needs adapterkit.vocab.add_tokens, which this installation does not have") from None
    ids = add_tokens(model, tokenizer, tokens)
    console.print(f"vocab  added {len(tokens)} token(s): {', '.join(tokens)} (vocabulary now {len(tokenizer)})")
    return list(ids)


def _train_with_progress(model, train_set, eval_set, tcfg, pad_id, train, forward=None, part=(0, 1), **hooks):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (
        TextColumn("train"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} labelled tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=tcfg.max_steps, loss="-", speed="-")
        seen = {"tokens": 0}

        every = max(tcfg.max_steps // 10, 1)

        def on_step(log) -> None:
            seen["tokens"] += log.tokens
            speed = seen["tokens"] / max(log.seconds, 1e-9)
            progress.update(task, completed=log.step, loss=f"{log.loss:.3f}", speed=f"{speed:,.0f}")
            if not console.is_terminal and (log.step % every == 0 or log.step == 1):
                # No live bar when output goes to a file or pipe: a line now and then instead.
                console.print(f"step {log.step}/{tcfg.max_steps}  loss {log.loss:.3f}  lr {log.lr:.2e}  "
                              f"{speed:,.0f} labelled tok/s  {log.seconds:.0f} s")

        result = train(model, train_set, eval_set, tcfg, pad_id=pad_id, on_step=on_step, forward=forward, part=part,
                       **hooks)
    return result


def _plot_loss(result, path: Path) -> bool:
    """Write the loss curve to `path`; False (after a note) where matplotlib is missing."""
    plt = pyplot("loss plot")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [s.step for s in result.steps]
    ax.plot(steps, [s.loss for s in result.steps], label="train loss", lw=1.2)
    last = steps[-1] if steps else 1
    if result.eval_before is not None:
        ax.scatter([0], [result.eval_before], color="C1", zorder=3, label="eval loss")
    if result.eval_after is not None:
        ax.scatter([last], [result.eval_after], color="C1", zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("adapterkit train" + (" (interrupted)" if result.interrupted else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
