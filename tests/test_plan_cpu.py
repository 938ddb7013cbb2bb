"""`lorafit plan`'s CPU figure against the peak resident memory `lorafit train` really reaches on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import write_jsonl

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SENTENCE = "The harbour master of Quillmoor writes down the name, cargo and hour of boat number {} in a green book."


def long_rows(n: int) -> list[dict]:
    """Answers longer than any max_length used here: cut on the right, every sample fills one packed row exactly."""
    answer = " ".join(SENTENCE.format(i) for i in range(60))
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about boat {k}."},
                {"role": "assistant", "content": answer},
            ]
        }
        for k in range(n)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("max_length, frozen_dtype", [(512, "auto"), (1024, "auto"), (512, "same")])
def test_plan_holds_the_measured_peak_of_a_cpu_run(tmp_path, smollm2_dir, max_length, frozen_dtype):
    """The embedded model, default training settings (per-sample attention, chunked loss, dropout 0.05; frozen linear
    layers in bf16 where the CPU has AMX, else fp32; `same`: fp32 throughout), one full row of max_length tokens per
    micro-batch: the plan's CPU total is within 15% of the run's peak RSS."""
    config = {
        "model": {"name": "smollm2-135m-instruct", "frozen_dtype": frozen_dtype},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", long_rows(4))),
            "max_length": max_length,
            "truncation": "right",
        },
        "training": {"max_steps": 2, "micro_batch_size": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    # one thread: on a shared 2-core machine OpenMP's spinning threads make a step minutes long, not the memory larger
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "lorafit.cli"]
    plan = subprocess.run([*cli, "plan", str(path), "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    cpu = json.loads(plan.stdout)["memory_cpu"]
    assert cpu["attention"] == "lorafit_sdpa" and cpu["tokens_per_micro_batch"] == max_length
    train = subprocess.run([*cli, "train", str(path), "--quiet"], capture_output=True, text=True, timeout=1500, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "cpu" / "summary.json").read_text())
    assert summary["memory_kind"] == "process RSS" and summary["steps"] == 2
    measured = summary["peak_memory_bytes"]
    assert abs(cpu["total"] - measured) <= 0.15 * measured, (cpu["total"] / 2**20, measured / 2**20)


PARENT = """
import subprocess, sys
ballast = bytearray(1024 * 2**20)
ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 1 GiB resident in the parent
del ballast
child = "from lorafit.runtime import peak_rss_bytes; print(peak_rss_bytes())"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def test_peak_memory_is_the_runs_own_not_its_parents():
    """A run started from a big process (a notebook kernel, a pytest worker) reports its own peak: ru_maxrss would
    carry the parent's 1 GiB across fork and exec (Linux), which made this file's CPU test fail only in the suite."""
    done = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 < int(done.stdout) < 512 * 2**20, int(done.stdout) / 2**20


def _saved_per_token_layer(dropout: float, kernel: str, samples: int, fused: bool = True) -> float:
    """d²(bytes autograd saves) / d(layers) d(tokens) for one flat row of `samples` equal samples, fp32 on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.models.attention import training_attention
    from lorafit.models.lora_dropout import fuse_lora_dropout
    from lorafit.models.lora_linear import fuse_lora_linears

    saved = {}
    for layers in (2, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256,
                hidden_size=96,
                intermediate_size=160,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=layers,
                attn_implementation="sdpa",
            )
        )
        assert training_attention(model, kernel) == f"lorafit_{kernel}"
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=ALL)).train()
        if fused:  # as lorafit trains (models/adapter.add_adapter)
            assert fuse_lora_dropout(model) == (7 * layers if dropout else 0)
            assert fuse_lora_linears(model) == 7 * layers
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for tokens in (32, 64):
            seen = {}

            def pack(t, seen=seen, params=params):
                if t.untyped_storage().data_ptr() not in params:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            positions = torch.arange(tokens // samples).repeat(samples)[None]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=torch.randint(0, 256, (1, tokens)), position_ids=positions, use_cache=False)
            saved[layers, tokens] = sum(seen.values())
    return ((saved[3, 64] - saved[2, 64]) - (saved[3, 32] - saved[2, 32])) / 32


@pytest.mark.parametrize(
    "dropout,fused", [(0.0, True), (0.05, True), (0.05, False)], ids=["no-dropout", "dropout", "peft-dropout"]
)
@pytest.mark.parametrize("samples", [1, 2], ids=["one-sample", "packed"])
def test_cpu_activation_formula_equals_what_autograd_saves(dropout, fused, samples):
    """CPU training as lorafit runs it: fp32, per-sample sdpa (k/v repeated to every head), lorafit's LoRA dropout
    (a bool mask per LoRA layer, the input shared) or PEFT's own (a dropped copy and PyTorch's float mask on CPU, as
    DoRA keeps), and for packed rows the concatenated attention output o_proj reads."""
    from lorafit.plan.architecture import Arch
    from lorafit.plan.memory import activation_bytes_per_token_layer

    formula = activation_bytes_per_token_layer(
        Arch(96, 160, 3, 4, 2, 24, 256),
        ALL,
        8,
        dropout=dropout,
        act=4,
        residual=4,
        kv_expanded=True,
        mask_bytes=4,
        attn_out_shared=samples == 1,
        fused_dropout=fused,
    )
    assert formula == _saved_per_token_layer(dropout, "sdpa", samples, fused)
