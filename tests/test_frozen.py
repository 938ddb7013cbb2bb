"""Frozen linear layers in bf16 under fp32 LoRA training (models/frozen.py, `model.frozen_dtype`): what is cast and
what is not, the fused LoRA function and PEFT's forward agree over bf16 bases, training and the planner follow."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, tiny_config, tiny_llama_model
from peft import LoraConfig, PeftModel, get_peft_model

from lorafit import runtime
from lorafit.config import ModelSection
from lorafit.models.frozen import CastLinear, narrowed, store_frozen_linears
from lorafit.models.lora_dropout import fuse_lora_dropout
from lorafit.models.lora_linear import fuse_lora_linears
from lorafit.train.loss import _is_plain_linear, linear_cross_entropy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def lora_model(fused: bool, targets=ALL, tied: bool = True, dropout: float = 0.0, **lora):
    """A tiny fp32 Llama with non-zero LoRA weights (zero lora_B would hide the LoRA branch)."""
    base = tiny_llama_model(vocab_size=128, intermediate_size=96, tie_word_embeddings=tied)
    config = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights="gaussian")
    model = get_peft_model(base, LoraConfig(**config | lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    fuse_lora_dropout(model)  # the same dropout masks either way
    if fused:
        fuse_lora_linears(model)
    return model.train()


def loss_and_grads(model):
    torch.manual_seed(3)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_cast_linear_is_the_matmul_in_the_weights_dtype():
    """Forward and input gradient equal those of the bf16-rounded input and weight, returned in fp32."""
    layer = torch.nn.Linear(24, 40, bias=True).requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    want = torch.nn.functional.linear(x.detach().bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    layer.weight = torch.nn.Parameter(layer.weight.bfloat16(), requires_grad=False)
    layer.bias = torch.nn.Parameter(layer.bias.bfloat16(), requires_grad=False)
    layer.__class__ = CastLinear
    out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out.detach(), want)
    out.sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, layer.weight.float().sum(0).expand(5, 24), rtol=1e-2, atol=1e-2)
    assert _is_plain_linear(layer)  # the chunked loss multiplies it itself


def test_an_input_read_by_several_bf16_layers_is_cast_once(monkeypatch):
    """q, k and v (gate and up) read one tensor: the fused function casts it once per forward (4 casts per decoder
    layer, not 7), never serves a copy of a tensor changed since, and caches nothing autograd would track."""
    model = lora_model(True)
    store_frozen_linears(model, torch.bfloat16)
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.bfloat16 and self.dtype == torch.float32 and self.dim() == 3:
            casts.append(self.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    loss_and_grads(model)
    assert len(casts) == 2 * 4 + 1  # per layer: q/k/v's input, o's, gate/up's, down's; and the head's
    monkeypatch.undo()

    x = torch.randn(3, 8)
    first = narrowed(x, torch.bfloat16)
    assert narrowed(x, torch.bfloat16) is first
    x.add_(1.0)  # changed in place: a new copy, with the new values
    assert torch.equal(narrowed(x, torch.bfloat16), x.bfloat16())
    tracked = torch.randn(3, 8, requires_grad=True)
    assert narrowed(tracked, torch.bfloat16) is not narrowed(tracked, torch.bfloat16)  # each its own autograd node
    with torch.inference_mode():
        frozen = torch.randn(3, 8)
        assert torch.equal(narrowed(frozen, torch.bfloat16), frozen.bfloat16())


def test_what_is_cast_and_what_stays_fp32():
    """Every frozen linear (LoRA's bases, an untargeted projection, the tied head as its own copy) is bf16; the LoRA
    weights, the embeddings (values unchanged) and the norms stay fp32 and trainable parameters are untouched."""
    model = lora_model(True, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    embed = model.get_input_embeddings().weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert store_frozen_linears(model, torch.bfloat16) == 2 * 7 + 1  # 2 layers x 7 linears, and the head
    inner = model.base_model.model
    assert inner.lm_head.weight.dtype == torch.bfloat16 and type(inner.lm_head) is CastLinear
    assert inner.lm_head.weight is not inner.model.embed_tokens.weight  # untied: the embeddings keep fp32
    assert torch.equal(inner.model.embed_tokens.weight, embed)
    layer = inner.model.layers[0]
    assert type(layer.mlp.down_proj) is CastLinear  # untargeted
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_dora_bases_stay_as_they_are():
    model = lora_model(False, use_dora=True)
    assert store_frozen_linears(model, torch.bfloat16) == 1  # the head only
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    loss, grads = loss_and_grads(model)
    assert torch.isfinite(loss) and grads


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_fused_function_equals_peft_forward_over_bf16_bases(dropout):
    """The same bf16 bases: lorafit's fused LoRA function and PEFT's own forward give the same loss and LoRA
    gradients (fp32 rounding apart), and both stay near full fp32 (bf16 rounding of the frozen matmuls only)."""
    fp32_loss, fp32_grads = loss_and_grads(lora_model(False, dropout=dropout))
    results = []
    for fused in (False, True):
        model = lora_model(fused, dropout=dropout)
        store_frozen_linears(model, torch.bfloat16)
        results.append(loss_and_grads(model))
    (peft_loss, peft_grads), (loss, grads) = results
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == peft_grads.keys() == fp32_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), fp32_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    assert abs(loss - fp32_loss) < 1e-2 * fp32_loss and loss != fp32_loss  # bf16 changed something, a little


def test_chunked_loss_with_a_bf16_head_equals_plain_cross_entropy():
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16).bfloat16()
    targets = torch.randint(0, 50, (37,))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    got.backward()
    h = hidden.detach().clone().requires_grad_(True)
    logits = (h.bfloat16() @ weight.t()).float()
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "fields,precision,amx,want",
    [
        ({}, "auto", True, torch.bfloat16),  # auto on a CPU with AMX
        ({}, "auto", False, None),  # auto elsewhere: fp32 throughout
        ({"frozen_dtype": "bf16"}, "auto", False, torch.bfloat16),  # asked for
        ({"frozen_dtype": "same"}, "auto", True, None),
        ({"dtype": "bf16"}, "auto", True, None),  # already bf16 weights
        ({"dtype": "fp32"}, "auto", True, None),  # fp32 asked for: fp32 throughout
        ({"dtype": "fp32", "frozen_dtype": "bf16"}, "fp32", False, torch.bfloat16),
        ({}, "bf16", True, None),  # autocast does the casting
        ({"quantization": "4bit"}, "auto", True, None),
    ],
)
def test_pick_frozen_dtype(monkeypatch, fields, precision, amx, want):
    monkeypatch.setattr(runtime, "cpu_bf16_matrix_unit", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_frozen_dtype(ModelSection(**fields), precision) == want


def test_sharded_launches_keep_the_models_dtype(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_matrix_unit", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert runtime.pick_frozen_dtype(ModelSection(frozen_dtype="bf16"), "fp32") is None


def test_matrix_unit_probe_answers_a_bool():
    assert isinstance(runtime.cpu_bf16_matrix_unit(), bool)


def test_train_with_bf16_frozen_layers_through_the_cli(tmp_path, tiny_chat_model):
    """`model.frozen_dtype: bf16` (as auto on an AMX CPU): the run says so, learns as the fp32 run does, and its
    adapter loads with PEFT onto the fp32 base."""
    runs = {}
    for frozen in ("same", "bf16"):
        path = tiny_config(tmp_path, tiny_chat_model, name=frozen, model={"frozen_dtype": frozen})
        out = run_cli("train", str(path))
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("frozen linear layers in bf16, LoRA and activations fp32" in out.stdout) == (frozen == "bf16")
        runs[frozen] = tmp_path / "runs" / frozen
    losses = {
        k: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for k, d in runs.items()
    }
    assert losses["bf16"][-1] < losses["bf16"][0]
    for a, b in zip(losses["same"], losses["bf16"], strict=True):
        assert abs(a - b) < 0.02 * a
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(runs["bf16"] / "adapter"))
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    assert torch.isfinite(tuned(IDS % 100).logits).all()


def test_plan_counts_bf16_frozen_layers_on_the_cpu(monkeypatch):
    """`lorafit plan`'s CPU figure on an AMX CPU: decoder linears at 2 bytes, plus the tied head's bf16 copy."""
    from lorafit.config import RunConfig
    from lorafit.plan.planner import build_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plans = {}
    for amx in (False, True):
        monkeypatch.setattr(runtime, "cpu_bf16_matrix_unit", lambda amx=amx: amx)
        plans[amx] = build_plan(RunConfig.model_validate({"data": {"train": ["x.jsonl"]}}))
    params, arch = plans[True]["parameters"], plans[True]["architecture"]
    assert params["tied_head"] and plans[True]["memory_cpu"]["frozen_linears"] == "bf16"
    saved = plans[False]["memory_cpu"]["base_weights"] - plans[True]["memory_cpu"]["base_weights"]
    assert saved == params["linear"] * 2 - arch["vocab"] * arch["hidden"] * 2
    assert plans[False]["memory_cpu"]["frozen_linears"] is None
    assert plans[True]["memory"] == plans[False]["memory"]  # the GPU figure: unchanged
