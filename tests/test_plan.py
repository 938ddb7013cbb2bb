"""lorafit plan: exact PEFT counts on the meta device, the LoRA arithmetic, and every memory term's formula."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorafit.config import RunConfig

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cfg(name="meta-llama/Llama-3.1-8B-Instruct", **sections) -> RunConfig:
    raw = {
        "model": {"name": name, "dtype": "bf16"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "training": {"micro_batch_size": 4, "precision": "bf16"},
        "data": {"max_length": 2048},
    }
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="module")
def llama8b():
    from lorafit.plan.architecture import count_parameters

    return count_parameters(_cfg())


def test_llama31_8b_counts_are_exact(llama8b):
    counts, table, arch, _ = llama8b
    assert counts["base"] == 8_030_261_248  # the 8B row of ../shared/llama3/README.md, before LoRA
    assert (counts["trainable"], counts["total"]) == (41_943_040, 8_072_204_288)  # what PEFT reports
    assert (
        sum(row["trainable"] for row in table) == counts["trainable"]
    )  # the table's arithmetic adds up to PEFT's count
    assert counts["linear"] == sum(row["frozen"] for row in table) == 6_979_321_856
    assert (arch.layers, arch.hidden, arch.kv_heads, arch.vocab) == (32, 4096, 8, 128256)


def test_lora_table_rows(llama8b):
    _, table, _, _ = llama8b
    rows = {row["module"]: row for row in table}
    assert set(rows) == set(ALL) and all(row["count"] == 32 for row in table)
    q, k, down = rows["q_proj"], rows["k_proj"], rows["down_proj"]
    assert (q["W"], q["A"], q["B"]) == ([4096, 4096], [16, 4096], [4096, 16])
    assert (k["W"], down["W"], down["A"]) == ([1024, 4096], [4096, 14336], [16, 14336])
    assert q["trainable_each"] == 16 * (4096 + 4096) and q["frozen_each"] == 4096 * 4096
    assert q["reduction"] == pytest.approx(1 - 131072 / 16777216)


def test_the_tutorials_matrix(tmp_path):
    """W 1000×1000 with r=16: B 1000×16 + A 16×1000 = 32,000 trainable instead of 1,000,000 (96.8% fewer)."""
    from transformers import LlamaConfig

    from lorafit.plan.architecture import count_parameters

    LlamaConfig(
        vocab_size=64,
        hidden_size=1000,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=10,
        num_key_value_heads=10,
    ).save_pretrained(tmp_path)
    counts, table, _, _ = count_parameters(_cfg(str(tmp_path), lora={"target_modules": ["q_proj"]}))
    (row,) = table
    assert (row["trainable_each"], row["frozen_each"]) == (32_000, 1_000_000)
    assert round(100 * row["reduction"], 1) == 96.8 and counts["trainable"] == 32_000


def test_70b_and_dora_counts():
    from lorafit.plan.architecture import count_parameters

    counts, table, _, _ = count_parameters(_cfg("meta-llama/Llama-3.1-70B-Instruct", lora={"use_dora": True}))
    assert counts["base"] == 70_553_706_496
    per_layer = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    magnitudes = 2 * 8192 + 2 * 1024 + 2 * 28672 + 8192  # DoRA's magnitude vector: one per output row
    assert counts["trainable"] == 80 * (per_layer + magnitudes) == sum(row["trainable"] for row in table)


def test_counts_equal_a_real_model_with_real_weights(tiny_chat_model):
    """A local folder: the meta-device count equals PEFT's count on the loaded model."""
    from transformers import AutoModelForCausalLM

    from lorafit.models.lora import attach_lora
    from lorafit.plan.architecture import count_parameters

    cfg = _cfg(str(tiny_chat_model), lora={"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    counts, _, _, _ = count_parameters(cfg)
    real = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_chat_model), cfg.lora)
    assert (counts["trainable"], counts["total"]) == real.get_nb_trainable_parameters()


# -- activations: the formula against the tensors autograd really saves -------------------------------------------


