"""A plain LoRA linear layer's training forward and backward as one autograd function.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd nodes: the LoRA output is made at
full width, scaled in a second pass and added in a third, and in the backward the gradient is scaled again at full
width and the input gradients of the two branches are added. Here (`LoraLinearFunction`):

    forward    y  = x W^T + s (d(x) A^T) B^T           one matmul, then one `addmm_` into its output
    backward   gx = g W + d'((s g B) A)                 the LoRA part first, the base matmul accumulated into it
               gA = (s g B)^T d(x),  gB = s g^T (d(x) A^T)

with d the LoRA dropout (models/lora_dropout.py's mask: a unit kept with probability 1 - p, scaled by 1 / (1 - p))
and s the scaling, so the rank-r product is the only thing scaled. It keeps what PEFT's graph keeps (x, the one-byte
mask, the rank-r d(x) A^T), but fewer full-width temporaries exist at once. Measured on the embedded SmolLM2 (real
weights, bench data, one thread, forward + backward of the same six micro-batches alternated in one process, against
PEFT's forward with lorafit's dropout): 1.12x in total, 1.03x median per micro-batch, most on the longest one; the
peak RSS of `bench/train_cpu.py --model smollm2-135m-instruct` went from 3,832 to 3,102 MB.

Only where nothing else needs PEFT's modules to run: plain LoRA (no DoRA or other variant, no LoRA bias) on a
plain `nn.Linear` whose weight and bias are frozen (PEFT's bias='all' trains the bias), one active adapter, not
merged, no autocast (its casts are PEFT's business), and no FSDP or ZeRO-3 (their hooks gather a module's weights
when the module is called; here lora_A and lora_B are not called).
Anywhere else, and for inference, the layer is PEFT's own; the weights and the saved adapter are unchanged.
"""

from __future__ import annotations

import torch

from lorafit.models.frozen import cast_linear
from lorafit.models.lora_dropout import DroppedInputLinear, keep_mask, kept


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        flat = x.reshape(-1, x.shape[-1])
        keep = keep_mask(flat, p) if p > 0 else None
        ctx.keep_scale = 1.0 / (1.0 - p)  # applied to rank-r products, never at full width (1 without dropout)
        low = (flat * kept(keep, flat.dtype) if keep is not None else flat) @ lora_a.T  # (N, r); the dropped copy
        if keep is not None:  # is freed here and rebuilt in backward from x and the mask
            low.mul_(ctx.keep_scale)
        # x, not its flat view: q, k and v are given the same tensor, whose bf16 copy cast_linear then makes once
        out = cast_linear(x, weight, bias).view(-1, weight.shape[0]).addmm_(low, lora_b.T, alpha=scaling)
        ctx.save_for_backward(flat, keep, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, keep, low, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        factors = kept(keep, flat.dtype) if keep is not None else None
        # (N, r): the gradient of the masked input's product with A^T, LoRA's scaling and 1 / (1 - p) included
        g_low = (g @ lora_b).mul_(ctx.scaling * ctx.keep_scale)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if weight.dtype != g.dtype:  # a bf16 base (models/frozen.py): its matmul in bf16, the sum in fp32
                base = (g.to(weight.dtype) @ weight).to(g.dtype)  # (torch's mixed-dtype add_ is ~2x a cast + add_)
                grad_x = base.addmm_(g_low, lora_a) if factors is None else base.add_((g_low @ lora_a).mul_(factors))
            else:
                grad_x = g_low @ lora_a
                if factors is not None:
                    grad_x.mul_(factors)
                grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a = g_low.T @ (flat * factors if factors is not None else flat)
        if ctx.needs_input_grad[4]:
            grad_b = (low.T @ g).T.mul_(ctx.scaling)  # r x out, then viewed: ~1.4x faster than g^T @ low here
        return grad_x, None, None, grad_a, grad_b, None, None


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """PEFT's LoRA `Linear` whose training forward is `LoraLinearFunction` where it applies (module doc)."""

        def forward(self, x, *args, **kwargs):
            parts = self._fused_parts(x, args, kwargs)
            if parts is None:
                return super().forward(x, *args, **kwargs)
            return LoraLinearFunction.apply(x, *parts)

        def _fused_parts(self, x, args, kwargs):
            if args or kwargs or not torch.is_grad_enabled() or self.merged or self.disable_adapters:
                return None
            if len(self.active_adapters) != 1 or torch.is_autocast_enabled(x.device.type):
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or name in (getattr(self, "lora_variant", None) or {}):
                return None
            base, lora_a, lora_b = self.get_base_layer(), self.lora_A[name], self.lora_B[name]
            # a trained base weight or bias (PEFT's bias='all') would get no gradient from the fused function
            if lora_b.bias is not None or any(param.requires_grad for param in base.parameters()):
                return None
            if not x.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
                return None
            p = _dropout_p(lora_a, self.lora_dropout[name])
            if p is None:
                return None
            return base.weight, base.bias, lora_a.weight, lora_b.weight, float(self.scaling[name]), p

    return FusedLoraLinear


def _dropout_p(lora_a, dropout) -> float | None:
    """The dropout this layer applies now, or None where it is not one this function reproduces."""
    if isinstance(lora_a, DroppedInputLinear):  # models/lora_dropout.py moved it into lora_A
        return lora_a.p if lora_a.training else 0.0
    if type(lora_a) is not torch.nn.Linear:
        return None
    if isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.0):
        return 0.0
    return None


_CLASS = None


def _plain(layer) -> bool:
    """No DoRA or other variant and no LoRA bias, in any of the layer's adapters."""
    return not (getattr(layer, "lora_variant", None) or {}) and all(b.bias is None for b in layer.lora_B.values())


def fuse_lora_linears(model) -> int:
    """Give every plain LoRA linear layer on a plain `nn.Linear` the fused training forward; returns how many.

    Call it after `fuse_lora_dropout` (a layer whose dropout is still PEFT's keeps PEFT's forward). Not under
    FSDP or ZeRO-3 (module doc)."""
    from peft.tuners.lora.layer import Linear

    from lorafit.runtime import sharded_launch

    global _CLASS
    if sharded_launch():
        return 0
    _CLASS = _CLASS or _lora_linear_class()
    count = 0
    for module in model.modules():
        if type(module) is Linear and type(module.get_base_layer()) is torch.nn.Linear and _plain(module):
            module.__class__ = _CLASS
            count += 1
    return count
