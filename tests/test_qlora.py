"""QLoRA: the base in 4-bit NF4 with double quantization (or 8-bit) through bitsandbytes, prepared for k-bit
training the way PEFT intends, trained on CPU here; paged 8-bit AdamW."""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_tensors, metrics, tiny_config

from lorafit.config import load_config

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the `qlora` extra (bitsandbytes)")


def _session(tmp_path, model_dir, model=None, **training):
    from lorafit.train.setup import build_run

    cfg = load_config(
        tiny_config(
            tmp_path, model_dir, model={"dtype": "fp32", **(model or {})}, training={"max_steps": 2, **training}
        )
    )
    (tmp_path / "run").mkdir()
    return build_run(cfg, tmp_path / "run", quiet=True, say=lambda *a: None)


def test_qlora_4bit_trains_and_saves_an_adapter(tmp_path, tiny_chat_model):
    from lorafit.train.run import run_training

    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        model={"quantization": "4bit", "dtype": "fp32"},
        training={
            "max_steps": 8,
            "learning_rate": 2e-2,
            "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": True,
        },
    )
    run = run_training(load_config(config), quiet=True)
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    weights = adapter_tensors(run / "adapter")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any("lora_B" in k and w.abs().max() > 0 for k, w in weights.items())


def test_4bit_is_nf4_with_double_quant_and_prepared_for_kbit_training(tmp_path, tiny_chat_model):
    s = _session(tmp_path, tiny_chat_model, model={"quantization": "4bit"}, gradient_checkpointing=True)
    q = s.model.base_model.model.model.layers[0].self_attn.q_proj
    base = q.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert base.weight.quant_type == "nf4" and base.weight.quant_state.nested  # nested = double quantization
    qc = s.model.base_model.model.config.quantization_config
    assert qc.bnb_4bit_compute_dtype == torch.float32  # model.dtype fp32 here; auto = bf16 on GPUs that have it
    # prepare_model_for_kbit_training: base frozen, non-quantized parameters in fp32, non-reentrant checkpointing
    assert not any(p.requires_grad for n, p in s.model.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for n, p in s.model.named_parameters() if p.dtype.is_floating_point)
    layer = s.model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    s.trainer.train()
    assert s.trainer.state.global_step == 2


def test_4bit_with_a_bf16_compute_dtype(tmp_path, tiny_chat_model):
    s = _session(tmp_path, tiny_chat_model, model={"quantization": "4bit", "dtype": "bf16"}, precision="bf16")
    assert s.model.base_model.model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    out = s.trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


def test_8bit_base_trains(tmp_path, tiny_chat_model):
    s = _session(tmp_path, tiny_chat_model, model={"quantization": "8bit"})
    assert isinstance(s.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    out = s.trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


def test_paged_adamw_8bit_is_the_optimizer(tmp_path, tiny_chat_model):
    s = _session(tmp_path, tiny_chat_model, optimizer="paged_adamw_8bit")
    s.trainer.train()
    optimizer = s.trainer.optimizer.optimizer  # accelerate wraps it
    assert isinstance(
        optimizer, bnb.optim.optimizer.Optimizer8bit
    )  # transformers builds bnb's AdamW(optim_bits=8, is_paged)
    assert optimizer.is_paged and optimizer.args.optim_bits == 8
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    # it really stepped (tensors under bnb's min_8bit_size of 4096 elements, like these tiny ones, keep fp32 moments)
    assert states and all(st.get("step") == 2 for st in states)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU tests above run the same code")
def test_qlora_on_gpu_uses_bf16(tmp_path, tiny_chat_model):
    from lorafit.runtime import resolve_precision

    s = _session(
        tmp_path,
        tiny_chat_model,
        model={"quantization": "4bit", "dtype": "auto"},
        precision="auto",
        optimizer="paged_adamw_8bit",
    )
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert s.model.base_model.model.config.quantization_config.bnb_4bit_compute_dtype == expected
    assert resolve_precision("auto") in ("bf16", "fp16")
    out = s.trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


@pytest.mark.parametrize("launcher", ["fsdp", "zero3"])
def test_4bit_under_fsdp_or_zero3_stores_weights_in_the_model_dtype(tmp_path, tiny_chat_model, monkeypatch, launcher):
    """FSDP and ZeRO-3 shard floating-point tensors of one dtype: 4-bit weights stored as bf16 (quant_storage),
    no device map (the launcher places the shards), no fp32 up-cast of the other weights; it still learns."""
    from lorafit.config import LoraSection, ModelSection
    from lorafit.models.lora import attach_lora
    from lorafit.models.sources import load_base_model
    from lorafit.runtime import sharded_launch

    if launcher == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        ds = tmp_path / "zero3.json"
        ds.write_text('{"zero_optimization": {"stage": 3}}')
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert sharded_launch() in ("FSDP", "DeepSpeed ZeRO-3")
    model = load_base_model(ModelSection(name=str(tiny_chat_model), quantization="4bit", dtype="bf16"))
    assert model.config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    base = model.model.layers[0].self_attn.q_proj
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.bfloat16
    model = attach_lora(model, LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}  # one dtype to shard by
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "lora_B" in n or "lora_A" in n
    )


def test_8bit_cannot_be_sharded(tiny_chat_model, monkeypatch):
    from lorafit.config import ModelSection
    from lorafit.errors import ModelError
    from lorafit.models.sources import load_base_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ModelError, match="8bit` cannot be sharded by FSDP"):
        load_base_model(ModelSection(name=str(tiny_chat_model), quantization="8bit"))
