"""(IA)³ on bitsandbytes quantized linears (Linear4bit NF4 / FP4, Linear8bitLt int8): the forward's float32
arithmetic, as PEFT's bitsandbytes (IA)³ layers compute it. Merge, unmerge and files are IA3Linear's, through the view.

    feed-forward: y = base(float32(x) ⊙ l)          other: y = base(float32(x)) ⊙ l          y cast back to x's dtype

A float32 input is used as it is, so on float32 activations this is exactly IA3Linear's forward. PEFT leaves the
result in float32 whatever the input dtype (a bfloat16 model then fails at its next float layer); here it goes back to
the input's dtype, so it equals PEFT's layer output rounded once to that dtype.
"""

from __future__ import annotations

import torch

from .ia3 import IA3Linear


class IA3BnbLinear(IA3Linear):
    """(IA)³ around a bitsandbytes Linear4bit / Linear8bitLt. The base gets a float32 input (a 4-bit layer casts it to
    its compute dtype; an int8 layer quantizes its rows from it), the vectors scale in float32; merging dequantizes,
    scales and requantizes through the layer's view, and unmerge puts the packed weight object back."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale_in, scale_out = self._scale_in, self._scale_out
        if not (scale_in or scale_out):
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        h = x.float()  # (..., in); the same tensor when x is float32
        if scale_in:
            h = h * self._product(scale_in)  # float32 whatever the vectors' dtype
        out = self.base_layer(h, *args, **kwargs)  # (..., out), float32: bitsandbytes returns its input's dtype
        if scale_out:
            out = out * self._product(scale_out)
        return out.to(dtype)
