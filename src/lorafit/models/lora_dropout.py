"""LoRA dropout without a dropped copy of every input, and with a cheaper mask on CPU.

PEFT computes `lora_B(lora_A(dropout(x)))`: each LoRA layer makes its own dropped copy of its input, and autograd
keeps that copy (for lora_A's weight gradient) and the mask until the backward pass. q, k and v read the same input,
so a Llama layer keeps three dropped copies of it, plus those of o, gate, up and down: in the embedded SmolLM2 that
was ~200 KiB per token for the 30 layers, beside a mask drawn by `bernoulli_`, which alone took 8% of a CPU training
step (torch's profiler, bench/train_cpu.py's real-model run).

Here lora_A does the dropout itself (`DroppedInputLinear`): it keeps the input it was given (the same tensor for
q, k and v, so one copy where PEFT kept three) and a one-byte mask, and rebuilds the dropped input in the backward
pass from the two. The result is the same function (a unit drops with probability p, survivors are scaled by
1 / (1 - p)), and the weights keep their names, so the adapter PEFT saves is unchanged.

On CPU the mask comes from 16 random bits per unit (p is rounded to a multiple of 1 / 65536, 0.05 becomes
0.050003), made by a counter-based hash rather than drawn one by one from torch's generator: torch's CPU generator
took ~12 ns per 64-bit draw and its int16 comparison ~0.7 ns per unit, together 5.4% of a real-model training step
(torch's profiler, bench/train_cpu.py --model smollm2-135m-instruct), against vectorised int32 arithmetic here.
Each mask takes two 32-bit words from torch's generator, a key and an odd stride, so it follows `torch.manual_seed`
and gradient checkpointing's saved RNG state; unit pair i is then lowbias32(i * stride + key), Chris Wellons' 32-bit
integer hash (a bijection; each output bit flips with probability ~1/2 when any input bit does). Elsewhere the mask
is torch's own `bernoulli_`.
"""

from __future__ import annotations

import torch

HALF = 1 << 15  # 16-bit draws are uniform on [-HALF, HALF)


class _DroppedInputMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p: float):
        keep = keep_mask(x, p)
        ctx.scale = 1.0 / (1.0 - p)
        # 1 / (1 - p) is applied to the rank-r output, not to the full-width input: one pass less each way
        out = torch.nn.functional.linear(x * kept(keep, x.dtype), weight).mul_(ctx.scale)  # dropped input: freed
        ctx.save_for_backward(x, keep, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, keep, weight = ctx.saved_tensors
        factors = kept(keep, x.dtype)
        grad = grad * ctx.scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype).mul_(factors)
        if ctx.needs_input_grad[1]:
            dropped = (x * factors).to(grad.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


def kept(keep, dtype):
    """The mask as 0 or 1 per element in the input's dtype: on CPU a float multiply is ~5x faster than one by a bool
    tensor, and the conversion is paid once per pass instead of once per multiply. Through uint8 (the same bytes)
    because torch 2.13's CPU bool -> float conversion is ~5x slower than uint8 -> float."""
    return keep.view(torch.uint8).to(dtype)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A mask like `x`: 1 (keep) with probability 1 - p, independently per element (bool off CPU, uint8 on CPU)."""
    if x.device.type != "cpu":
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    threshold = round(p * 2 * HALF) - HALF  # keep a unit u (uniform on [-HALF, HALF)) when u >= threshold
    if not -HALF < threshold < HALF:  # p rounds to 0 or 1
        return torch.full(x.shape, int(threshold < HALF), dtype=torch.uint8)
    units = hashed_units(x.numel())
    # clamp + subtract: 0 below the threshold, 1 from it on; ~10x cheaper than `>=` into a bool tensor here
    return units.clamp_(threshold - 1, threshold).sub_(threshold - 1).to(torch.uint8).view(x.shape)


# lowbias32's steps (https://nullprogram.com/blog/2018/07/31/): xor-shift right, multiply (as signed int32), ...
LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)), (16, None))
_COUNTER = torch.arange(0, dtype=torch.int32)  # 0, 1, 2, ...: grown to the largest mask asked for


def hashed_units(n: int) -> torch.Tensor:
    """n int16 values, uniform on [-HALF, HALF) and independent for all practical purposes (module doc)."""
    global _COUNTER
    key, stride = torch.randint(-(1 << 31), (1 << 31) - 1, (2,), dtype=torch.int32).tolist()
    size = (n + 1) // 2
    if _COUNTER.numel() < size:  # kept between calls: making it took as long as two of the passes below
        _COUNTER = torch.arange(size, dtype=torch.int32)
    words = torch.mul(_COUNTER[:size], stride | 1).add_(key)  # int32 arithmetic wraps
    shifted = torch.empty_like(words)
    for shift, multiplier in LOWBIAS32:
        # a logical shift: int32's is arithmetic, so the bits it copies from the sign are masked off
        torch.bitwise_right_shift(words, shift, out=shifted).bitwise_and_((1 << (32 - shift)) - 1)
        words.bitwise_xor_(shifted)
        if multiplier is not None:
            words.mul_(multiplier)
    return words.view(torch.int16)[:n]


class DroppedInputLinear(torch.nn.Linear):
    """PEFT's lora_A with its dropout inside (see the module doc). `p` is set by `fuse_lora_dropout`."""

    p: float = 0.0

    def forward(self, x):
        if not self.training or self.p == 0.0 or not torch.is_grad_enabled():
            return torch.nn.functional.linear(torch.nn.functional.dropout(x, self.p, self.training), self.weight)
        return _DroppedInputMatmul.apply(x, self.weight, self.p)


def fuse_lora_dropout(model) -> int:
    """Move the dropout of every plain LoRA layer (no DoRA or other variant, no bias) into its lora_A; returns how
    many layers changed. Layers of other kinds keep PEFT's own dropout."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            lora_a = module.lora_A[name] if name in getattr(module, "lora_A", {}) else None
            if not _fusable(lora_a, dropout) or name in variants:
                continue
            lora_a.__class__ = DroppedInputLinear
            lora_a.p = float(dropout.p)
            dropouts[name] = torch.nn.Identity()
            count += 1
    return count


def _fusable(lora_a, dropout) -> bool:
    return (
        type(lora_a) is torch.nn.Linear
        and lora_a.bias is None
        and type(dropout) is torch.nn.Dropout
        and 0.0 < dropout.p < 1.0
    )
