"""Checkpoints and final saves that are complete or absent, never half-written.

transformers' Trainer writes `checkpoint-N/` file by file where it will stay, so a process killed mid-save
(preemption, SIGKILL, a full disk) leaves a folder that looks like a checkpoint and is not one. We point the
Trainer at a staging folder (`checkpoints/.partial/`), and only when everything is written and fsynced do we
add a manifest (file names and sizes) and rename the folder into `checkpoints/` — one atomic step. Resume
takes the newest folder whose manifest matches its files and warns about any other.

The final adapter and tokenizer go through `atomic_dir` the same way: written next to their place under a
temporary name, then renamed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafit.errors import TrainingError
from lorafit.hf_compat import save_training_state
from lorafit.rundir import write_text_atomic

log = logging.getLogger("lorafit")

STAGING = ".partial"  # the Trainer's output_dir: checkpoints are written here, then renamed into place
MANIFEST = "lorafit_checkpoint.json"  # written last: what the checkpoint holds and how big each file is
PREFIX = "checkpoint-"
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors")


def staging_dir(checkpoints: Path) -> Path:
    return Path(checkpoints) / STAGING


def checkpoint_step(path: Path) -> int:
    try:
        return int(Path(path).name.removeprefix(PREFIX))
    except ValueError:
        return -1


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk: a rename is only safe once what it names is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the rename still orders the writes
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _file_sizes(root: Path) -> dict[str, int]:
    sizes = {}
    for folder, _, files in os.walk(root):
        for name in files:
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                sizes[rel] = p.stat().st_size
    return sizes


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and removed only after the rename."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finalize_checkpoint(staged: Path, final: Path, extra: dict | None = None) -> Path:
    """Seal a fully written checkpoint: manifest last, fsync, then rename it into `checkpoints/`."""
    staged, final = Path(staged), Path(final)
    manifest = {"step": checkpoint_step(final), "files": _file_sizes(staged), **(extra or {})}
    write_text_atomic(staged / MANIFEST, json.dumps(manifest, indent=1))
    fsync_tree(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    _replace_dir(staged, final)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (None when it is one)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for rel, size in files.items():
        p = path / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size}"
    if not any(name in files for name in ADAPTER_FILES):
        return "it holds no adapter weights"
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    return None


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """`checkpoint-N` folders, oldest first (by step, not mtime: resuming rewrites newer steps)."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    return [p for p in list_checkpoints(checkpoints) if checkpoint_problem(p) is None]


def latest_checkpoint(checkpoints: Path, warn=log.warning) -> Path | None:
    """The newest complete checkpoint; every newer incomplete or corrupt one is skipped with a warning."""
    for path in reversed(list_checkpoints(checkpoints)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"skipping {path}: not a complete checkpoint ({problem}).")
    return None


