"""Exact resume: SIGKILL part-way, `--resume`, and the result equals an uninterrupted run with the same seed.

Both runs are real `lorafit train` processes. The one killed may die at any moment, including inside a
checkpoint save: resume must take the newest complete checkpoint and ignore whatever was half-written.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    adapter_tensors,
    cli_env,
    lorafit_cmd,
    metrics,
    run_cli,
    tiny_config,
    train_losses,
)

from lorafit.train.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    list_checkpoints,
)

STEPS = 16  # two epochs of 8 steps: the resume crosses an epoch boundary
FIELDS = {
    "training": {
        "max_steps": STEPS,
        "save_every": 2,
        "save_total_limit": 3,
        "micro_batch_size": 2,
        "learning_rate": 5e-3,
        "logging_steps": 1,
    },
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
}  # dropout: the restored RNG state matters


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_chat_model) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run_cli("train", str(tiny_config(tmp, tiny_chat_model, name="ref", **FIELDS)), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "runs" / "ref"


def _complete_steps(run: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(run / "checkpoints") if checkpoint_problem(p) is None]


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        lorafit_cmd("train", str(config), "--quiet"),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not _complete_steps(run):
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    ours, theirs = adapter_tensors(run / "adapter"), adapter_tensors(reference / "adapter")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    # the loss curve continues where it stopped: every step once, and the same values
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    ref = train_losses(reference)
    for step, loss in train_losses(run).items():
        assert loss == pytest.approx(ref[step], rel=1e-4), step


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_chat_model, reference):
    config = tiny_config(tmp_path, tiny_chat_model, name="killed", **FIELDS)
    run = tmp_path / "runs" / "killed"
    proc = _start(config)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "adapter").exists(), "the run finished before it could be killed"
    killed_at = max(_complete_steps(run))
    assert killed_at < STEPS

    done = run_cli("train", str(config), "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    _assert_same_as_reference(run, reference)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_how_to_resume(tmp_path, tiny_chat_model, reference):
    threads = torch.get_num_threads()
    fields = {**FIELDS, "training": {**FIELDS["training"], "save_every": 5}}  # the signal lands between saves
    config = tiny_config(tmp_path, tiny_chat_model, name="preempted", **fields)
    run = tmp_path / "runs" / "preempted"
    proc = _start(config)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped = max(_complete_steps(run))
    assert stopped >= 5 and f"checkpoint-{stopped}" in err  # saved where it stopped, not only at save_every
    assert not (run / "adapter").exists()  # an interrupted run is never presented as finished

    from lorafit.config import load_config
    from lorafit.train.run import run_training

    torch.set_num_threads(1)  # as in the reference process, so the float sums are done in the same order
    try:
        run_training(load_config(config), resume=True, quiet=True)  # `--resume`, in this process this time
    finally:
        torch.set_num_threads(threads)
    _assert_same_as_reference(run, reference)


def test_resume_without_a_checkpoint_starts_over(tmp_path, tiny_chat_model, caplog):
    from lorafit.config import load_config
    from lorafit.train.run import run_training

    config = tiny_config(tmp_path, tiny_chat_model, name="fresh", training={"max_steps": 2})
    with caplog.at_level("WARNING", logger="lorafit"):
        run_training(load_config(config), resume=True, quiet=True)
    assert "no complete checkpoint" in caplog.text
    assert [r["step"] for r in metrics(tmp_path / "runs" / "fresh") if "loss" in r] == [1, 2]
