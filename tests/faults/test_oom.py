"""Out of GPU memory: caught, reported with the step, the last checkpoint and what to change (the planner's
suggestion when it offers one, else concrete config changes); exit 1 without a traceback. On CPU the same
code path is driven by a training step patched to raise torch.OutOfMemoryError."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from helpers import tiny_config

from lorafit.config import load_config
from lorafit.errors import TrainingError

CUDA_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.65 GiB"


def oom_at_call(monkeypatch, n: int):
    real = transformers.Trainer.training_step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)


def test_oom_is_reported_with_what_to_change(tmp_path, tiny_chat_model, monkeypatch):
    from lorafit.train.run import run_training

    oom_at_call(monkeypatch, 3)
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 4, "save_every": 1, "micro_batch_size": 4})
    with pytest.raises(TrainingError) as info:
        run_training(load_config(config), quiet=True)
    err = info.value
    assert err.exit_code == 1
    assert "out of GPU memory during step 3" in err.message and "Tried to allocate 2.00 GiB" in err.message
    assert "checkpoint-2" in err.message  # what is safe to resume from
    hint = err.hint
    assert "model.quantization=4bit" in hint and "training.gradient_checkpointing=true" in hint
    assert "training.micro_batch_size=2 training.gradient_accumulation=2" in hint and "data.max_length=48" in hint


def test_advice_leaves_out_what_the_config_already_does(tmp_path, tiny_chat_model):
    from lorafit.train.faults import generic_oom_advice

    cfg = load_config(
        tiny_config(
            tmp_path,
            tiny_chat_model,
            model={"quantization": "4bit"},
            training={"gradient_checkpointing": True, "micro_batch_size": 1},
        )
    )
    advice = generic_oom_advice(cfg)
    assert "quantization" not in advice and "gradient_checkpointing" not in advice and "micro_batch_size" not in advice
    assert "data.max_length" in advice


def test_the_planner_suggestion_is_used_when_the_planner_offers_one(tmp_path, tiny_chat_model, monkeypatch):
    import lorafit.train.faults
    from lorafit.train.faults import oom_error

    cfg = load_config(tiny_config(tmp_path, tiny_chat_model))
    monkeypatch.setattr(
        lorafit.train.faults, "suggest_for_oom", lambda c: f"  - planner: r={c.lora.r} fits in 7.9 GiB", raising=False
    )
    assert "planner: r=4 fits" in oom_error(torch.OutOfMemoryError("x"), cfg, "step 1", tmp_path).hint
    monkeypatch.setattr(lorafit.train.faults, "suggest_for_oom", lambda c: 1 / 0, raising=False)  # a broken planner
    assert "model.quantization=4bit" in oom_error(torch.OutOfMemoryError("x"), cfg, "step 1", tmp_path).hint


def test_the_cli_exits_1_with_the_advice_and_no_traceback(tmp_path, tiny_chat_model, monkeypatch, capsys):
    from lorafit.cli import main

    oom_at_call(monkeypatch, 1)
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 2})
    monkeypatch.setattr(sys, "argv", ["lorafit", "train", str(config), "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "out of GPU memory during step 1" in err and "To fit this run" in err and "Traceback" not in err
