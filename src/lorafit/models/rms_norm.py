"""Llama's RMSNorm for fp32 training as one autograd function.

transformers' `LlamaRMSNorm` is `weight * (x * rsqrt(mean(x ** 2) + eps))` in four autograd nodes; its backward runs
`pow`'s generic gradient (`2 * x.pow(1.0)`, one transcendental per element) and a broadcast multiply per node: on
this project's CPU, fp32, one thread, the forward and backward of one (532, 576) norm took ~2.9 ms, and a Llama
forward has two per layer plus one. Here (`RMSNormFunction`), with r = rsqrt(mean(x²) + eps) per row:

    forward    y  = (x r) w                                  the sum of squares in one read, then two passes
    backward   gx = r (g w) - x (r³ / D) Σ_d (g w)_d x_d       four passes; the weight's gradient only if it trains

It keeps x and r (one number per row) for backward, where autograd's graph kept x, x r and the intermediate powers.
Same function as transformers' (rounding aside: the sum of squares is summed in another order), applied by
`fuse_rms_norms` only where x and the weight are fp32 (CPU training); bf16 and fp16 keep transformers' forward,
which casts between the two dtypes on the way.
"""

from __future__ import annotations

import torch

# Norm classes whose forward is exactly LlamaRMSNorm's (the 1 + weight of Gemma's, say, is another function).
SAME_AS_LLAMA = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        flat = x.reshape(-1, x.shape[-1])
        width = flat.shape[1]
        # mean(x²) as ||x||² / D: vector_norm reads x once and keeps no squared copy
        rstd = torch.linalg.vector_norm(flat, dim=1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        out = (flat * rstd).mul_(weight)
        ctx.save_for_backward(flat, rstd, weight)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        flat, rstd, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            coef = torch.linalg.vecdot(gw, flat).unsqueeze(1).mul_(rstd.pow(3)).div_(flat.shape[1])
            grad_x = gw.mul_(rstd).addcmul_(flat, coef, value=-1.0).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g * flat).mul_(rstd).sum(0)
        return grad_x, grad_w, None


_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _CLASSES:

        def forward(self, hidden_states):
            if hidden_states.dtype == self.weight.dtype == torch.float32 and torch.is_grad_enabled():
                return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))
            return cls.forward(self, hidden_states)

        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _CLASSES[cls]


def fuse_rms_norms(model) -> int:
    """Give every Llama-form RMSNorm of `model` the fused fp32 training forward; returns how many changed."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if (
            cls.__name__ in SAME_AS_LLAMA
            and cls.__module__.startswith("transformers.models.")
            and hasattr(module, "variance_epsilon")
        ):
            module.__class__ = _fused_class(cls)
            count += 1
    return count
