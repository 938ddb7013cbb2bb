"""lorafit's LoRA dropout (models/lora_dropout.py): the same function and gradients as PEFT's, a fair mask, the same
adapter files, and what lorafit's training really attaches."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model
from peft import LoraConfig, PeftModel, get_peft_model

from lorafit.config import LoraSection
from lorafit.models import lora_dropout
from lorafit.models.adapter import add_adapter
from lorafit.models.lora import enable_checkpointing
from lorafit.models.lora_dropout import DroppedInputLinear, fuse_lora_dropout, keep_mask

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2):
    return tiny_llama_model(vocab_size=128, intermediate_size=96, num_hidden_layers=layers)


@pytest.mark.parametrize("x_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_same_output_and_gradients_as_peft_for_the_same_mask(monkeypatch, x_grad):
    """With the mask fixed, lora_A(dropout(x)) as PEFT computes it and lorafit's fused form agree in value and in
    the gradients of the input and the weight (the input of q/k/v's first layer needs none)."""
    p = 0.3
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    keep = torch.rand(2, 5, 12) >= p
    weight = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 4, dtype=torch.float64)

    reference = torch.nn.functional.linear(x * keep / (1 - p), weight)
    ref_grads = torch.autograd.grad(reference, [x, weight] if x_grad else [weight], grad)

    layer = torch.nn.Linear(12, 4, bias=False, dtype=torch.float64)
    layer.weight = torch.nn.Parameter(weight.detach().clone())
    layer.__class__, layer.p = DroppedInputLinear, p
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda t, q: keep)
    out = layer(x)
    grads = torch.autograd.grad(out, [x, layer.weight] if x_grad else [layer.weight], grad)

    torch.testing.assert_close(out, reference)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_the_mask_keeps_1_minus_p_independently_and_follows_the_seed():
    x = torch.empty(1000, 1000)
    torch.manual_seed(0)
    first = keep_mask(x, 0.05)
    assert first.dtype == torch.uint8 and first.shape == x.shape and set(first.unique().tolist()) == {0, 1}
    assert abs(first.float().mean().item() - 0.95) < 0.002  # 1e6 draws: the standard error is 0.0002
    second = keep_mask(x, 0.05)
    assert (first != second).float().mean().item() > 0.08  # a fresh mask each call (0.095 expected)
    # neighbours are independent: P(both dropped) = p^2 within noise, not p (along rows, down columns, and the two
    # units one hash word makes)
    dropped = first == 0
    for a, b in ((dropped[:, 1:], dropped[:, :-1]), (dropped[1:], dropped[:-1]), (dropped[:, ::2], dropped[:, 1::2])):
        assert abs((a & b).float().mean().item() - 0.05**2) < 0.0006  # standard error ~0.00005
    torch.manual_seed(0)
    assert torch.equal(keep_mask(x, 0.05), first)
    for p in (0.1, 0.5):
        assert abs(keep_mask(x, p).float().mean().item() - (1 - p)) < 0.003
    # p that rounds to 0 or 1 in 16 bits: everything kept, nothing kept
    assert keep_mask(x, 1e-7).all() and not keep_mask(x, 1 - 1e-7).any()


def _lowbias32_units(n: int, key: int, stride: int) -> list[int]:
    """The hash of lora_dropout.hashed_units in plain Python integers (unsigned 32-bit arithmetic)."""
    units = []
    for i in range((n + 1) // 2):
        h = (i * (stride | 1) + key) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        h ^= h >> 16
        units += [u - 65536 if u >= 32768 else u for u in (h & 0xFFFF, h >> 16)]
    return units[:n]


def test_the_cpu_mask_is_lowbias32_of_a_counter_keyed_by_torch_s_generator():
    """torch's int32 ops (wrapping multiply, arithmetic shift) give exactly the unsigned hash: a torch release that
    changed either would change the masks, and this fails."""
    torch.manual_seed(3)
    key, stride = torch.randint(-(1 << 31), (1 << 31) - 1, (2,), dtype=torch.int32).tolist()
    torch.manual_seed(3)
    assert lora_dropout.hashed_units(2001).tolist() == _lowbias32_units(2001, key, stride)
    torch.manual_seed(3)
    lora_dropout.hashed_units(100_001)  # grows the cached counter; a smaller mask after it is still the same
    torch.manual_seed(3)
    assert lora_dropout.hashed_units(2001).tolist() == _lowbias32_units(2001, key, stride)


def test_fused_model_trains_like_peft_in_eval_and_saves_the_same_adapter(tmp_path):
    """Fusing changes no parameter name or value: eval outputs equal, the saved adapter loads in plain PEFT."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL, init_lora_weights="gaussian")
    plain = get_peft_model(tiny_llama(), config)
    torch.manual_seed(0)
    fused = get_peft_model(tiny_llama(), config)
    assert sorted(plain.state_dict()) == sorted(fused.state_dict())
    assert fuse_lora_dropout(fused) == 2 * 7
    q = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.lora_A["default"]) is DroppedInputLinear and q.lora_A["default"].p == 0.1
    assert isinstance(q.lora_dropout["default"], torch.nn.Identity)

    ids = torch.randint(0, 128, (1, 9))
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(ids).logits, plain.eval()(ids).logits)

    fused.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits)


def test_training_mode_drops_and_backpropagates_into_lora_only():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules=ALL))
    fuse_lora_dropout(model)
    with torch.no_grad():  # lora_B starts at zero, which hides the dropout from the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 128, (2, 7))
    torch.manual_seed(3)
    a = model(ids, labels=ids)
    torch.manual_seed(4)
    b = model(ids, labels=ids)
    assert a.loss.item() != b.loss.item()  # another mask, another loss
    a.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all("lora_" in n for n in grads)
    assert len([n for n in grads if "lora_A" in n]) == len([n for n in grads if "lora_B" in n]) == 2 * 7


def test_dora_and_zero_dropout_keep_peft_dropout():
    dora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=ALL, use_dora=True))
    assert fuse_lora_dropout(dora) == 0
    assert type(dora.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]) is torch.nn.Dropout
    none = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.0, target_modules=ALL))
    assert fuse_lora_dropout(none) == 0


def test_lorafit_attaches_the_fused_dropout_when_it_adds_an_adapter():
    model = add_adapter(tiny_llama(3), None, LoraSection(r=4, alpha=8, dropout=0.05, target_modules="all-linear"))
    fused = [m for m in model.modules() if isinstance(m, DroppedInputLinear)]
    assert len(fused) == 3 * 7 and all(m.p == 0.05 for m in fused)


def test_gradient_checkpointing_recomputes_the_same_mask():
    """Checkpointing reruns each layer's forward in the backward pass; the mask drawn there must be the one the first
    forward used (torch's checkpoint restores the RNG state), or the gradients would not match an unchecked run."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_checkpointing(model)
        model = get_peft_model(
            model, LoraConfig(r=4, lora_dropout=0.3, target_modules=ALL, init_lora_weights="gaussian")
        )
        assert fuse_lora_dropout(model) == 2 * 7
        model.train()
        torch.manual_seed(5)
        ids = torch.randint(0, 128, (2, 11))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])
