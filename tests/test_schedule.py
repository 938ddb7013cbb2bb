"""How many optimizer steps a run takes (train/schedule.py): the Trainer's own count, the small-data floor, the
too-few-steps warning, and the same numbers from `lorafit train`, `plan` and `data check`."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import chat_rows, run_cli, tiny_config, train_losses, write_jsonl

from lorafit.config import TrainingSection
from lorafit.train.schedule import DEFAULT_MIN_STEPS, TOO_FEW_STEPS, plan_schedule, steps_per_epoch


def training(**fields) -> TrainingSection:
    return TrainingSection(**fields)


@pytest.mark.parametrize(
    "samples,micro,accum,devices,expected",
    [
        (40, 4, 1, 1, 10),
        (41, 4, 1, 1, 11),
        (10, 2, 2, 1, 3),
        (10, 3, 1, 2, 2),
        (1, 8, 4, 1, 1),
        (10_000, 4, 2, 1, 1250),
    ],
)
def test_steps_per_epoch_is_the_trainers_count(samples, micro, accum, devices, expected):
    assert steps_per_epoch(samples, micro, accum, devices) == expected


def test_small_data_gets_more_epochs_up_to_the_floor():
    s = plan_schedule(training(), 40, devices=1, hidden_size=576)  # defaults: 3 epochs, 4 samples per step, floor 150
    assert (s.samples_per_step, s.steps_per_epoch, s.steps, s.rule) == (4, 10, 150, "min_steps")
    assert s.epochs == pytest.approx(15.0) and s.warnings == []
    assert (
        "schedule: 40 samples, 4 per optimizer step, 150 optimizer steps = 15.0 epochs, raised to "
        "`training.min_steps` 150 for small data; learning rate 0.0014 (auto: 2e-4 × 4096 / hidden size 576)"
    ) == s.line()


def test_the_learning_rate_scales_with_the_width():
    assert plan_schedule(training(), 10, hidden_size=4096).learning_rate == pytest.approx(2e-4)  # Llama 3.1 8B
    assert plan_schedule(training(), 10, hidden_size=8192).learning_rate == pytest.approx(1e-4)  # 70B
    assert plan_schedule(training(), 10, hidden_size=64).learning_rate == pytest.approx(2e-3)  # capped
    assert plan_schedule(training(learning_rate=5e-5), 10, hidden_size=576).learning_rate == 5e-5
    assert plan_schedule(training(), 10).learning_rate is None  # auto, width not known yet


def test_large_data_keeps_its_epochs():
    s = plan_schedule(training(), 10_000, devices=1)
    assert (s.steps, s.rule, s.epochs) == (7500, "epochs", 3.0)
    assert plan_schedule(training(epochs=1.5), 10_000, devices=1).steps == 3750


def test_max_steps_wins_and_devices_multiply_the_batch():
    s = plan_schedule(training(max_steps=200), 40, devices=1)
    assert (s.steps, s.rule) == (200, "max_steps") and s.epochs == pytest.approx(20.0)
    s = plan_schedule(training(micro_batch_size=2, gradient_accumulation=2, min_steps=0), 100, devices=2)
    assert (s.samples_per_step, s.steps_per_epoch, s.steps) == (8, 13, 39)


def test_too_few_steps_warns_and_says_what_to_change():
    no_floor = training(min_steps=0)  # 40 samples, 3 epochs, 4 per step
    [warning] = plan_schedule(no_floor, 40, devices=1).warnings
    assert "only 30 optimizer step(s)" in warning and f"fewer than {TOO_FEW_STEPS} steps" in warning
    assert (
        "raise `training.min_steps` to 60 or more (the default floor is 150), or raise `training.epochs` to 6, or "
        "lower the samples per step" in warning
    )
    assert DEFAULT_MIN_STEPS == training().min_steps
    [warning] = plan_schedule(training(max_steps=5), 1000, devices=1).warnings
    assert "raise `training.max_steps` to 60 or more" in warning and "samples per step" not in warning
    assert plan_schedule(training(max_steps=TOO_FEW_STEPS), 40, devices=1).warnings == []
    assert plan_schedule(training(), 20, devices=1).warnings == []  # the default floor is above the threshold
    assert training().min_steps >= TOO_FEW_STEPS


def test_train_runs_the_steps_it_announces(tmp_path, tiny_chat_model):
    """10 samples, 2 x 2 per step = 3 steps per epoch; 1 epoch raised to the floor of 7 steps: the Trainer runs 7."""
    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        n_train=10,
        data={"packing": True},
        training={"max_steps": -1, "epochs": 1, "min_steps": 7, "gradient_accumulation": 2},
    )
    done = run_cli("train", str(config), "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "schedule: 10 samples, 4 per optimizer step, 7 optimizer steps = 2.3 epochs, raised to" in done.stdout
    assert "warning: this run takes only 7 optimizer step(s)" in done.stderr
    run = tmp_path / "runs" / "run"
    assert max(train_losses(run)) == 7
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["schedule"]["steps"] == 7 and summary["schedule"]["samples"] == 10


def test_plan_and_data_check_print_the_schedule(tmp_path, tiny_chat_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(25))
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_chat_model)},
                "data": {"train": str(data)},
                "training": {"epochs": 2, "min_steps": 0},
            }
        )
    )
    done = run_cli("data", "check", str(config), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert {k: report["schedule"][k] for k in ("samples", "samples_per_step", "steps", "epochs")} == {
        "samples": 25,
        "samples_per_step": 4,
        "steps": 14,
        "epochs": 2.0,
    }
    assert any("only 14 optimizer step(s)" in w for w in report["warnings"])
    text = run_cli("data", "check", str(config)).stdout
    assert "schedule: 25 samples, 4 per optimizer step, 14 optimizer steps = 2.0 epochs" in text
    assert "warning: this run takes only 14 optimizer step(s)" in text
    plan = run_cli("plan", str(config), "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout)["schedule"]["steps"] == 14
    text = run_cli("plan", str(config), "training.min_steps=60").stdout
    assert "schedule: 25 samples, 4 per optimizer step, 60 optimizer steps = 8.6 epochs, raised to" in text
    # a data file alone: lorafit's default training settings
    report = json.loads(run_cli("data", "check", str(data), "--json").stdout)
    assert report["schedule"]["steps"] == TrainingSection().min_steps and report["schedule"]["rule"] == "min_steps"


def test_plan_without_readable_data_still_gives_samples_per_step(tmp_path, tiny_chat_model):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_chat_model)},
                "data": {"train": str(tmp_path / "no.jsonl")},
                "training": {"micro_batch_size": 2, "gradient_accumulation": 8},
            }
        )
    )
    done = run_cli("plan", str(config), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    schedule = json.loads(done.stdout)["schedule"]
    assert (
        schedule["samples_per_step"] == 16 and schedule["steps"] is None and "could not be counted" in schedule["line"]
    )
