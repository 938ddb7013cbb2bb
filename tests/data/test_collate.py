"""Packed samples never attend to each other: their losses equal those of each sample run alone."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model

from lorafit.data.collate import (
    BlockMaskCollator,
    FlattenCollator,
    PadCollator,
    make_collator,
)
from lorafit.data.packing import pack_rows

PAD = 0
LENGTHS = [[7, 5, 3], [9, 4]]  # two packed rows of different widths, so padding is involved too


def tiny_llama(attn: str):
    model = tiny_llama_model(vocab_size=101, max_position_embeddings=128, attn_implementation=attn)
    return model.eval().to(torch.float32)


def samples():
    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in LENGTHS:
        ids = [torch.randint(1, 101, (n,), generator=g).tolist() for n in lengths]
        labels = [[-100] + s[1:] for s in ids]
        rows.append((ids, labels))
    return rows


def packed_features():
    feats = []
    for ids, labels in samples():
        out = pack_rows({"member_ids": [ids], "member_labels": [labels]})
        feats.append({k: v[0] for k, v in out.items()})
    return feats


def token_losses(model, batch) -> torch.Tensor:
    """Per-position loss, labels shifted the way the trainer does (position t predicts labels[t + 1])."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100
    )


def alone_losses(model) -> list[torch.Tensor]:
    out = []
    for ids, labels in samples():
        for s_ids, s_labels in zip(ids, labels):
            batch = PadCollator(PAD)([{"input_ids": s_ids, "labels": s_labels}])
            out.append(token_losses(model, batch)[0])
    return out


def split_packed(losses: torch.Tensor, features) -> list[torch.Tensor]:
    """Cut each row's per-position losses back into its samples (the last position of a sample predicts the next one's -100)."""
    out = []
    for b, f in enumerate(features):
        start = 0
        for n in f["seq_lengths"]:
            out.append(losses[b, start : start + n - 1])
            start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_alone(attn):
    model = tiny_llama(attn)
    features = packed_features()
    batch = make_collator(type("T", (), {"pad_token_id": PAD})(), packed=True, attn_implementation=attn)(features)
    assert batch["attention_mask"].shape == (2, 1, 15, 15)
    packed = split_packed(token_losses(model, batch), features)
    alone = alone_losses(model)
    assert len(packed) == len(alone) == 5
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=0)


def test_naive_packing_without_the_mask_differs():
    """Restarting position_ids alone is not enough in training mode (a cache is created, so transformers skips its
    packed-sequence detection): samples attend to each other and the losses change."""
    model = tiny_llama("sdpa")
    features = packed_features()
    batch = BlockMaskCollator(PAD, additive=False)(features)
    del batch["attention_mask"]
    packed = split_packed(token_losses(model, batch), features)
    alone = alone_losses(model)
    assert max((p - a).abs().max().item() for p, a in zip(packed, alone)) > 1e-3


def test_flattened_batch_for_varlen_attention_keeps_samples_apart():
    """The flash-attention layout (one row, restarting positions, no mask), checked on CPU through sdpa with
    use_cache=False, where transformers builds the same block mask from position_ids that varlen flash uses."""
    model = tiny_llama("sdpa")
    features = packed_features()
    batch = FlattenCollator()(features)
    assert batch["input_ids"].shape == (1, 28) and "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    flat = {"seq_lengths": [n for f in features for n in f["seq_lengths"]]}
    for p, a in zip(split_packed(losses, [flat]), alone_losses(model)):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_flash_attention_varlen_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn")
    model = tiny_llama("flash_attention_2").to("cuda", torch.bfloat16)
    features = packed_features()
    batch = {k: v.cuda() for k, v in FlattenCollator()(features).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    flat = {"seq_lengths": [n for f in features for n in f["seq_lengths"]]}
    model_ref = tiny_llama("sdpa").to("cuda", torch.bfloat16)
    model_ref.load_state_dict(model.state_dict())
    alone = []
    for ids, labels in samples():
        for s_ids, s_labels in zip(ids, labels):
            b = {k: v.cuda() for k, v in PadCollator(PAD)([{"input_ids": s_ids, "labels": s_labels}]).items()}
            alone.append(token_losses(model_ref, b)[0].float())
    for p, a in zip(split_packed(losses, [flat]), alone):
        torch.testing.assert_close(p, a, atol=5e-2, rtol=0)  # bf16 kernels differ in rounding only


def test_pad_collator_pads_right_and_masks_labels():
    batch = PadCollator(PAD)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
