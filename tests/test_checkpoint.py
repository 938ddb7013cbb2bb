"""Checkpoints are complete or ignored: manifest written last, atomic rename, resume skips broken ones."""

from __future__ import annotations

import errno
import json

import pytest

from lorafit.train.checkpoints import (
    MANIFEST,
    atomic_dir,
    checkpoint_problem,
    clear_temporaries,
    finalize_checkpoint,
    latest_checkpoint,
    read_manifest,
    rotate_checkpoints,
    save_error,
    staging_dir,
)


def _staged(root, step: int, payload: bytes = b"x" * 100):
    staged = staging_dir(root) / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(payload)
    (staged / "optimizer.pt").write_bytes(b"o" * 50)
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return staged


def _complete(root, step: int):
    return finalize_checkpoint(_staged(root, step), root / f"checkpoint-{step}", {"tokens": step * 10})


def test_finalize_moves_a_sealed_checkpoint_into_place(tmp_path):
    final = _complete(tmp_path, 5)
    assert final == tmp_path / "checkpoint-5" and final.is_dir()
    assert not (staging_dir(tmp_path) / "checkpoint-5").exists()
    assert checkpoint_problem(final) is None
    manifest = read_manifest(final)
    assert manifest["step"] == 5 and manifest["tokens"] == 50
    assert manifest["files"]["adapter_model.safetensors"] == 100


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / MANIFEST).unlink(), "no manifest"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"x" * 10), "bytes"),
        (lambda p: (p / "optimizer.pt").unlink(), "missing"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable"),
        (lambda p: (p / "trainer_state.json").write_text("{"), "manifest says"),  # size changed too
    ],
)
def test_damaged_checkpoints_are_reported(tmp_path, damage, reason):
    final = _complete(tmp_path, 3)
    damage(final)
    problem = checkpoint_problem(final)
    assert problem is not None and reason in problem


def test_latest_skips_incomplete_newer_checkpoints_with_a_warning(tmp_path):
    _complete(tmp_path, 2)
    _complete(tmp_path, 4)
    broken = _complete(tmp_path, 6)
    (broken / "adapter_model.safetensors").write_bytes(b"half")  # a write cut short
    unsealed = tmp_path / "checkpoint-8"  # what the plain Trainer leaves when killed mid-save
    unsealed.mkdir()
    (unsealed / "adapter_model.safetensors").write_bytes(b"x")
    _staged(tmp_path, 10)  # interrupted in staging
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-4"
    assert any("checkpoint-8" in w for w in warnings) and any("checkpoint-6" in w for w in warnings)


def test_latest_orders_by_step_not_name(tmp_path):
    for step in (9, 10, 100):
        _complete(tmp_path, step)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _complete(tmp_path, step)
    rotate_checkpoints(tmp_path, keep=2, protect={tmp_path / "checkpoint-2"})
    left = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert left == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]


def test_rotation_never_counts_or_deletes_incomplete_ones(tmp_path):
    _complete(tmp_path, 1)
    _complete(tmp_path, 2)
    (tmp_path / "checkpoint-3").mkdir()  # incomplete: must not push checkpoint-1 out
    rotate_checkpoints(tmp_path, keep=2)
    assert (tmp_path / "checkpoint-1").exists() and (tmp_path / "checkpoint-2").exists()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert (final / "old.txt").read_text() == "old" and not (final / "half.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_clear_temporaries_removes_only_hidden_temporaries(tmp_path):
    (tmp_path / ".adapter.tmp-123").mkdir()
    (tmp_path / "adapter").mkdir()
    assert [p.name for p in clear_temporaries(tmp_path)] == [".adapter.tmp-123"]
    assert (tmp_path / "adapter").exists()


def test_save_errors_say_what_happened_and_what_is_intact(tmp_path):
    prev = tmp_path / "checkpoint-4"
    full = save_error(OSError(errno.ENOSPC, "No space left on device"), "checkpoint 6", tmp_path / "checkpoint-6", prev)
    assert "disk is full" in full.message and str(prev) in full.message and "--resume" in full.hint
    assert full.exit_code == 1
    denied = save_error(PermissionError(errno.EACCES, "Permission denied"), "the adapter", tmp_path / "adapter")
    assert "not writable" in denied.message and "--resume" not in denied.hint
    # safetensors and torch.save do not raise OSError on a full disk
    st = save_error(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "the adapter",
        tmp_path / "adapter",
    )
    assert "disk is full" in st.message
