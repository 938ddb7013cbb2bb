"""status.json: who is training this run and how far it is, for `lorafit ui` (and anyone who wants to watch).

Written by the main process at the start of training and at every log event: its pid (so the UI's Stop button
can send SIGTERM, which saves a checkpoint: callbacks.StopOnSignal), the step out of max_steps, the time, and the
memory in use. metrics.jsonl holds the curves; this file holds what a curve cannot (the plan and the process).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from transformers import TrainerCallback

from lorafit.rundir import write_text_atomic

STATUS_FILE = "status.json"


def memory_in_use() -> tuple[int, str]:
    """(bytes, kind): the GPU's allocated memory when training there, else this process's resident memory."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated()), "GPU"
    import psutil

    return int(psutil.Process().memory_info().rss), "process RSS"


class RunStatus(TrainerCallback):
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / STATUS_FILE
        self.enabled = enabled
        self.started = time.time()
        self.first_step = 0

    def _write(self, state, phase: str) -> None:
        if not self.enabled:
            return
        memory, kind = memory_in_use()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "phase": phase,
            "step": state.global_step,
            "max_steps": state.max_steps,
            "first_step": self.first_step,  # the step this process started from (a resume starts later)
            "started": self.started,
            "updated": time.time(),
            "memory_bytes": memory,
            "memory_kind": kind,
        }
        try:
            write_text_atomic(self.path, json.dumps(record))
        except OSError:  # a full disk: the metrics callback already warns; watching is a convenience
            pass

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.time(), state.global_step
        self._write(state, "training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write(state, "training")

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, "saving")  # the final evaluation and saves follow; the process ends after them
