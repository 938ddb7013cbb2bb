"""NaN/inf losses or gradients: bad updates are skipped, the run stops after `training.max_bad_steps` in a row
with a message naming the step and the likely causes, and the last good checkpoint is kept."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import metrics, tiny_config
from transformers import TrainerCallback

from lorafit.config import load_config
from lorafit.errors import TrainingError
from lorafit.train.checkpoints import complete_checkpoints


def test_a_learning_rate_that_explodes_stops_the_run_with_causes(tmp_path, tiny_chat_model, monkeypatch, capsys):
    from lorafit.cli import main

    # lr 1e30: the first update is finite, and from then on every forward overflows to NaN
    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        training={"learning_rate": 1e30, "max_steps": 10, "save_every": 1, "max_bad_steps": 3},
    )
    monkeypatch.setattr(sys, "argv", ["lorafit", "train", str(config), "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "training stopped at step 4" in err and "from step 2" in err and "NaN/inf" in err
    assert "learning rate" in err and "training.learning_rate=1e+30" in err and "Traceback" not in err
    run = tmp_path / "runs" / "run"
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-1"]  # none of a bad step
    assert "checkpoint-1" in err
    assert not (run / "adapter").exists()
    losses = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert losses[1] is not None and losses[2] is None  # logged as null, never replaced by an average


class Poison(TrainerCallback):
    """Makes the forward (or the gradients) non-finite during the given optimizer steps (1-based)."""

    def __init__(self, model, steps: set[int], where: str):
        self.steps, self.where, self.active = steps, where, False
        self.snapshots: dict[int, dict] = {}
        norm = model.base_model.model.model.norm  # the final norm feeds the loss whatever the loss mode
        norm.register_forward_hook(lambda m, i, out: out * float("nan") if self.active and where == "loss" else out)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: g * float("inf") if self.active and where == "grads" else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 in self.steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }


def _session(tmp_path, model_dir, **training):
    from lorafit.train.setup import build_run

    cfg = load_config(tiny_config(tmp_path, model_dir, training={"max_steps": 6, **training}))
    (tmp_path / "run").mkdir()
    return build_run(cfg, tmp_path / "run", quiet=True, say=lambda *a: None)


@pytest.mark.parametrize("where", ["loss", "grads"])
def test_an_isolated_bad_step_is_skipped_and_training_goes_on(tmp_path, tiny_chat_model, where):
    s = _session(tmp_path, tiny_chat_model, max_bad_steps=2)
    poison = Poison(s.model, {3}, where)
    s.trainer.add_callback(poison)
    s.trainer.train()
    assert s.guard.failed is None and s.trainer.state.global_step == 6
    before, after = poison.snapshots[2], poison.snapshots[3]
    for name in before:  # the bad step changed nothing: weights (and so optimizer state) as after step 2
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    assert any((poison.snapshots[4][n] - after[n]).abs().max() > 0 for n in after)  # and step 4 trained again


def test_consecutive_bad_gradients_stop_the_run(tmp_path, tiny_chat_model):
    from lorafit.train.faults import nan_error

    s = _session(tmp_path, tiny_chat_model, max_bad_steps=2)
    s.trainer.add_callback(Poison(s.model, {2, 3, 4, 5, 6}, "grads"))
    seen, observe = [], s.guard.observe_grad_norm
    s.guard.observe_grad_norm = lambda norm: (seen.append(float(norm)), observe(norm))
    s.trainer.train()
    assert s.guard.failed == {"step": 3, "first_step": 2, "reason": "gradients"}
    # judged by the Trainer's own gradient norm (callbacks.GuardedGradNorm), not by a pass over every gradient
    assert len(seen) == 3 and math.isfinite(seen[0]) and not any(map(math.isfinite, seen[1:]))
    assert s.trainer.state.global_step == 3
    message = nan_error(s.guard.failed, s.cfg, s.checkpoints).message
    assert "step 3" in message and "gradients" in message


def test_the_message_names_fp16_overflow_when_training_in_fp16(tmp_path, tiny_chat_model):
    from lorafit.train.faults import nan_error

    cfg = load_config(tiny_config(tmp_path, tiny_chat_model, training={"precision": "fp16", "max_grad_norm": 0}))
    err = nan_error({"step": 9, "first_step": 7, "reason": "loss"}, cfg, tmp_path / "none")
    assert isinstance(err, TrainingError) and err.exit_code == 1
    assert "fp16 overflow" in err.message and "max_grad_norm=0" in err.message and "step 9" in err.message
    assert "No checkpoint had been written" in err.message


def test_a_non_finite_gradient_norm_alone_skips_the_step():
    from types import SimpleNamespace

    from transformers import TrainerControl

    from lorafit.train.callbacks import NanGuard

    guard, model = NanGuard(max_bad=3), torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)  # finite: only the norm the Trainer computed says otherwise
    args, state = SimpleNamespace(fp16=False), SimpleNamespace(global_step=0)
    guard.observe_grad_norm(torch.tensor(float("nan")))
    guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
    assert guard.bad_in_row == 1 and model.weight.grad is None
    model.weight.grad = torch.ones(2, 2)
    guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)  # no norm: every gradient is checked
    assert guard.bad_in_row == 0 and model.weight.grad is not None
