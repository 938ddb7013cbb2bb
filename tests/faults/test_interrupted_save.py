"""A process killed in the middle of writing the final adapter or a checkpoint never leaves a half-written one
that looks complete: the run is not presented as finished, resume ignores the partial files and cleans them up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_env, metrics, tiny_config

from lorafit.config import load_config
from lorafit.errors import RunDirError
from lorafit.rundir import is_run_dir, load_tuned
from lorafit.train.checkpoints import (
    MANIFEST,
    checkpoint_problem,
    latest_checkpoint,
    staging_dir,
)

# Injected into the training process: the adapter writer stalls, half-way, on the file we choose.
STALL = """
import os, pathlib, time
import peft.peft_model as pm
real = pm.safe_save_file

def save(tensors, filename, metadata=None):
    if os.environ["STALL_ON"] in str(filename):
        pathlib.Path(filename).write_bytes(b"\\0" * 100)  # the start of the file, then the kill
        pathlib.Path(os.environ["STALL_FLAG"]).write_text(str(filename))
        time.sleep(600)
    return real(tensors, filename, metadata=metadata)

pm.safe_save_file = save
"""


def resume(config: Path, caplog) -> str:
    """`lorafit train CONFIG --resume`, in this process (the kill test above already paid for one start-up)."""
    from lorafit.train.run import run_training

    with caplog.at_level("WARNING", logger="lorafit"):
        run_training(load_config(config), resume=True, quiet=True)
    return caplog.text


def kill_while_saving(tmp_path: Path, config: Path, stall_on: str) -> str:
    """Run `lorafit train`, SIGKILL it while it writes a file whose path contains `stall_on`; returns that path."""
    (tmp_path / "stall.py").write_text(STALL)
    flag = tmp_path / "saving.flag"
    env = dict(cli_env(), STALL_ON=stall_on, STALL_FLAG=str(flag))
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import stall; from lorafit.cli import main; main()", "train", str(config), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return flag.read_text()


@pytest.mark.slow
def test_killed_while_writing_the_final_adapter(tmp_path, tiny_chat_model, caplog):
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 4, "save_every": 2})
    run = tmp_path / "runs" / "run"
    partial = Path(kill_while_saving(tmp_path, config, ".adapter.tmp-"))
    assert partial.exists() and partial.stat().st_size == 100  # killed in the middle of the write
    assert not (run / "adapter").exists() and not is_run_dir(run)
    with pytest.raises(RunDirError, match="no complete adapter"):
        load_tuned(run)

    warnings = resume(config, caplog)
    assert "a save was interrupted" in warnings
    assert not list(run.glob(".adapter.tmp-*")) and is_run_dir(run)
    model, _, _ = load_tuned(run)
    assert model.peft_config["default"].r == 4


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint(tmp_path, tiny_chat_model, caplog, capsys):
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 6, "save_every": 2})
    run = tmp_path / "runs" / "run"
    checkpoints = run / "checkpoints"
    partial = Path(kill_while_saving(tmp_path, config, f"{staging_dir(checkpoints).name}/checkpoint-4"))
    assert partial.is_relative_to(staging_dir(checkpoints))  # the half-written checkpoint never left staging
    assert not (checkpoints / "checkpoint-4").exists()
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    # and a checkpoint-N written the way a plain Trainer writes it, killed before it was finished
    unsealed = checkpoints / "checkpoint-5"
    shutil.copytree(checkpoints / "checkpoint-2", unsealed)
    (unsealed / MANIFEST).unlink()
    assert checkpoint_problem(unsealed) is not None

    warnings = resume(config, caplog)
    assert "skipping" in warnings and "checkpoint-5" in warnings  # warned, not used
    assert "checkpoint save was interrupted" in warnings
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert is_run_dir(run) and not list(staging_dir(checkpoints).glob("*"))
