"""The chunked loss equals the plain full-logits loss (value and gradients), on every head and batch shape."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lorafit.train.loss import causal_lm_loss, linear_cross_entropy, shifted_targets

VOCAB = 512


def tiny_model(seed=0, lora_targets="all-linear", modules_to_save=None, tie=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    base = LlamaForCausalLM(cfg)
    # init_lora_weights=False: B is random too, so every LoRA parameter gets a non-zero gradient to compare
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=lora_targets,
        init_lora_weights=False,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def batch(lengths, seed=1, pad_id=0, prompt=3):
    """Right-padded rows; the first `prompt` tokens of each row are untrained (-100), as are pads."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    labels = torch.full((len(lengths), width), -100)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(1, VOCAB, (n,), generator=g)
        ids[i, :n] = row
        labels[i, prompt:n] = row[prompt:]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, inputs, mode, num_items=None, chunk_size=None):
    model.zero_grad(set_to_none=True)
    loss, stats = causal_lm_loss(model, inputs, num_items_in_batch=num_items, mode=mode, chunk_size=chunk_size)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, stats


def assert_same(a, b, tol=1e-5):
    (la, ga, _), (lb, gb, _) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_linear_cross_entropy_matches_autograd_for_hidden_weight_and_bias():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy(h, w, y, b, chunk_size=8)  # 5 chunks, the last one partial
    (gh, gw, gb) = torch.autograd.grad(3.0 * ours, (h, w, b))
    ref = F.cross_entropy(h @ w.t() + b, y, reduction="sum")
    rh, rw, rb = torch.autograd.grad(3.0 * ref, (h, w, b))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)


def test_frozen_weight_gets_no_gradient_work():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen, like the LM head under LoRA
    loss = linear_cross_entropy(h, w, torch.randint(0, 20, (5,)), chunk_size=2)
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_chunked_equals_plain_loss_and_lora_gradients():
    model = tiny_model()
    inputs = batch([17, 9, 30])
    plain = loss_and_grads(model, inputs, "plain")
    chunked = loss_and_grads(model, inputs, "chunked", chunk_size=7)  # several chunks
    assert_same(chunked, plain)
    assert int(chunked[2]["trained_tokens"]) == int((shifted_targets(inputs["labels"]) != -100).sum())


def test_matches_transformers_own_loss():
    model = tiny_model()
    inputs = batch([12, 20])
    ours, _ = causal_lm_loss(model, inputs, mode="chunked")
    theirs = model(**inputs).loss  # transformers' ForCausalLMLoss: mean over trained next-token targets
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_ignore_index_positions_do_not_count():
    model = tiny_model()
    inputs = batch([25, 25])
    inputs["labels"][0, 5:12] = -100  # a hole in the middle of a trained span
    plain = loss_and_grads(model, inputs, "plain")
    chunked = loss_and_grads(model, inputs, "chunked", chunk_size=5)
    assert_same(chunked, plain)
    whole = loss_and_grads(model, batch([25, 25]), "chunked")
    assert int(whole[2]["trained_tokens"]) - int(chunked[2]["trained_tokens"]) == 7
    assert whole[2]["loss_sum"] - chunked[2]["loss_sum"] > 7 * 1.0  # each dropped target carried ~log(VOCAB)


def test_all_masked_batch_is_zero_not_nan_and_backpropagates():
    model = tiny_model()
    inputs = batch([10, 6])
    inputs["labels"][:] = -100
    for mode in ("chunked", "plain"):
        loss, grads, stats = loss_and_grads(model, inputs, mode)
        assert loss.item() == 0.0 and int(stats["trained_tokens"]) == 0
        assert all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads.values())


