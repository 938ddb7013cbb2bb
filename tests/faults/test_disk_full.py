"""A full disk or an unwritable output while checkpointing or saving: a clear error (exit 1), the previous checkpoint
and the run directory intact, nothing half-written presented as complete, and `--resume` works once fixed."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import peft.peft_model
import pytest
from helpers import metrics, tiny_config
from transformers import TrainerCallback

from lorafit.config import load_config
from lorafit.errors import RunDirError, TrainingError
from lorafit.rundir import is_run_dir
from lorafit.train.checkpoints import (
    checkpoint_problem,
    complete_checkpoints,
    list_checkpoints,
    staging_dir,
)


def failing_save(monkeypatch, fail_when):
    """Patch the adapter writer (PEFT's safetensors save): half-write the file, then raise ENOSPC when asked."""
    real = peft.peft_model.safe_save_file
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if fail_when(filename, len(calls)):
            Path(filename).write_bytes(b"\0" * 100)  # what a full disk leaves: the start of a file
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    return calls


def _run(cfg_path, resume=False):
    from lorafit.train.run import run_training

    return run_training(load_config(cfg_path), resume=resume, quiet=True)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_chat_model, monkeypatch):
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 6, "save_every": 2})
    failing_save(monkeypatch, lambda name, n: "checkpoint-4" in name)
    with pytest.raises(TrainingError) as info:
        _run(config)
    err = info.value
    run = tmp_path / "runs" / "run"
    assert err.exit_code == 1
    assert "could not write checkpoint 4" in err.message and "disk is full" in err.message
    assert (
        f"previous checkpoint {run / 'checkpoints' / 'checkpoint-2'} is intact" in err.message
        and "--resume" in err.hint
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-2"]
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-2") is None
    assert not list(staging_dir(run / "checkpoints").glob("*"))  # the half-written one is gone, space given back
    assert not is_run_dir(run) and (run / "config.yaml").exists() and metrics(run)

    monkeypatch.undo()  # space freed: the same command with --resume finishes the run
    _run(config, resume=True)
    assert is_run_dir(run)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_saving_the_final_adapter(tmp_path, tiny_chat_model, monkeypatch):
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 4, "save_every": 2})
    failing_save(monkeypatch, lambda name, n: ".adapter.tmp-" in name)
    with pytest.raises(TrainingError) as info:
        _run(config)
    run = tmp_path / "runs" / "run"
    assert "the final adapter" in info.value.message and "disk is full" in info.value.message
    assert not (run / "adapter").exists() and not list(run.glob(".adapter.tmp-*"))
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]

    monkeypatch.undo()
    _run(config, resume=True)  # nothing left to train: evaluates and saves the adapter
    assert is_run_dir(run)


def test_an_unwritable_output_dir_is_a_clear_error(tmp_path, tiny_chat_model):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the runs folder should be")
    config = tiny_config(tmp_path, tiny_chat_model, output={"dir": str(blocker), "name": "run"})
    with pytest.raises(RunDirError) as info:
        _run(config)
    assert "cannot create the run directory" in info.value.message and "output.dir" in info.value.hint


def test_an_existing_run_is_left_alone_when_the_new_one_cannot_start(tmp_path, tiny_chat_model):
    config = tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 2})
    run = _run(config)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(RunDirError, match="already exists"):
        _run(config)  # same name, no overwrite: refused before anything is touched
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


class FillDisk(TrainerCallback):
    """After the first checkpoint, fill the filesystem, as a long run's logs or another job would."""

    def __init__(self, folder: Path):
        self.filler = folder / "filler.bin"

    def on_save(self, args, state, control, **kwargs):
        if self.filler.exists():
            return
        with open(self.filler, "wb", buffering=0) as f:
            for chunk in (2**20, 4096, 1):  # down to the last byte: even metrics.jsonl cannot grow
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError:
                    pass


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-save tests above cover the same code path")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_really_full_disk(tmp_path, tiny_chat_model, small_disk):
    # safetensors and torch.save do not raise OSError on a full disk (SafetensorError, RuntimeError): both must be caught
    from lorafit.train.run import run_training

    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        training={"max_steps": 6, "save_every": 2},
        output={"dir": str(small_disk), "name": "run"},
    )
    with pytest.raises(TrainingError) as info:
        run_training(load_config(config), quiet=True, callbacks=[FillDisk(small_disk)])
    run = small_disk / "run"
    assert "disk is full" in info.value.message, info.value.message
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-2") is None
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-2"]
    assert not any(p.name.startswith("checkpoint-") for p in list_checkpoints(run / "checkpoints")[1:])
    os.remove(small_disk / "filler.bin")
    shutil.rmtree(staging_dir(run / "checkpoints"), ignore_errors=True)
    run_training(load_config(config), resume=True, quiet=True)
    assert is_run_dir(run)
