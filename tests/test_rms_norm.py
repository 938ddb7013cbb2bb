"""lorafit's fp32 RMSNorm for training (models/rms_norm.py): transformers' function and gradients, where it applies,
and that lorafit's training attaches it."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model
from peft import LoraConfig, get_peft_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorafit.config import LoraSection
from lorafit.models.adapter import add_adapter
from lorafit.models.rms_norm import RMSNormFunction, fuse_rms_norms

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def norm(width: int, dtype, seed: int = 0) -> LlamaRMSNorm:
    torch.manual_seed(seed)
    module = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    module.weight.data.normal_()
    return module


def llama_formula(x, weight, eps):
    """LlamaRMSNorm's forward without its cast to fp32 (which would make a float64 comparison an fp32 one)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-weight", "trained-weight"])
def test_same_output_and_gradients_as_transformers_formula(weight_grad):
    """float64, so only a wrong formula differs: output, input gradient, and the weight's where it trains."""
    weight = norm(24, torch.float64).weight.detach().requires_grad_(weight_grad)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True) * 3
    grad = torch.randn(3, 7, 24, dtype=torch.float64)
    wanted = [x, weight] if weight_grad else [x]
    want = llama_formula(x, weight, 1e-5)
    want_grads = torch.autograd.grad(want, wanted, grad)
    got = RMSNormFunction.apply(x, weight, 1e-5)
    got_grads = torch.autograd.grad(got, wanted, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: RMSNormFunction.apply(t, weight.detach(), 1e-5), (x[:1, :3],))


def test_fp32_matches_transformers_to_rounding():
    reference = norm(576, torch.float32)
    x = torch.randn(2, 50, 576, requires_grad=True)
    grad = torch.randn(2, 50, 576)
    fused = norm(576, torch.float32)
    assert fuse_rms_norms(torch.nn.Sequential(fused)) == 1
    want = reference(x)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    got = fused(x)
    assert got.grad_fn.name() == "RMSNormFunctionBackward"
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_only_fp32_training_uses_it():
    """Without gradients (generation, evaluation) and in bf16 the module runs transformers' own forward, bit for
    bit; so does every norm that is not Llama's function."""
    reference, fused = norm(32, torch.float32), norm(32, torch.float32)
    fuse_rms_norms(torch.nn.Sequential(fused))
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), reference(x))
    half_ref, half = norm(32, torch.bfloat16), norm(32, torch.bfloat16)
    fuse_rms_norms(torch.nn.Sequential(half))
    xb = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    out = half(xb)
    assert torch.equal(out, half_ref(xb)) and out.grad_fn.name() != "RMSNormFunctionBackward"

    class GemmaLikeRMSNorm(LlamaRMSNorm):  # another class name: another function as far as lorafit knows
        pass

    assert fuse_rms_norms(torch.nn.Sequential(GemmaLikeRMSNorm(8))) == 0


def test_a_fused_model_trains_like_transformers():
    """A whole LoRA model in fp32 (where the fused norm applies): the same loss and LoRA gradients to rounding."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL, init_lora_weights="gaussian")
    results = []
    for fused in (False, True):
        model = get_peft_model(tiny_llama_model(), config)
        if fused:
            assert fuse_rms_norms(model) == 2 * 2 + 1  # two per layer and the final one
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_lorafit_attaches_it_when_it_adds_an_adapter():
    lora = LoraSection(r=4, alpha=8, dropout=0.05, target_modules="all-linear")
    model = add_adapter(tiny_llama_model(num_hidden_layers=3), None, lora)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 3 * 2 + 1 and all(type(m) is not LlamaRMSNorm for m in norms)
    plain = add_adapter(tiny_llama_model(num_hidden_layers=3), None, lora, fused=False)
    assert all(type(m) is LlamaRMSNorm for m in plain.modules() if isinstance(m, LlamaRMSNorm))
