"""Memory-lean causal-LM loss: cross-entropy through the LM head, chunk by chunk, on trained positions only.

With Llama 3's 128,256-token vocabulary the logits dominate memory and time: 8 x 2048 tokens of fp32 logits
are 8.4 GB, and their gradient as much again. Here the final hidden states are computed by the model as usual
(through whatever wraps it: PEFT, DDP, FSDP, so gradient sync still works), but the model is asked for no
logits at all (`logits_to_keep` = no positions). Then, for the positions whose next-token label is
trained only, the LM-head matmul, the log-sum-exp and the gradient are done `chunk` tokens at a time:

    loss = sum over trained t of  logsumexp(h_t W^T) - (h_t W^T)[y_t]      divided by num_items_in_batch
    d loss / d h_t = (softmax(h_t W^T) - onehot(y_t)) W                   (computed in the forward, per chunk)

Computing the gradient in the forward (as Liger does) means no chunk's logits are ever recomputed: two
matmuls per chunk instead of three. At most one chunk of logits exists at a time.

Modes: "chunked" (default), "plain" (the model's ordinary full-logits path: the baseline), "liger" (Liger's
fused Triton kernel on CUDA when installed, else chunked).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lorafit.hf_compat import compiled_inner
from lorafit.models.frozen import CastLinear

log = logging.getLogger("lorafit")

IGNORE_INDEX = -100
# Elements of one chunk of logits: 2^26 = 512 tokens x 128,256 vocab = 256 MiB in fp32. Bigger matmuls run
# closer to peak (and read the head's weight fewer times); measured on CPU, 512-token chunks were ~25% faster
# than 128-token ones, and the chunk stays small next to the full logits (8 x 2048 tokens: 8.4 GB).
CHUNK_ELEMENTS = 1 << 26
MODES = ("chunked", "plain", "liger")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with input_ids -> (B, T) targets: position t predicts labels[t+1]; the last predicts nothing."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None, mode: str = "chunked", chunk_size: int | None = None):
    """(loss, stats) of a causal LM on a batch with `labels` (-100 = not trained).

    The loss is the SUM over trained tokens divided by `num_items_in_batch` (the trained tokens of every
    micro-batch of the optimizer step, as transformers' Trainer counts them), or by this batch's own count
    when None. A batch with no trained token gives a loss of exactly 0 that still backpropagates (zeros).
    `inputs` may carry position_ids, a 2D or 4D attention_mask (packed rows) or other model kwargs.
    """
    if mode not in MODES:
        raise ValueError(f"loss mode must be one of {MODES}, got {mode!r}")
    labels = inputs["labels"]
    targets = inputs["shift_labels"] if "shift_labels" in inputs else shifted_targets(labels)
    keep = targets != IGNORE_INDEX  # (B, T)
    count = keep.sum()
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    model_inputs["use_cache"] = False

    if mode == "liger" and not liger_available(labels.device):
        _note_once("training.loss=liger needs CUDA and the liger-kernel package; using the chunked loss instead.")
        mode = "chunked"
    if mode != "plain" and (reason := _head_transform(model)):
        # The chunked kernels compute hidden @ W^T exactly; a model that rescales or caps its logits needs its own path.
        _note_once(f"this model's logits are not a plain projection ({reason}); using the full-logits loss.")
        mode = "plain"

    if mode == "plain":
        logits = model(**model_inputs).logits  # (B, T, V): the baseline materialises all of it
        loss_sum = F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.flatten().to(logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    else:
        hidden = final_hidden_states(model, model_inputs)  # (B, T, H)
        keep = keep.to(hidden.device)
        h = hidden[keep]  # (N, H): only positions whose next token is trained
        y = targets.to(hidden.device)[keep]  # (N,)
        head = output_head(model)
        with _gathered(head):
            weight, bias = _full(head.weight), _full(getattr(head, "bias", None))
            if mode == "liger":
                loss_sum = _liger_loss(h, weight, bias, y)
            elif _is_plain_linear(head):
                loss_sum = linear_cross_entropy(h, weight, y, bias, chunk_size)
            else:  # LoRA on the head, modules_to_save, ...: call the module itself, chunk by chunk
                loss_sum = _module_cross_entropy(head, h, y, chunk_size or _chunk_tokens(weight))

    # clamped: a step with no trained token (impossible after data preparation, but cheap to guard) gives 0, not NaN
    denom = count if num_items_in_batch is None else num_items_in_batch
    denom = denom.to(loss_sum.device).clamp(min=1) if torch.is_tensor(denom) else max(denom, 1)
    loss = loss_sum / denom
    return loss, {"trained_tokens": count.detach(), "loss_sum": loss_sum.detach()}


def trainer_compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None, mode="chunked"):
    """Body of `Trainer.compute_loss` for a lorafit Trainer subclass (same scaling rules as transformers').

    With `average_tokens_across_devices` the Trainer sums `num_items_in_batch` over all ranks while DDP
    averages gradients over them, so the loss is multiplied by the number of processes, as Trainer does.
    """
    loss, stats = causal_lm_loss(model, inputs, num_items_in_batch=num_items_in_batch, mode=mode)
    if getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    return (loss, {"loss": loss.detach()}) if return_outputs else loss


def final_hidden_states(model, model_inputs: dict) -> torch.Tensor:
    """The normed last hidden states (B, T, H), through the full model call with no logits computed.

    Calling the top-level model (not its `.model` body) keeps DDP's gradient hooks and FSDP's parameter
    gathering in play. `logits_to_keep` = an empty tensor of positions makes the LM head project nothing
    (an int 0 would mean "all"); transformers has accepted a 1D tensor there since 4.49.
    """
    device = next(v.device for v in model_inputs.values() if torch.is_tensor(v))
    no_positions = torch.empty(0, dtype=torch.long, device=device)
    out = model(**model_inputs, logits_to_keep=no_positions, output_hidden_states=True)
    return out.hidden_states[-1]


def unwrap(model):
    """The causal-LM module under DDP / FSDP / DeepSpeed / torch.compile / PEFT wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if compiled_inner(model) is not None:
            model = compiled_inner(model)
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def _head_transform(model) -> str | None:
    """Why the logits are more than hidden @ W^T (Gemma 2's softcapping, Cohere's or Granite's scaling), or None."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    return None


def output_head(model):
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (LM head); use training.loss=plain")
    return head


def _is_plain_linear(module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear with another forward: only the exact forward is safe to bypass
    # (or models/frozen.py's cast: the chunked kernels multiply in the weight's dtype and return fp32, as it does)
    return isinstance(module, torch.nn.Linear) and type(module).forward in (torch.nn.Linear.forward, CastLinear.forward)


def _full(param):
    """FSDP2 keeps parameters as sharded DTensors outside its forward: gather the head once per call."""
    if param is not None and hasattr(param, "full_tensor"):
        return param.full_tensor()
    return param


def _gathered(head):
    """DeepSpeed ZeRO-3 partitions every weight outside its module's forward: gather the head while we use it."""
    weight = getattr(head, "weight", None)
    if weight is not None and hasattr(weight, "ds_status"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in head.parameters()], modifier_rank=None)
    return nullcontext()


def _chunk_tokens(weight: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // weight.shape[0])


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """What the head's matmul runs in: the autocast dtype when autocast is on (mixed precision), else the weight's."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def linear_cross_entropy(hidden, weight, targets, bias=None, chunk_size: int | None = None) -> torch.Tensor:
    """Sum over rows of cross-entropy(hidden @ weight.T + bias, targets), in chunks of rows (fp32 softmax)."""
    chunk = chunk_size or _chunk_tokens(weight)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, _matmul_dtype(weight))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss sum and, per chunk, the gradients; backward only scales them.

    The loss is the last op before backward, so d loss / d logits is known in the forward; keeping it
    instead of the logits costs (N, H) instead of (N, V) memory and saves recomputing the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, mm_dtype):  # hidden (N, H), weight (V, H), targets (N,)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(chunk, n))
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(mm_dtype)  # a no-op unless autocast mixes precisions
            b = None if bias is None else bias.to(mm_dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            # One buffer for every chunk: fresh multi-MB allocations page-fault on CPU every time.
            low = torch.empty((chunk, vocab), dtype=mm_dtype, device=hidden.device)
            high = (
                low
                if mm_dtype == torch.float32
                else torch.empty((chunk, vocab), dtype=torch.float32, device=hidden.device)
            )
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk].to(mm_dtype)  # (c, H)
                t = targets[start : start + chunk, None]  # (c, 1)
                c = h.shape[0]
                z_low = torch.mm(h, w.t(), out=low[:c])  # (c, V) logits in the matmul dtype
                if b is not None:
                    z_low.add_(b)
                z = z_low if high is low else high[:c].copy_(z_low)  # (c, V) fp32
                peak = z.amax(dim=1, keepdim=True)
                target_logit = z.gather(1, t)
                z.sub_(peak).exp_()
                sum_exp = z.sum(dim=1, keepdim=True)
                total += (sum_exp.log() + peak - target_logit).sum()
                if not (need_h or need_w or need_b):
                    continue
                z.div_(sum_exp).scatter_add_(1, t, z.new_full((c, 1), -1.0))  # softmax - onehot = d loss / d logits
                g = z if high is low else low[:c].copy_(z)
                if need_h:
                    grad_h[start : start + c] = torch.mm(g, w)
                if need_w:
                    grad_w.addmm_(z.t(), h.float())
                if need_b:
                    grad_b += z.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        gh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0])
        gb = None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None


def _module_cross_entropy(head, hidden, targets, chunk: int) -> torch.Tensor:
    """A wrapped head (LoRA, modules_to_save): call it per chunk under checkpointing, so each chunk's logits
    are dropped after the forward and recomputed in its own backward."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.shape[0] == 0:
        return total + hidden.sum() * 0  # keeps the graph connected for an all-masked batch
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(
            _chunk_loss, head, hidden[start : start + chunk], targets[start : start + chunk], use_reentrant=False
        )
    return total


def _chunk_loss(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def liger_available(device) -> bool:
    import importlib.util

    return torch.device(device).type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _liger_loss(hidden, weight, bias, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0
    out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return (out[0] if isinstance(out, tuple) else out).float()


_noted: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        log.warning(message)