def rotate_checkpoints(checkpoints: Path, keep: int | None, protect: set[Path] | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` (never one in `protect`); returns what was removed."""
    if not keep or keep < 1:
        return []
    protect = {Path(p).resolve() for p in (protect or set())}
    complete = complete_checkpoints(checkpoints)
    removed = []
    for path in complete[: max(len(complete) - keep, 0)]:
        if path.resolve() in protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def clear_staging(checkpoints: Path, warn=log.warning) -> None:
    """Remove what a killed save left in the staging folder (it was never a checkpoint)."""
    staged = staging_dir(checkpoints)
    leftovers = sorted(p.name for p in staged.iterdir()) if staged.is_dir() else []
    if leftovers:
        warn(f"removing {', '.join(leftovers)} from {staged}: a checkpoint save was interrupted there.")
    shutil.rmtree(staged, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename, on failure it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_temporaries(run_dir: Path) -> list[Path]:
    """Remove temporary folders left by a process killed mid-save (they were never presented as complete)."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in Path(run_dir).glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


WRITE_ERRORS = (OSError, RuntimeError)  # torch.save reports a full disk as RuntimeError("... unexpected pos ...")


def is_write_failure(err: BaseException) -> bool:
    """Errors a save raises when the disk refuses it (safetensors has its own exception type)."""
    return isinstance(err, WRITE_ERRORS) or type(err).__name__ == "SafetensorError"


def _disk_full(err: BaseException, path: Path) -> bool:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left" in text or "os error 28" in text or "Disk quota" in text or "StorageFull" in text:
        return True
    # torch.save's zip writer hides the errno; a nearly empty disk right after the failure tells the story
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < 16 * 2**20
    except OSError:
        return False


def save_error(err: BaseException, what: str, path: Path, previous: Path | None = None) -> TrainingError:
    """A write failure as a message a user can act on, saying what is still intact."""
    path = Path(path)
    code = getattr(err, "errno", None)
    if _disk_full(err, path):
        cause = "the disk is full (or over quota)"
        fix = f"Free space on the disk holding {path.parent} (`df -h {path.parent}`)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "the folder is not writable"
        fix = f"Make {path.parent} writable or choose another `output.dir`"
    else:
        cause = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
        fix = f"Check the disk holding {path.parent}"
    kept = f" The previous checkpoint {previous} is intact." if previous else ""
    return TrainingError(
        f"could not write {what} to {path}: {cause}.{kept} Nothing half-written was left in its place.",
        f"{fix}, then continue with `lorafit train CONFIG --resume`."
        if previous
        else f"{fix}, then run the same command again.",
    )


def final_adapter_state(trainer) -> dict | None:
    """The weights rank 0 saves as the final adapter, where PEFT cannot read them from rank 0's model alone (None
    elsewhere). Every rank calls this.

    - DeepSpeed ZeRO-3: each rank holds a slice of every weight, the LoRA ones too; they are gathered (a collective),
      as the Trainer does for a checkpoint.
    - FSDP (sharded at load, runtime.take_over_fsdp): the LoRA weights are whole on every rank, but PEFT's own
      state_dict() walks the sharded base and waits for the other ranks; the trainable weights are the adapter."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if getattr(trainer, "is_distributed_loading_by_transformers", False):
        return {name: p.detach() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return None


class AtomicCheckpoints:
    """Trainer mixin: `Trainer._save_checkpoint` writes into the staging folder (the Trainer's output_dir);
    we seal and rename it, then keep the newest `checkpoint_keep` (and the best one, for early stopping).

    A write failure becomes a TrainingError that names what is still intact; the partial folder is removed.
    """

    # Set by the Trainer subclass's __init__ (train/trainer.py): where complete checkpoints live, how many to keep,
    # and a callable whose dict goes into each manifest.
    checkpoint_dir: Path
    checkpoint_keep: int | None
    checkpoint_extra: object

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        staged = Path(self.args.output_dir) / f"{PREFIX}{step}"
        final = Path(self.checkpoint_dir) / staged.name
        done = complete_checkpoints(self.checkpoint_dir)
        previous = done[-1] if done else None
        try:
            super()._save_checkpoint(model, trial)
            if self.args.save_only_model and self.is_distributed_loading_by_transformers:
                # Sharded at load (FSDP): the Trainer refuses to write the optimizer state of such a model, as
                # sharded weights' state would need a distributed save. With LoRA the optimizer sees only the
                # adapter, whole on every rank (setup.check_training_config refuses a sharded trainable weight), so
                # the Trainer's own writers are exact.
                save_training_state(self, staged)
            self.accelerator.wait_for_everyone()  # other ranks write their RNG state into the same folder
            if self.args.should_save:
                finalize_checkpoint(staged, final, self.checkpoint_extra() if self.checkpoint_extra else None)
        except Exception as err:
            if not is_write_failure(err):
                raise
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            raise save_error(err, f"checkpoint {step}", final, previous) from err
        if self.args.should_save:
            best = self.state.best_global_step
            protect = {Path(self.checkpoint_dir) / f"{PREFIX}{best}"} if best else set()
            rotate_checkpoints(self.checkpoint_dir, self.checkpoint_keep, protect)
            log.debug("checkpoint %s written", final)
