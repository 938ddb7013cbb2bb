"""Packing changes speed, not what is learned: a micro-batch holds the same samples with packing on or off, the
collator only lays them out in fewer rows, so both runs take the same steps with the same losses and weights."""

from __future__ import annotations

import torch
from helpers import adapter_tensors, tiny_config, train_losses

from lorafit.config import load_config
from lorafit.data.collate import BlockMaskCollator, FlattenCollator, make_collator
from lorafit.data.packing import layout_stats


def test_packing_on_and_off_train_the_same_steps(tmp_path, tiny_chat_model):
    from lorafit.train.run import run_training

    runs = {}
    for packing in (False, True):
        config = tiny_config(
            tmp_path / str(packing),
            tiny_chat_model,
            name=f"packing-{packing}",
            n_train=12,
            data={"packing": packing, "max_length": 256},
            training={"max_steps": 5, "micro_batch_size": 3, "gradient_accumulation": 2},
        )
        runs[packing] = run_training(load_config(config), quiet=True)
    off, on = train_losses(runs[False]), train_losses(runs[True])
    assert list(off) == list(on) == [1, 2, 3, 4, 5]
    for step in off:
        assert abs(off[step] - on[step]) < 1e-4 * max(1.0, abs(off[step])), (step, off[step], on[step])
    a, b = adapter_tensors(runs[False] / "adapter"), adapter_tensors(runs[True] / "adapter")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-3)


def test_the_collator_packs_one_micro_batch_into_as_few_rows_as_fit():
    pad = 0
    features = [{"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))} for n in (6, 3, 5, 2)]
    batch = make_collator(
        type("T", (), {"pad_token_id": pad})(), packed=True, attn_implementation="sdpa", max_length=8
    )(features)
    assert batch["input_ids"].shape == (2, 8)  # 6+2 and 5+3: two full rows instead of four rows of 6
    assert int((batch["labels"] != -100).sum()) == sum(n - 1 for n in (6, 3, 5, 2))  # every trained token, once
    assert sorted(batch["position_ids"][0].tolist()) == sorted(list(range(6)) + list(range(2)))
    # without a capacity each feature stays one row (features already packed keep their layout)
    assert BlockMaskCollator(pad, additive=False)(features)["input_ids"].shape == (4, 6)
    assert FlattenCollator()(features)["input_ids"].shape == (1, 16)


def test_layout_stats_count_rows_and_padding():
    lengths = [6, 3, 5, 2]
    stats = layout_stats(lengths, micro_batch=4, capacity=8, seed=0)
    assert stats["rows"] == 2 and stats["efficiency"] == 1.0
    assert stats["unpacked_rows"] == 4 and stats["unpacked_efficiency"] == round(16 / 24, 4)
    flat = layout_stats(lengths, micro_batch=2, capacity=8, seed=0, flat=True)
    assert flat["rows"] == 2 and flat["efficiency"] == 1.0