def _saved_bytes(model, ids, autocast: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model(input_ids=ids)
    return sum(seen.values())


def _measured_per_token_layer(h, i, heads, kv_heads, r, targets, mixed):
    """d²(saved bytes) / d(layers) d(tokens): weights, autocast weight copies and per-model constants cancel."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    saved = {}
    for layers in (2, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256,
                hidden_size=h,
                intermediate_size=i,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
            )
        )
        model = model.to(torch.bfloat16) if mixed else model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=targets)).train()
        for tokens in (16, 32):
            saved[layers, tokens] = _saved_bytes(model, torch.randint(0, 256, (2, tokens)), autocast=mixed)
    return ((saved[3, 32] - saved[2, 32]) - (saved[3, 16] - saved[2, 16])) / (2 * 16)


@pytest.mark.parametrize("mixed", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"]], ids=["all-linear", "q-v"])
def test_activation_formula_equals_what_autograd_saves(mixed, targets):
    from lorafit.plan.architecture import Arch
    from lorafit.plan.memory import activation_bytes_per_token_layer

    h, i, heads, kv_heads, r = 96, 160, 4, 2, 8
    formula = activation_bytes_per_token_layer(
        Arch(h, i, 3, heads, kv_heads, h // heads, 256),
        targets,
        r,
        dropout=0.0,
        act=2 if mixed else 4,
        residual=2 if mixed else 4,
        kv_expanded=False,
    )
    assert formula == _measured_per_token_layer(h, i, heads, kv_heads, r, targets, mixed)


# -- memory terms ---------------------------------------------------------------------------------------------------


def test_memory_terms_arithmetic(llama8b):
    from lorafit.plan.memory import CONTEXT_BYTES, FRAGMENTATION, NF4_BYTES, memory_terms

    counts, _, arch, _ = llama8b
    cfg = _cfg()
    terms = memory_terms(cfg, arch, counts)
    tokens = 4 * 2048
    layer = terms["activation_bytes_per_token_layer"]
    assert terms["tokens_per_micro_batch"] == tokens
    assert terms["base_weights"] == 2 * 8_030_261_248
    assert terms["lora_weights_grads_optimizer"] == 41_943_040 * (
        4 + 4 + 8 + 2
    )  # fp32 w + grad, AdamW m + v, bf16 copy
    assert terms["activations"] == terms["activations_without_checkpointing"] == tokens * (32 * layer + 4 * 4096 + 4)
    assert terms["activations_with_checkpointing"] == tokens * (32 * 2 * 4096 + layer + 4 * 4096 + 4)
    allocated = sum(
        terms[k]
        for k in ("base_weights", "lora_weights_grads_optimizer", "activations", "backward_working", "logits_and_loss")
    )
    assert terms["framework_overhead"] == pytest.approx(CONTEXT_BYTES + FRAGMENTATION * allocated)
    assert terms["total"] == pytest.approx(allocated + terms["framework_overhead"])

    plain = memory_terms(_cfg(training={"loss": "plain"}), arch, counts)
    assert plain["logits_and_loss"] == tokens * 128256 * 12 > 5 * terms["logits_and_loss"]
    # chunked: one chunk of bf16 + fp32 logits and d loss/d hidden, or the hidden states returned at the end of forward
    assert terms["logits_and_loss"] == max(2**26 * (2 + 4) + tokens * 4096 * 2, tokens * 33 * 4096 * 2)
    qlora = memory_terms(_cfg(model={"quantization": "4bit"}, training={"optimizer": "paged_adamw_8bit"}), arch, counts)
    assert qlora["base_weights"] == pytest.approx(6_979_321_856 * NF4_BYTES + (8_030_261_248 - 6_979_321_856) * 4)
    assert qlora["lora_weights_grads_optimizer"] == 41_943_040 * (4 + 4 + 2 + 2)
    half = memory_terms(_cfg(training={"micro_batch_size": 2}), arch, counts)
    assert half["activations"] * 2 == terms["activations"]


def test_verdicts_and_changes_that_make_it_fit(llama8b):
    from lorafit.config import load_config
    from lorafit.plan.planner import build_plan

    result = build_plan(_cfg(), gpu="4090")
    gpus = {row["gpu"]: row for row in result["gpus"]}
    assert gpus["24 GB"]["verdict"] == "does not fit" and gpus["141 GB"]["verdict"] == "fits"
    changes = gpus["24 GB"]["changes"]
    assert "training.gradient_checkpointing=true" in changes and "model.quantization=4bit" in changes
    assert "changes" not in gpus["80 GB"]  # only the chosen GPU gets suggestions when --gpu is given
    # The suggested overrides, applied the way `lorafit train CONFIG k=v ...` applies them, really fit.
    cfg = load_config(
        None,
        [
            "model.name=meta-llama/Llama-3.1-8B-Instruct",
            "model.dtype=bf16",
            "training.precision=bf16",
            "lora.r=16",
            "lora.alpha=32",
            "training.micro_batch_size=4",
            "data.max_length=2048",
        ]
        + changes,
    )
    after = {row["gpu"]: row for row in build_plan(cfg)["gpus"]}
    assert after["24 GB"]["verdict"] == "fits"


def test_cli_plan_json_and_errors(tmp_path):
    cli = [sys.executable, "-m", "lorafit.cli", "plan", "configs/llama31-8b-qlora.yaml"]
    result = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["parameters"]["base"] == 8_030_261_248 and plan["settings"]["quantization"] == "4bit"
    bad = subprocess.run(cli + ["--gpu", "voodoo5"], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "voodoo5" in bad.stderr and "Traceback" not in bad.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: nobody/unknown-model\n")
    unknown = subprocess.run(cli[:-1] + [str(cfg)], capture_output=True, text=True, timeout=240, env=_offline())
    assert unknown.returncode == 2 and "meta-llama/Llama-3.1-8B-Instruct" in unknown.stderr


def _offline():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_out_of_memory_advice_names_changes_that_fit():
    """`lorafit train` prints this on CUDA OOM (tests/faults/test_oom.py checks it is shown)."""
    from pathlib import Path

    from lorafit.config import load_config
    from lorafit.plan.architecture import count_parameters
    from lorafit.plan.memory import GiB, changes_to_fit
    from lorafit.plan.planner import suggest_for_oom

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / "llama31-8b-lora.yaml", ["training.gradient_checkpointing=false"])
    advice = suggest_for_oom(cfg, device_gib=24)
    assert "lorafit train CONFIG" in advice and "training.gradient_checkpointing=true" in advice
    counts, _, arch, _ = count_parameters(cfg)
    changes, after = changes_to_fit(cfg, arch, counts, 24)
    assert after <= 0.9 * 24 * GiB and " ".join(changes) in advice
