"""Tiny transformers models built from configs (nothing downloaded) and comparison helpers for the tests.

Every builder seeds torch, so two calls give the same weights: one copy goes to PEFT, one to adapterkit.
"""

from __future__ import annotations

import os

import torch
from torch import nn

VOCAB = 128
HIDDEN = 32


def _finish(model: nn.Module, seed: int) -> nn.Module:
    # Random non-trivial weights (the default HF init leaves biases and some norms constant).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def tiny_llama(hidden: int = HIDDEN, layers: int = 2, seed: int = 0, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return _finish(LlamaForCausalLM(cfg), seed)


def tiny_gpt2(hidden: int = HIDDEN, layers: int = 2, seed: int = 0) -> nn.Module:
    """GPT-2: Conv1D layers (weight stored (in, out)) and `wte` tied to `lm_head`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return _finish(GPT2LMHeadModel(cfg), seed)


def tiny_opt(hidden: int = HIDDEN, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=hidden,
    )
    return _finish(OPTForCausalLM(cfg), seed)


def tiny_qwen2(hidden: int = HIDDEN, layers: int = 2, seed: int = 0) -> nn.Module:
    """Qwen2 with tied input/output embeddings (as the small Qwen2 checkpoints ship)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = _finish(Qwen2ForCausalLM(cfg), seed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "opt": tiny_opt, "qwen2": tiny_qwen2}


def build(arch: str, **kwargs) -> nn.Module:
    return BUILDERS[arch](**kwargs)


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    return model(input_ids=ids).logits.float()


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bool]]:
    """State dict (cloned), module types and requires_grad flags: what 'the model is unchanged' compares."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return state, types, grads


def assert_unchanged(model: nn.Module, before) -> None:
    state, types, grads = before
    after_state, after_types, after_grads = snapshot(model)
    assert after_types == types, "module structure changed"
    assert after_state.keys() == state.keys(), "state dict keys changed"
    for key, value in state.items():
        assert bit_equal(after_state[key], value), f"{key} changed"
    assert after_grads == grads, "requires_grad flags changed"


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal that also counts NaN == NaN (bitwise comparison of the stored values)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@torch.no_grad()
def perturb(params, scale: float = 0.05, seed: int = 123) -> None:
    """Add noise to the given parameters (e.g. a modules_to_save copy, so it differs from the base)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def sgd_steps(model: nn.Module, steps: int = 3, lr: float = 0.1, device: str = "cpu") -> list[list[torch.Tensor]]:
    """`steps` SGD steps, step i on `input_ids(seed=i)`; per step, detached copies of [loss, each trainable
    parameter's gradient]. The model stays in train mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    out = []
    for step in range(steps):
        ids = input_ids(seed=step).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append([loss.detach().clone()] + [p.grad.detach().clone() for p in params])
        opt.step()
        opt.zero_grad()
    return out


def train_with(model: nn.Module, after_step=None, steps: int = 12, lr: float = 1e-2, length: int = 10) -> list[float]:
    """`steps` AdamW steps on a fixed batch of 4 x `length` tokens, calling `after_step(step)` after each optimizer
    step (an AdaLoRA allocator's) when given; returns the losses and leaves the model in eval mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = input_ids(4, length)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def triton_device() -> str | None:
    """Where this process can run the Triton kernels: "cuda" on a GPU, "cpu" under Triton's interpreter
    (`TRITON_INTERPRET=1`, with triton installed), else None (those tests skip)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def stand_in_kernels(monkeypatch, module, function: str, answer, failed_flag: str) -> list:
    """Give `module` (which finds its Triton kernels through `kernels(name)`) a stand-in kernel module whose
    `function` returns `answer`, or raises it when it is an exception; `failed_flag` (the module's "the kernel
    failed once" switch) is reset. Returns the log of the stand-in's calls (their arguments)."""
    calls = []

    def run(*args):
        calls.append(args)
        if isinstance(answer, Exception):
            raise answer
        return answer

    stand_in = type("StandInKernels", (), {function: staticmethod(run)})()
    monkeypatch.setattr(module, "kernels", lambda name: stand_in)
    monkeypatch.setattr(module, failed_flag, False)
    return calls
