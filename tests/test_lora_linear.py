"""lorafit's fused LoRA linear (models/lora_linear.py): PEFT's loss and gradients, PEFT's forward wherever the fused
one does not apply, the same adapter files, and what lorafit's training attaches."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model
from peft import LoraConfig, PeftModel, get_peft_model

from lorafit.config import LoraSection
from lorafit.models import lora_linear
from lorafit.models.adapter import add_adapter
from lorafit.models.lora import enable_checkpointing
from lorafit.models.lora_dropout import fuse_lora_dropout
from lorafit.models.lora_linear import LoraLinearFunction, fuse_lora_linears

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(fused: bool, dtype=torch.float32, **lora):
    """A tiny Llama with LoRA on every linear layer and non-zero lora_B (zero would hide the LoRA branch)."""
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL, init_lora_weights="gaussian")
    model = get_peft_model(
        tiny_llama_model(vocab_size=128, intermediate_size=96).to(dtype), LoraConfig(**config | lora)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    fuse_lora_dropout(model)
    if fused:
        assert fuse_lora_linears(model) == 2 * 7
    return model.train()


def loss_and_grads(model, seed: int = 7):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)  # the dropout masks
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def count_calls(monkeypatch) -> list:
    calls = []
    real = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_same_loss_and_gradients_as_peft(monkeypatch, dropout, rslora):
    """Float64, the same seed (so the same dropout masks): every LoRA gradient equals PEFT's."""
    calls = count_calls(monkeypatch)
    want_loss, want = loss_and_grads(lora_model(False, torch.float64, lora_dropout=dropout, use_rslora=rslora))
    assert not calls
    got_loss, got = loss_and_grads(lora_model(True, torch.float64, lora_dropout=dropout, use_rslora=rslora))
    assert len(calls) == 2 * 7  # every layer went through the fused function
    torch.testing.assert_close(got_loss, want_loss)
    assert sorted(got) == sorted(want) and len(want) == 2 * 2 * 7 and all("lora_" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_dropout_changes_with_the_seed_and_eval_has_none():
    model = lora_model(True, lora_dropout=0.5)
    first, _ = loss_and_grads(model, seed=1)
    second, _ = loss_and_grads(model, seed=2)
    assert first != second
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, 128, (1, 6))
        torch.manual_seed(1)
        a = model(ids).logits
        torch.manual_seed(2)
        torch.testing.assert_close(model(ids).logits, a)


def test_peft_forward_where_the_fused_one_does_not_apply(monkeypatch):
    """Inference, a merged adapter, disabled adapters and autocast take PEFT's own forward, with PEFT's results."""
    calls = count_calls(monkeypatch)
    fused, plain = lora_model(True), lora_model(False)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(ids).logits, plain.eval()(ids).logits)
        with fused.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(fused(ids).logits, plain(ids).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.train()(ids, labels=ids).loss.backward()
    fused.merge_adapter()
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    assert not calls


def test_a_trainable_base_bias_keeps_peft_s_forward(monkeypatch):
    """An adapter trained with PEFT's bias='all' (a Qwen-like base with biases) trains the base biases too: the fused
    function returns no bias gradient, so such a layer must keep PEFT's forward, and the biases must get gradients."""
    calls = count_calls(monkeypatch)
    base = tiny_llama_model(vocab_size=128, intermediate_size=96, attention_bias=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, bias="all")).train()
    assert fuse_lora_linears(model) == 2 * 7  # the class is set; the forward decides per call
    ids = torch.randint(0, 128, (1, 8))
    model(ids, labels=ids).loss.backward()
    biases = [p for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.bias")]
    assert len(biases) == 2 and all(b.grad is not None and b.grad.abs().sum() > 0 for b in biases)
    assert len(calls) == 2 * 3  # gate, up and down have no bias: fused; q, k, v and o: PEFT's


def test_gradient_checkpointing_recomputes_the_same_mask():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama_model(vocab_size=128, intermediate_size=96)
        if checkpointing:
            enable_checkpointing(model)
        model = get_peft_model(
            model, LoraConfig(r=4, lora_dropout=0.3, target_modules=ALL, init_lora_weights="gaussian")
        )
        fuse_lora_dropout(model)
        assert fuse_lora_linears(model) == 2 * 7
        grads.append(loss_and_grads(model.train())[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_the_adapter_is_peft_s(tmp_path):
    """The class swap renames nothing: the saved adapter loads in plain PEFT and gives the same outputs."""
    model = lora_model(True)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama_model(vocab_size=128, intermediate_size=96), tmp_path / "adapter")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)
    assert sorted(loaded.state_dict()) == sorted(lora_model(False).state_dict())


def test_which_layers_are_fused(monkeypatch):
    dora = get_peft_model(tiny_llama_model(), LoraConfig(r=4, target_modules=ALL, use_dora=True))
    assert fuse_lora_linears(dora) == 0  # a variant: PEFT's forward
    peft_dropout = get_peft_model(tiny_llama_model(), LoraConfig(r=4, lora_dropout=0.1, target_modules=ALL)).train()
    calls = count_calls(monkeypatch)
    assert fuse_lora_linears(peft_dropout) == 2 * 7
    ids = torch.randint(0, 128, (1, 8))
    peft_dropout(ids, labels=ids).loss.backward()  # PEFT's Dropout module still in place (DPO switches it off)
    assert not calls
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP's hooks gather the weights of the modules it calls
    assert fuse_lora_linears(get_peft_model(tiny_llama_model(), LoraConfig(r=4, target_modules=ALL))) == 0


def test_lorafit_attaches_it_when_it_adds_an_adapter():
    lora = LoraSection(r=4, alpha=8, dropout=0.05, target_modules="all-linear")
    model = add_adapter(tiny_llama_model(num_hidden_layers=3), None, lora)
    fused = [m for m in model.modules() if type(m).__name__ == "FusedLoraLinear"]
    assert len(fused) == 3 * 7 and lora_linear._CLASS is type(fused[0])
    plain = add_adapter(tiny_llama_model(num_hidden_layers=3), None, lora, fused=False)
    assert not [m for m in plain.modules() if type(m).__name__ == "FusedLoraLinear"]
