"""What adapterkit guarantees that PEFT does not: each row measured side by side on the real SmolLM2-135M.

Runs PEFT (the installed version) and adapterkit on the same scenario and prints a markdown table: adapter file
sizes in MB, logit max-abs-diff against the unmerged in-memory model (fp32), or the error text. Nothing is asserted.

    python bench/guarantees.py [--model DIR] > bench/guarantees.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit import vocab

NEW_TOKENS = 100
TIED_TRAINED = ("lm_head.lora_B", "embed_tokens.lora_embedding_B", "modules_to_save")
IDS_LEN = 12


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def train_like(params, scale: float = 0.02, seed: int = 0) -> None:
    """Stand-in for training: move the given trainable tensors by small deterministic noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def trainable(model, *words: str):
    return [p for n, p in model.named_parameters() if p.requires_grad and any(w in n for w in words)]


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def diff(a, b) -> str:
    return f"max abs diff {(a - b).abs().max().item():.2g}"


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("adapter_model.*")) / 1e6


def error_text(exc: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in lines if "size mismatch" in line]  # torch's load_state_dict puts the cause below
    text = f"{type(exc).__name__}: {' '.join(lines[:1] + detail[:1])}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quiet(fn, *args, **kwargs):
    """Run fn with warnings and stdout/stderr chatter suppressed; returns its result (exceptions propagate)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class Bench:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix="guarantees-"))
        self.rows: list[tuple[str, str, str, str]] = []
        base = load_base(model_dir)
        self.vocab_rows = base.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, self.vocab_rows, (2, IDS_LEN), generator=gen)
        self.ids_new = self.ids.clone()
        self.ids_new[:, ::3] = torch.arange(self.vocab_rows, self.vocab_rows + self.ids_new[:, ::3].numel()).view(2, -1)

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resized(self):
        model = load_base(self.model_dir)
        tok = type(self.tok).from_pretrained(self.model_dir)
        new_ids = vocab.add_tokens(model, tok, [f"<new_{i}>" for i in range(NEW_TOKENS)])
        return model, tok, new_ids

    # -- 1. only what training changed is saved ----------------------------------------------------------------
    def sizes(self) -> None:
        import peft

        cases = [
            ("LoRA r=16 on q_proj, v_proj, lm_head (tied)", dict(target_modules=["q_proj", "v_proj", "lm_head"]), False),
            (f"+{NEW_TOKENS} tokens, LoRA r=16 on q,v, the new rows trainable (`trainable_token_indices`)", {}, True),
            (f"+{NEW_TOKENS} tokens, LoRA r=16 on q,v, `modules_to_save=[lm_head, embed_tokens]`",
             dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"]), True),
        ]
        for i, (setup, kwargs, resize) in enumerate(cases):
            results = []
            for side in ("peft", "ak"):
                if resize:
                    model, _, new_ids = self.resized()
                    if not kwargs:
                        kwargs = dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=new_ids)
                else:
                    model = load_base(self.model_dir)
                out = self.dir(f"size{i}-{side}")
                try:
                    if side == "peft":
                        pm = quiet(peft.get_peft_model, model, peft.LoraConfig(r=16, lora_alpha=32, **kwargs))
                        quiet(pm.save_pretrained, str(out))
                    else:
                        ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, **kwargs))
                        ak.save(model, out)
                    results.append(f"{size_mb(out):.1f} MB")
                except Exception as exc:  # noqa: BLE001 - the table reports whatever happened
                    results.append(error_text(exc))
            self.rows.append(("Only what training changed is saved", f"SmolLM2-135M, {setup}", *results))

    # -- 2./3. resized vocabulary loads onto the original base ----------------------------------------------------
    def resized_vocab(self) -> None:
        import peft

        cases = [
            ("`trainable_token_indices` (the new rows)", None),
            ("`modules_to_save=[lm_head, embed_tokens]`", ["lm_head", "embed_tokens"]),
        ]
        for i, (setup, mts) in enumerate(cases):
            results = []
            for side in ("peft", "ak"):
                model, _, new_ids = self.resized()
                kwargs = dict(target_modules=["q_proj", "v_proj"])
                if mts:
                    kwargs["modules_to_save"] = mts
                else:
                    kwargs["trainable_token_indices"] = new_ids
                out = self.dir(f"resized{i}-{side}")
                fresh = load_base(self.model_dir)  # never resized
                try:
                    if side == "peft":
                        pm = quiet(peft.get_peft_model, model, peft.LoraConfig(r=16, lora_alpha=32, **kwargs))
                        train_like(trainable(pm, "lora_B", "trainable_tokens", "modules_to_save"))
                        ref = logits(pm.eval(), self.ids_new)
                        quiet(pm.save_pretrained, str(out))
                        loaded = quiet(peft.PeftModel.from_pretrained, fresh, str(out)).eval()
                    else:
                        ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, **kwargs))
                        train_like(trainable(model, "lora_B", "trainable_tokens", "modules_to_save"))
                        ref = logits(model, self.ids_new)
                        ak.save(model, out)
                        ak.load(fresh, out)
                        loaded = fresh
                    results.append(diff(logits(loaded, self.ids_new), ref))
                except Exception as exc:  # noqa: BLE001
                    results.append(error_text(exc))
            self.rows.append((
                "Resized vocabulary loads onto the original base",
                f"SmolLM2-135M +{NEW_TOKENS} tokens, {setup}, adapter loaded onto the un-resized base",
                *results,
            ))
        # The user forbids resizing: one clear error.
        fresh = load_base(self.model_dir)
        try:
            ak.load(fresh, self.tmp / "resized0-ak", resize=False)
            ours = "loaded (unexpected)"
        except ak.AdapterLoadError as exc:
            ours = error_text(exc, limit=400)
        self.rows.append((
            "Resized vocabulary loads onto the original base",
            "as above, loading with resizing forbidden (`resize=False`)",
            "(no such option: the load fails as in the row above)",
            ours,
        ))

    # -- 4. tied weights through merge / save_pretrained / reload -------------------------------------------------
    def ties(self) -> None:
        import peft
        from transformers import AutoModelForCausalLM

        cases = [
            ("LoRA on lm_head", dict(target_modules=["q_proj", "v_proj", "lm_head"])),
            ("LoRA on embed_tokens", dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
            ("LoRA on embed_tokens and lm_head", dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])),
            ("`modules_to_save=[lm_head]`", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
            ("`modules_to_save=[embed_tokens, lm_head]`",
             dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
        ]
        for i, (setup, kwargs) in enumerate(cases):
            per_side: dict[str, list[str]] = {}
            for side in ("peft", "ak"):
                out = self.dir(f"ties{i}-{side}")
                model = load_base(self.model_dir)
                cells = []
                try:
                    if side == "peft":
                        model = quiet(peft.get_peft_model, model, peft.LoraConfig(r=16, lora_alpha=32, **kwargs)).eval()
                    else:
                        ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, **kwargs))
                    # Train only the tied pair's adapter (q,v stay zero): the merged diffs isolate the tie handling.
                    train_like(trainable(model, *TIED_TRAINED), scale=0.05)
                    ref = logits(model, self.ids)
                    self.logit_scale = max(getattr(self, "logit_scale", 0.0), ref.abs().max().item())
                    # saved adapter, loaded onto a fresh base
                    if side == "peft":
                        quiet(model.save_pretrained, str(out / "adapter"))
                        loaded = quiet(peft.PeftModel.from_pretrained, load_base(self.model_dir), str(out / "adapter"))
                    else:
                        ak.save(model, out / "adapter")
                        loaded = load_base(self.model_dir)
                        ak.load(loaded, out / "adapter")
                    cells.append(diff(logits(loaded.eval(), self.ids), ref))
                    # merged and unloaded, in memory
                    merged = quiet(model.merge_and_unload) if side == "peft" else ak.unload(model, merge=True)
                    cells.append(diff(logits(merged, self.ids), ref))
                    # merged model written with save_pretrained, read back by transformers
                    quiet(merged.save_pretrained, str(out / "merged"))
                    reloaded = quiet(AutoModelForCausalLM.from_pretrained, str(out / "merged"), dtype=torch.float32)
                    cells.append(diff(logits(reloaded.eval(), self.ids), ref))
                except Exception as exc:  # noqa: BLE001
                    cells.append(error_text(exc))
                per_side[side] = cells
            labels = ["saved + loaded adapter: ", "merged: ", "merged, save_pretrained, from_pretrained: "]
            cells = {s: "<br>".join(label + c for label, c in zip(labels, v)) for s, v in per_side.items()}
            self.rows.append((
                "Tied weights survive merge, save and reload",
                f"SmolLM2-135M (embed_tokens = lm_head), {setup}; vs the unmerged in-memory model",
                cells["peft"],
                cells["ak"],
            ))

    def peft_reads_shared_copies(self) -> None:
        """The one case where saving a shared tensor once costs PEFT compatibility; measured, with the way out."""
        import peft

        model = load_base(self.model_dir)
        ak.attach(model, ak.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["embed_tokens", "lm_head"]))
        train_like(trainable(model, *TIED_TRAINED), scale=0.05)
        ref = logits(model, self.ids)
        cells, ours = [], []
        for label, compat in (("default file", False), ("`peft_compatible=True`", True)):
            out = self.dir(f"peft-reads-{compat}")
            ak.save(model, out, peft_compatible=compat)
            fresh = load_base(self.model_dir)
            ak.load(fresh, out)
            ours.append(f"{label}: {diff(logits(fresh, self.ids), ref)}")
            try:
                loaded = quiet(peft.PeftModel.from_pretrained, load_base(self.model_dir), str(out)).eval()
                cells.append(f"{label} ({size_mb(out):.1f} MB): {diff(logits(loaded, self.ids), ref)}")
            except Exception as exc:  # noqa: BLE001
                cells.append(f"{label} ({size_mb(out):.1f} MB): {error_text(exc)}")
        self.rows.append((
            "(trade-off) PEFT reading adapterkit's tied copies",
            "SmolLM2-135M, `modules_to_save=[embed_tokens, lm_head]` saved by adapterkit, loaded by PEFT",
            "<br>".join(cells),
            "<br>".join(ours),
        ))

    def table(self) -> str:
        import peft

        lines = [
            "### What adapterkit guarantees that PEFT does not",
            "",
            f"Measured by `bench/guarantees.py` (PEFT {peft.__version__}, torch {torch.__version__}, fp32, CPU). "
            "Logit differences are against the same side's unmerged in-memory model; sizes are the adapter file. "
            f"Logits reach |{getattr(self, 'logit_scale', 0.0):.0f}|, so a merged weight's fp32 rounding alone "
            "accounts for differences up to about 1e-4.",
            "",
            f"| Guarantee | Setup | PEFT {peft.__version__} | adapterkit |",
            "|---|---|---|---|",
        ]
        lines += [f"| {g} | {s} | {p} | {a} |" for g, s, p, a in self.rows]
        return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local transformers directory (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()
    if args.model:
        model_dir = Path(args.model)
    else:
        from adapterkit.models import resolve_model

        model_dir = Path(resolve_model(None).local_dir)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    bench = Bench(model_dir)
    bench.sizes()
    bench.resized_vocab()
    bench.ties()
    bench.peft_reads_shared_copies()
    print(bench.table(), end="")


if __name__ == "__main__":
    main()
