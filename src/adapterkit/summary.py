"""`print_trainable_parameters`: PEFT's one-line parameter summary, plus how many parameters each adapter owns."""

from __future__ import annotations

from torch import nn

from .state import adapter_state, unwrap
from .verbs import count_parameters


def parameter_summary(model: nn.Module) -> dict:
    """{"trainable", "total", "adapters": {name: parameters that adapter owns}}; shared tensors counted once."""
    model = unwrap(model)
    trainable, total = count_parameters(model)
    state = adapter_state(model)
    owned: dict[str, int] = {}
    for name in state.configs if state is not None else ():
        seen: dict[int, int] = {}
        for wrapper in state.wrappers.values():
            if name in wrapper.adapter_names:
                for p in wrapper.adapter_parameters(name):
                    seen[id(p)] = p.numel()
        owned[name] = sum(seen.values())
    return {"trainable": trainable, "total": total, "adapters": owned}


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's line `trainable params: N || all params: M || trainable%: P`, then one line per
    adapter: its parameters, and whether it is active and trainable."""
    info = parameter_summary(model)
    share = 100 * info["trainable"] / info["total"] if info["total"] else 0.0
    lines = [f"trainable params: {info['trainable']:,d} || all params: {info['total']:,d} || trainable%: {share:.4f}"]
    state = adapter_state(unwrap(model))
    for name, count in info["adapters"].items():
        cfg = state.configs[name]
        flags = [f"{cfg.peft_type.lower()}"]
        flags.append("active" if name in state.active else "inactive")
        if cfg.inference_mode:
            flags.append("frozen (inference mode)")
        lines.append(f"  adapter {name!r}: {count:,d} params ({', '.join(flags)})")
    text = "\n".join(lines)
    print(text)
    return text