def test_accumulation_mb1_ga4_equals_mb4_ga1():
    """The reason for sum / num_items_in_batch: short samples weigh as much per token as long ones."""
    lengths = [5, 31, 12, 20]
    model = tiny_model()
    full = batch(lengths)
    rows = [{k: v[i : i + 1, :n] for k, v in full.items()} for i, n in enumerate(lengths)]
    total = sum(int((shifted_targets(r["labels"]) != -100).sum()) for r in rows)

    model.zero_grad(set_to_none=True)
    accumulated = 0.0
    for r in rows:  # micro-batch 1, gradient accumulation 4
        loss, _ = causal_lm_loss(model, r, num_items_in_batch=torch.tensor(total))
        loss.backward()
        accumulated += loss.item()
    grads_ga = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_mb, grads_mb, _ = loss_and_grads(model, full, "chunked", num_items=total)  # micro-batch 4, accumulation 1
    assert accumulated == pytest.approx(loss_mb.item(), rel=1e-5)
    for name, g in grads_mb.items():
        torch.testing.assert_close(grads_ga[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_with_position_ids_and_4d_mask():
    """Extra model kwargs pass through: a packed row of two samples with a block-diagonal causal mask."""
    model = tiny_model()
    a, b = batch([9], seed=3), batch([14], seed=4)
    ids = torch.cat([a["input_ids"], b["input_ids"]], 1)
    labels = torch.cat([a["labels"], b["labels"]], 1)
    n = ids.shape[1]
    seg = torch.tensor([0] * 9 + [1] * 14)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = (causal & (seg[:, None] == seg[None, :]))[None, None]
    # an additive float mask (0 = attend): what eager attention adds to its scores; sdpa takes it too
    mask4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    position_ids = torch.cat([torch.arange(9), torch.arange(14)])[None]
    packed = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask4d}
    assert_same(loss_and_grads(model, packed, "chunked", chunk_size=4), loss_and_grads(model, packed, "plain"))
    # the packed loss equals the two samples run alone (sum over both / total count)
    alone = [causal_lm_loss(model, {k: v for k, v in s.items() if k != "attention_mask"}) for s in (a, b)]
    counts = [int(st["trained_tokens"]) for _, st in alone]
    expect = sum(loss.item() * c for (loss, _), c in zip(alone, counts)) / sum(counts)
    got, _ = causal_lm_loss(model, packed)
    assert got.item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("kind", ["lora_head", "modules_to_save", "tied"])
def test_wrapped_or_tied_head_matches_plain(kind):
    if kind == "lora_head":
        model = tiny_model(lora_targets=["q_proj", "v_proj", "lm_head"])
    elif kind == "modules_to_save":
        model = tiny_model(lora_targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    else:
        model = tiny_model(tie=True)
    inputs = batch([11, 19])
    chunked = loss_and_grads(model, inputs, "chunked", chunk_size=6)
    assert_same(chunked, loss_and_grads(model, inputs, "plain"))
    if kind != "tied":
        assert any("lm_head" in n for n in chunked[1])  # the head's own trainable weights got gradients


def test_liger_falls_back_to_chunked_on_cpu(caplog):
    model = tiny_model()
    inputs = batch([8, 13])
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        liger = loss_and_grads(model, inputs, "liger")
    assert "liger" in caplog.text  # the user is told, not silently switched
    assert_same(liger, loss_and_grads(model, inputs, "chunked"))


def test_bf16_autocast_close_to_plain():
    """Mixed precision: the head's matmul runs in the autocast dtype, the softmax in fp32, like the plain path."""
    model = tiny_model()
    inputs = batch([16, 24])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, _ = causal_lm_loss(model, inputs, chunk_size=5)
        plain, _ = causal_lm_loss(model, inputs, mode="plain")
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=2e-2)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="loss mode"):
        causal_lm_loss(None, {"labels": torch.zeros(1, 2, dtype=torch.long)}, mode="fast")


def test_model_with_capped_logits_uses_the_full_logits_path(caplog):
    """Gemma 2 soft-caps its logits: hidden @ W^T alone would be a wrong loss, so the plain path is taken."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    model = get_peft_model(
        Gemma2ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    inputs = batch([12, 7])
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        ours, _ = causal_lm_loss(model, inputs)
    assert "final_logit_softcapping" in caplog.text
    torch.testing.assert_close(ours, model(**inputs).loss)  # transformers' own (capped) loss
