"""Cost of the base fingerprint on a SmolLM2-135M-shaped model (untrained Llama, all-linear LoRA, tied embeddings).

Prints the time to compute the fingerprint (done at save) and to compare it (done at load), and the metadata size.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.checkpoint import fingerprint as F


def main() -> None:
    cfg = LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ak.attach(model, ak.LoraConfig(r=16, target_modules="all-linear"))
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        F._positions.cache_clear()
        rows = []
        for _ in range(5):
            t0 = time.perf_counter()
            fp = F.compute(model)
            t1 = time.perf_counter()
            result = F.compare(fp, model)
            t2 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1))
        first, best = rows[0], min(rows)
        size = len(F.to_metadata(fp)[F.METADATA_KEY])
        print(
            f"{str(dtype):15s} modules {len(fp['modules'])}  compute first {first[0] * 1e3:6.1f} ms best {best[0] * 1e3:6.1f} ms"
            f"  compare first {first[1] * 1e3:6.1f} ms best {best[1] * 1e3:6.1f} ms  metadata {size / 1024:.0f} KiB"
            f"  verdict {result.describe()}"
        )


if __name__ == "__main__":
    main()
