"""The frozen base's linear layers in bf16 while everything trained stays fp32 (`model.frozen_dtype`).

On a CPU with a bf16 matrix unit (Intel AMX) a bf16 matmul runs ~4x faster than an fp32 one, and the base's linear
layers are ~60% of a LoRA training step on the embedded model. Their weights never change, so they are stored in
bf16 and multiplied in bf16 (oneDNN accumulates in fp32); their inputs are rounded to bf16 for the matmul and the
outputs come back in fp32, as under autocast. Unlike autocast, the LoRA weights and their matmuls, the residual
stream, norms, attention, the optimizer and the loss's softmax stay fp32, and no per-step cast of a weight is made.

Cast: every frozen plain `nn.Linear` becomes a `CastLinear`: LoRA's base layers (models/lora_linear.py's fused
function multiplies them in their own dtype; PEFT's forward calls the layer), untargeted projections, the LM head
(train/loss.py's chunked loss multiplies in the weight's dtype). A head tied to the input embeddings gets its own
bf16 copy (the embeddings stay fp32). Base layers of a LoRA variant (DoRA reads the weight) stay as they are. The
adapter saved is unchanged: only frozen weights are touched.
"""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F


class CastLinear(torch.nn.Linear):
    """A frozen `nn.Linear` whose weight is narrower than its input: the matmul in the weight's dtype, the output in
    the input's (autograd casts the gradient back the same way)."""

    def forward(self, x):
        return cast_linear(x, self.weight, self.bias)


def cast_linear(x, weight, bias=None):
    """x W^T + b in the weight's dtype, the result in the input's (plain `linear` where the two agree)."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(narrowed(x, weight.dtype), weight, bias).to(x.dtype)


class _LastCast:
    source = None  # a weak reference to the input last cast, so the cache never keeps it alive
    version = -1
    copy = None


def narrowed(x, dtype):
    """`x.to(dtype)`, made once for consecutive calls on the same unchanged tensor: q, k and v read one input, and
    gate and up another (three casts of the six saved per decoder layer). Only where the cast makes no autograd
    node (inside the fused LoRA function, under no_grad, frozen inputs): a cached node would be shared silently."""
    if (torch.is_grad_enabled() and x.requires_grad) or x.is_inference():
        return x.to(dtype)  # (inference tensors have no version counter to check)
    last = _LastCast
    if last.copy is not None and last.copy.dtype == dtype and last.source() is x and last.version == x._version:
        return last.copy
    copy = x.to(dtype)
    last.source, last.version, last.copy = weakref.ref(x), x._version, copy
    return copy


def store_frozen_linears(model, dtype: torch.dtype) -> int:
    """Keep the frozen linear layers of `model` (a PEFT model) in `dtype` (module doc); returns how many."""
    from peft.tuners.lora.layer import LoraLayer

    peft_owned = set()  # base layers a LoRA variant (DoRA) reads the weight of: left alone
    for module in model.modules():
        if isinstance(module, LoraLayer) and _has_variant(module):
            peft_owned.add(id(module.get_base_layer()))
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or id(module) in peft_owned:
            continue
        if any(param.requires_grad for param in module.parameters()):
            continue
        # a new Parameter, not an in-place cast: a weight tied to the input embeddings keeps its fp32 original there
        module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        module.__class__ = CastLinear
        count += 1
    if count:
        # transformers maps the checkpoint file, and its pages stay resident while any tensor still views them:
        # cloning what stays in the model's dtype (embeddings, norms) lets the mapping go, and with it the originals
        # of the layers cast here (~540 MB of fp32 pages for the embedded model, measured with /proc/self/status)
        for param in model.parameters():
            if not param.requires_grad and param.dtype != dtype:
                param.data = param.data.clone()
        gc.collect()  # now, not at the collector's next full pass: loader objects in reference cycles hold the map
    return count


def _has_variant(layer) -> bool:
    return bool(getattr(layer, "lora_variant", None)) or any(getattr(layer, "use_dora", {}).values())
