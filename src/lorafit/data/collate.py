"""Batch collators: right padding for plain rows; for packed rows, attention that never crosses samples.

transformers (5.x) only keeps packed samples apart by itself in narrow cases: flash attention needs a
batch of ONE row with restarting position_ids (`_is_packed_sequence` checks batch_size == 1), and
sdpa/eager derive a block mask from position_ids only when no cache is in use (training with
`use_cache=True` creates one, and the samples then attend to each other). So:
- flash_attention_2 and lorafit's per-sample kernels (models/attention.py: `lorafit_sdpa`, `lorafit_eager`):
  the whole batch is flattened into one row, position_ids restart per sample, no attention_mask, no padding;
  the kernel finds the samples from the positions and never builds an L x L mask;
- plain sdpa / eager (a model that cannot switch kernels): a 4D block-diagonal causal mask (B, 1, T, T) that
  `masking_utils` passes through as is: bool (True = attend) for sdpa, additive float (0 / min) for eager.
labels stay aligned with input_ids (the loss shifts them); the first token of every sample is -100.
"""

from __future__ import annotations

from lorafit.data.special_tokens import IGNORE_INDEX


def make_collator(tokenizer, packed: bool, attn_implementation: str):
    """callable(list[dict]) -> dict[str, Tensor] with only model inputs (input_ids, labels, masks/positions)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; call lorafit.models.tokenizer.ensure_pad_token first")
    if not packed:
        return PadCollator(pad_id)
    if attn_implementation.startswith(("flash_attention", "lorafit_")):
        return FlattenCollator()
    return BlockMaskCollator(pad_id, additive=attn_implementation != "sdpa")


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            ids[b, :n] = torch.as_tensor(f["input_ids"])
            labels[b, :n] = torch.as_tensor(f["labels"])
            mask[b, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _segments(feature: dict) -> list[int]:
    lengths = feature.get("seq_lengths")
    return list(lengths) if lengths else [len(feature["input_ids"])]


class FlattenCollator:
    """One row holding every sample of the batch: flash attention's varlen path (or lorafit's per-sample kernel)
    keeps them apart."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels, positions = [], [], []
        for f in features:
            ids += f["input_ids"]
            labels += f["labels"]
            positions += f["position_ids"] if "position_ids" in f else list(range(len(f["input_ids"])))
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }


class BlockMaskCollator:
    def __init__(self, pad_id: int, additive: bool):
        self.pad_id = pad_id
        self.additive = additive

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        # Padding is one more segment of its own: a query row with nothing to attend to would give NaN.
        segment = torch.full((batch, width), -1, dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            ids[b, :n] = torch.as_tensor(f["input_ids"])
            labels[b, :n] = torch.as_tensor(f["labels"])
            start = 0
            for k, length in enumerate(_segments(f)):
                positions[b, start : start + length] = torch.arange(length)
                segment[b, start : start + length] = k
                start += length
            positions[b, n:] = torch.arange(width - n)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
        allowed = allowed[:, None]  # (B, 1, T, T)
        if self.additive:
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(
                ~allowed, torch.finfo(torch.float32).min
            )
        else:
            mask = allowed
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
