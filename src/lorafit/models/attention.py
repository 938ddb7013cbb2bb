"""Attention for training batches that never builds an L x L mask: one causal attention call per sample.

A packed micro-batch is one flat row of samples whose position_ids restart at 0 (data/collate.FlattenCollator).
Flash attention's varlen kernel keeps them apart on CUDA. Everywhere else transformers would need a mask: a 4D
block-diagonal one (B x L x L per micro-batch, converted to a float copy in every layer by CPU sdpa and kept for
backward), and with it a kernel that computes all L x L scores, masked or not. Here each sample's span of the row
gets its own `scaled_dot_product_attention(is_causal=True)` with no mask, so PyTorch's flash kernels run on CPU and
CUDA alike, only the tokens of one sample meet, and nothing L x L is made (bench/packed_attention.py measures it).

Right-padded batches (no packing) need no mask either: under causal attention a real token never sees the padding
after it, so the whole row is one causal call.

Registered with transformers' `AttentionInterface` under `lorafit_sdpa` (and `lorafit_eager`, the same split around
the eager kernel, for whoever picked eager), together with a mask function that returns no mask exactly when none is
needed and otherwise defers to transformers' own; generation with a cache or left padding goes the usual way.
"""

from __future__ import annotations

SEGMENTED = {"sdpa": "lorafit_sdpa", "eager": "lorafit_eager"}  # the kernel a model loads with -> its per-sample form


def training_attention(model, kernel: str) -> str:
    """Switch a freshly loaded model to per-sample attention for training; returns the implementation now in use.

    flash_attention_2 stays (its varlen path already keeps samples apart). A model whose attention is not plain
    full causal attention (sliding windows, soft-capping, bidirectional parts) or that cannot switch kernels keeps
    `kernel`, and packed batches then carry a 4D block mask (data/collate.BlockMaskCollator).
    """
    name = SEGMENTED.get(kernel)
    if name is None or not _full_causal(model.config):
        return kernel
    register()
    model.set_attn_implementation(name)  # logs a warning and changes nothing where a model cannot switch
    return name if model.config._attn_implementation == name else kernel


def _full_causal(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "is_causal", True) or getattr(text, "sliding_window", None):
        return False
    if any(getattr(text, key, None) for key in ("attn_logit_softcapping", "attention_chunk_size")):
        return False
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"])


def register() -> None:
    """Add lorafit's kernels and their mask functions to transformers' registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    for kernel, fallback, mask in (
        ("sdpa", sdpa_attention_forward, sdpa_mask),
        ("eager", eager_attention_forward, eager_mask),
    ):
        name = SEGMENTED[kernel]
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _segmented(kernel, fallback))
            AttentionMaskInterface.register(name, _mask_or_none(mask))


def _mask_or_none(original):
    """transformers' mask function, except: no mask at all when causal attention alone is right (see module doc)."""

    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        if q_length == kv_length and _is_zero(q_offset) and kv_offset == 0 and _right_padded(attention_mask):
            return None
        return original(
            batch_size,
            q_length,
            kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )

    return mask


def _is_zero(offset) -> bool:
    return int(offset) == 0


def _right_padded(attention_mask) -> bool:
    """No mask, or a 2D one whose zeros (padding) all come after the ones in every row."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2:
        return False
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _segmented(kernel: str, fallback):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        lengths = None
        if attention_mask is None and query.shape[2] == key.shape[2]:
            lengths = sample_lengths(kwargs.get("position_ids"), query.shape[0], query.shape[2])
        if lengths is None:  # generation with a cache, left padding, ...: transformers' kernel and mask
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return per_sample(kernel, module, query, key, value, lengths, dropout, scaling)

    attention.__name__ = f"lorafit_{kernel}_attention"
    return attention


_last_positions: tuple = (None, None)  # (position_ids tensor, its lengths): every layer of a forward gets the same one


def sample_lengths(position_ids, batch: int, length: int) -> list[int]:
    """Lengths of the samples laid end to end in the (batch * length) tokens: a sample starts at position 0 and at
    each row's start. No position_ids: each row is one sample."""
    import torch

    if position_ids is None:
        return [length] * batch
    global _last_positions
    seen, lengths = _last_positions  # one read: threads (nn.DataParallel) may replace it meanwhile
    if seen is position_ids:
        return lengths
    flat = position_ids.expand(batch, length).reshape(-1)
    starts = flat == 0
    starts[::length] = True
    cuts = torch.nonzero(starts).flatten().tolist() + [batch * length]
    lengths = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    _last_positions = (position_ids, lengths)
    return lengths


def per_sample(kernel: str, module, query, key, value, lengths: list[int], dropout: float, scaling):
    """(B, H, L, D) query, (B, KV, L, D) key/value -> (B, L, H, D): causal attention within each sample only."""
    import torch

    batch, heads, length, dim = query.shape
    if len(lengths) == batch:  # one sample per row (right padding included): no split
        lengths = [length]
    elif batch > 1:  # samples packed within several rows: one flat row of them
        query, key, value = (x.transpose(0, 1).reshape(1, x.shape[1], batch * length, dim) for x in (query, key, value))
    if kernel == "eager":
        outs = [
            _eager(module, q, k, v, dropout, scaling)
            for q, k, v, _ in _split(module, query, key, value, lengths, False)
        ]
    else:
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
            ).transpose(1, 2)
            for q, k, v, gqa in _split(module, query, key, value, lengths, True)
        ]
    out = outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=1)  # (1 or B, L, H, D)
    return out.reshape(batch, length, heads, dim), None


def _split(module, query, key, value, lengths: list[int], sdpa: bool):
    """Per-sample views of q, k, v (split along the sequence: its backward is one concatenation, not a zero-filled
    full-size gradient per sample). k/v are repeated to every query head, except where sdpa's own GQA is fast:
    on CPU `enable_gqa` runs ~25x slower than repeating k/v first (measured, torch 2.13, 150-token samples)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    gqa = sdpa and groups > 1 and query.device.type == "cuda"
    if groups > 1 and not gqa and sdpa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if len(lengths) == 1:
        return [(query, key, value, gqa)]
    return list(zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), [gqa] * len(lengths)))


def _eager(module, query, key, value, dropout: float, scaling):
    """transformers' eager kernel on one sample, with that sample's causal mask (n x n, not L x L)."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    n = query.shape[2]
    mask = torch.full((n, n), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device).triu_(1)
    out, _ = eager_attention_forward(
        module, query, key, value, mask[None, None], scaling=scaling or module.scaling, dropout=dropout
    )
    return out  # (1, n, H, D)
