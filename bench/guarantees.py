"""What adapterkit guarantees that PEFT does not: each row measured side by side on the real SmolLM2-135M.

Runs PEFT (the installed version) and adapterkit on the same scenario and prints a markdown table: adapter file
sizes in MB, logit max-abs-diff against the unmerged in-memory model (fp32), or the error text. Nothing is asserted.

    python bench/guarantees.py [--model DIR] > bench/guarantees.md
    python bench/guarantees.py --only report,fingerprint     # some row groups only (see --help)
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
# --only names -> Bench methods, in table order
GROUPS = {
    "sizes": "sizes",
    "resized": "resized_vocab",
    "ties": "ties",
    "peft-reads": "peft_reads_shared_copies",
    "report": "report",
    "fingerprint": "fingerprint",
}


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    # Every case starts here: seeding the global generator makes each case's adapter initialisation (PEFT's and
    # ours both draw from it) independent of what ran before, so the table is reproducible row by row.
    torch.manual_seed(0)
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

    # -- failures 4/5 (BRIEF): load reports, wrong base ---------------------------------------------------------------
    def short(self, exc: BaseException, limit: int = 150) -> str:
        """An error's text cut to `limit` characters, with the temporary folder abbreviated."""
        text = " ".join(str(exc).split()).replace(str(self.tmp), "…").replace(str(self.model_dir), "<SmolLM2 dir>")
        text = f"{type(exc).__name__}: {text}".replace("|", "/")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def report(self) -> None:
        """A PEFT adapter with LoRA on embed_tokens (PEFT also saves the base embedding); then its base copy edited."""
        import peft
        from safetensors.torch import load_file, save_file

        model = load_base(self.model_dir)
        pm = quiet(peft.get_peft_model, model, peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "embed_tokens"]))
        train_like(trainable(pm, "lora_B", "lora_embedding_B"))
        orig = self.dir("report-orig")
        quiet(pm.save_pretrained, str(orig))
        tensors = load_file(str(orig / "adapter_model.safetensors"))
        base_keys = sorted(k for k in tensors if "lora_" not in k)
        edited = self.dir("report-edited")
        for f in orig.iterdir():
            if f.name != "adapter_model.safetensors":
                (edited / f.name).write_bytes(f.read_bytes())
        gen = torch.Generator().manual_seed(1)
        noise = {k: torch.randn(tensors[k].shape, generator=gen) * 0.01 for k in base_keys}
        changed = {k: v + noise[k] if k in noise else v for k, v in tensors.items()}
        save_file(changed, str(edited / "adapter_model.safetensors"), metadata={"format": "pt"})
        key = base_keys[0] if base_keys else "(none)"
        setup = (f"PEFT adapter, LoRA r=16 on q,v,embed_tokens; PEFT's file also holds the base embedding "
                 f"(`{key}`, {len(base_keys)} base tensor(s) of {len(tensors)})")

        def embed_change(fresh, before) -> str:
            after = fresh.get_input_embeddings().weight if not hasattr(fresh.get_input_embeddings(), "base_layer") \
                else fresh.get_input_embeddings().base_layer.weight
            return f"{(after.detach() - before).abs().max().item():.2g}"

        def peft_load(folder: Path) -> str:
            fresh = load_base(self.model_dir)
            before = fresh.get_input_embeddings().weight.detach().clone()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loaded = quiet(peft.PeftModel.from_pretrained, fresh, str(folder))
                    # the unfiltered result of PEFT's loading function, on the one adapter ("default") just loaded
                    raw = quiet(peft.set_peft_model_state_dict, loaded,
                                load_file(str(folder / "adapter_model.safetensors")))
                    # PEFT's public method, which filters that list (a second adapter, the same file)
                    result = quiet(loaded.load_adapter, str(folder), adapter_name="again")
                missing = list(result.missing_keys)
                raw_missing = list(raw.missing_keys)
                base_missing = [k for k in raw_missing if "lora_" not in k]
                warned = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                          or "base" in str(w.message).lower()]
                return (f"loaded, no error; base embedding max abs change {embed_change(loaded, before)}; "
                        f"`load_adapter` result: {len(missing)} missing keys; `set_peft_model_state_dict` result: "
                        f"{len(raw_missing)} missing keys, {len(base_missing)} of them base weights "
                        f"(e.g. `{base_missing[0] if base_missing else '-'}`)"
                        + (f"; warned: {warned[0][:80]}" if warned else "; no warning"))
            except Exception as exc:  # noqa: BLE001
                return self.short(exc)

        def ak_load(folder: Path) -> str:
            fresh = load_base(self.model_dir)
            before = fresh.get_input_embeddings().weight.detach().clone()
            try:
                rep = ak.load(fresh, folder)
                return (f"loaded; base embedding max abs change {embed_change(fresh, before)}; report: "
                        f"{len(rep.applied)} applied, {len(rep.skipped)} identical-to-base skipped, "
                        f"{len(rep.refused)} refused, {len(rep.unexpected)} unexpected, missing {len(rep.missing)}")
            except ak.AdapterLoadError as exc:
                return f"{self.short(exc, 200)}<br>base embedding max abs change {embed_change(fresh, before)}"
            except Exception as exc:  # noqa: BLE001
                return self.short(exc)

        g = "Load report accounts for every tensor"
        self.rows.append((g, setup + ", unmodified file", peft_load(orig), ak_load(orig)))
        self.rows.append((g, setup + ", the base embedding in the file edited (+0.01 noise): a file that would "
                          "overwrite a base weight", peft_load(edited), ak_load(edited)))

    def fingerprint(self) -> None:
        """An adapter saved on SmolLM2-135M, loaded onto other bases."""
        import peft
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        folders = {}
        for side in ("peft", "ak"):
            model = load_base(self.model_dir)
            out = self.dir(f"fp-{side}")
            if side == "peft":
                pm = quiet(peft.get_peft_model, model, peft.LoraConfig(**kwargs))
                train_like(trainable(pm, "lora_B"))
                quiet(pm.save_pretrained, str(out))
            else:
                ak.attach(model, ak.LoraConfig(**kwargs))
                train_like(trainable(model, "lora_B"))
                ak.save(model, out)
            folders[side] = out

        def bf16():
            return load_base(self.model_dir).to(torch.bfloat16)

        def quant4():
            model = load_base(self.model_dir)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2 and p.numel() % 64 == 0:
                        g = p.view(-1, 64)
                        scale = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
                        g.copy_((g / scale).round().clamp(-7, 7) * scale)
            return model

        def random_init():
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model_dir),
                                                    dtype=torch.float32).eval()

        def fewer_layers():
            return quiet(AutoModelForCausalLM.from_pretrained, self.model_dir, dtype=torch.float32,
                         num_hidden_layers=20).eval()

        cases = [
            ("(a) the same base cast to bf16", bf16),
            ("(b) a 4-bit fake-quantized copy (absmax per group of 64)", quant4),
            ("(c) same architecture, other weights (randomly initialised from the same config)", random_init),
            ("(d) fewer layers (same weights, `num_hidden_layers=20` instead of 30)", fewer_layers),
        ]
        for setup, make in cases:
            cells = []
            for side in ("peft", "ak"):
                target = make()
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        if side == "peft":
                            quiet(peft.PeftModel.from_pretrained, target, str(folders[side]))
                            rep = None
                        else:
                            rep = ak.load(target, folders[side])
                    texts = [" ".join(str(w.message).split()) for w in caught]
                    relevant = [t for t in texts if any(w in t.lower() for w in ("key", "base", "missing", "differ"))]
                    cell = "loaded, no error" + (f"; warned: {relevant[0][:120]}" if relevant else ", no warning")
                    if rep is not None:
                        cell = f"loaded; report.base_check: {rep.base_check[:120]}"
                    cells.append(cell)
                except Exception as exc:  # noqa: BLE001
                    cells.append(self.short(exc, 200))
            self.rows.append(("Wrong base detected", f"LoRA r=16 on q,v saved on SmolLM2-135M, loaded onto {setup}",
                              *cells))

    def table(self) -> str:
        import peft

        lines = [
            "### What adapterkit guarantees that PEFT does not",
            "",
            f"Measured by `bench/guarantees.py` (PEFT {peft.__version__}, torch {torch.__version__}, fp32, CPU). "
            "Logit differences are against the same side's unmerged in-memory model; sizes are the adapter file. "
            + (f"Logits reach |{self.logit_scale:.0f}|, so a merged weight's fp32 rounding alone "
               "accounts for differences up to about 1e-4." if hasattr(self, "logit_scale") else ""),
            "",
            f"| Guarantee | Setup | PEFT {peft.__version__} | adapterkit |",
            "|---|---|---|---|",
        ]
        lines += [f"| {g} | {s} | {p} | {a} |" for g, s, p, a in self.rows]
        return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local transformers directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--only", help="comma-separated row groups to run (default: all): " + ", ".join(GROUPS))
    parser.add_argument("--rows-only", action="store_true", help="print only the table rows, no header")
    args = parser.parse_args()
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown row group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if args.model:
        model_dir = Path(args.model)
    else:
        from adapterkit.base_models import resolve_model

        model_dir = Path(resolve_model(None).local_dir)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    bench = Bench(model_dir)
    for group in GROUPS:
        if group in groups:
            getattr(bench, GROUPS[group])()
    table = bench.table()
    if args.rows_only:  # for appending to an existing table
        table = "".join(f"{line}\n" for line in table.splitlines() if line.startswith("| ") and "Guarantee" not in line)
    print(table, end="")


if __name__ == "__main__":
    main()
