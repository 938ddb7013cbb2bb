"""lorafit's per-sample attention (models/attention.py): samples never meet, and nothing L x L is made."""

from __future__ import annotations

import pytest
import torch
from data.test_collate import PAD, alone_losses, packed_features, samples, split_packed, tiny_llama, token_losses

from lorafit.data.collate import FlattenCollator, PadCollator, make_collator
from lorafit.models.attention import sample_lengths, training_attention
from lorafit.train.loss import causal_lm_loss

TOKENIZER = type("T", (), {"pad_token_id": PAD})()


def switched(kernel: str):
    model = tiny_llama(kernel)
    name = training_attention(model, kernel)
    assert name == f"lorafit_{kernel}" == model.config._attn_implementation
    return model


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_losses_equal_each_sample_alone(kernel):
    model = switched(kernel)
    features = packed_features()
    batch = make_collator(TOKENIZER, packed=True, attn_implementation=model.config._attn_implementation)(features)
    assert batch["input_ids"].shape == (1, 28) and "attention_mask" not in batch  # one flat row, no mask at all
    flat = {"seq_lengths": [n for f in features for n in f["seq_lengths"]]}
    packed = split_packed(token_losses(model, batch), [flat])
    alone = alone_losses(tiny_llama(kernel))  # the stock kernel, one sample at a time
    assert len(packed) == len(alone) == 5
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=0)


def test_packed_gradients_equal_the_samples_run_alone():
    """Training, not just the forward: the packed batch's LoRA-free gradients equal the sum over samples alone."""
    model = switched("sdpa").train()
    batch = FlattenCollator()(packed_features())
    loss, stats = causal_lm_loss(model, dict(batch), num_items_in_batch=1, mode="plain")
    loss.backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = tiny_llama("sdpa").train()
    for ids, labels in samples():
        for s_ids, s_labels in zip(ids, labels):
            one = PadCollator(PAD)([{"input_ids": s_ids, "labels": s_labels}])
            causal_lm_loss(reference, one, num_items_in_batch=1, mode="plain")[0].backward()
    for got, want in zip(packed, [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_right_padded_batch_needs_no_mask():
    """Without packing: transformers' mask function is asked, but a right-padded batch gets None (causal suffices),
    and every real token's loss equals the stock sdpa kernel's with its 4D padding mask."""
    model, stock = switched("sdpa"), tiny_llama("sdpa")
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(*samples()[0])]
    batch = PadCollator(PAD)(rows)
    assert (batch["attention_mask"] == 0).any()
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True
    )
    got = token_losses(model, batch)
    hook.remove()
    assert seen == [None]
    keep = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(got[keep], token_losses(stock, batch)[keep], atol=1e-5, rtol=0)


def test_no_tensor_of_length_squared_is_made():
    """The old block mask was (B, 1, L, L) and CPU sdpa kept a float copy of it per layer; now nothing autograd saves
    for backward comes near L x L elements."""
    from lorafit.models.attention import register

    register()
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    assert training_attention(model, "sdpa") == "lorafit_sdpa"
    lengths = [100] * 6  # 600 tokens in one row: L^2 = 360,000 elements; the largest per-token tensor has 600 x 64
    ids = torch.randint(1, 50, (sum(lengths),)).tolist()
    feature = {"input_ids": ids, "labels": ids, "position_ids": [p for n in lengths for p in range(n)]}
    batch = FlattenCollator()([feature])
    biggest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: biggest.append(t.numel()) or t, lambda t: t):
        loss, _ = causal_lm_loss(model, dict(batch), mode="plain")
    loss.backward()
    assert max(biggest) < 600 * 600 / 4


def test_sample_lengths_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sample_lengths(positions, 1, 9) == [3, 2, 4]
    assert sample_lengths(positions, 1, 9) == [3, 2, 4]  # cached for the next layer of the same forward
    assert sample_lengths(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]), 2, 4) == [2, 2, 3, 1]
    assert sample_lengths(None, 2, 5) == [5, 5]


def test_generation_with_left_padding_is_unchanged():
    """A switched model still generates like the stock one: with a cache or left padding transformers' own mask and
    kernel run."""
    model, stock = switched("sdpa").eval(), tiny_llama("sdpa").eval()
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != PAD).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_sliding_window_models_keep_their_kernel():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config)
    assert training_attention(model, "sdpa") == "sdpa" == model.config._attn_implementation
    assert training_attention(tiny_llama("sdpa"), "flash_attention_2") == "flash_attention_2"  # varlen: kept as is
