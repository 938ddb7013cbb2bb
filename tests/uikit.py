"""Helpers for the `lorafit ui` tests: run directories written by hand, a stand-in training process, the server
on a free port in a thread, and headless Debian chromium driven by Playwright (no browser is downloaded)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def write_metrics(run: Path, steps: range, with_eval: bool = True, scale: float = 1.0) -> None:
    """Append training records (and an eval every 5 steps) as MetricsCallback writes them."""
    run.mkdir(parents=True, exist_ok=True)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        for step in steps:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": scale * 3.0 / step**0.5,
                        "learning_rate": 1e-3,
                        "tokens": step * 500,
                        "trained_tokens": step * 200,
                        "tokens_per_second": 800.0 + step,
                    }
                )
                + "\n"
            )
            if with_eval and step % 5 == 0:
                f.write(json.dumps({"step": step, "eval_loss": 2.5 / step**0.4}) + "\n")


def write_run(run: Path, steps: int = 20, model: str = "tiny", finished: bool = True, scale: float = 1.0) -> Path:
    """A run directory as `lorafit train` leaves it: config, metrics, and (finished) summary + adapter config."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"model:\n  name: {model}\n", encoding="utf-8")
    write_metrics(run, range(1, steps + 1), scale=scale)
    if finished:
        (run / "adapter").mkdir(exist_ok=True)
        (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
        summary = {
            "model": model,
            "steps": steps,
            "train_loss": 1.25,
            "eval_loss": 1.1,
            "tokens_per_second": 900.0,
            "peak_memory_bytes": 3 * 2**30,
            "seconds": 42.0,
        }
        (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


def write_status(run: Path, pid: int, step: int, max_steps: int, elapsed: float = 10.0) -> None:
    """status.json as train/status.py writes it; `elapsed` seconds between the start and this update."""
    started = time.time()  # after the process was created, as in training (the UI checks that against pid reuse)
    status = {
        "pid": pid,
        "host": socket.gethostname(),
        "phase": "training",
        "step": step,
        "max_steps": max_steps,
        "first_step": 0,
        "started": started,
        "updated": started + elapsed,
        "memory_bytes": 2**30,
        "memory_kind": "process RSS",
    }
    (run / "status.json").write_text(json.dumps(status), encoding="utf-8")


def sleeper() -> subprocess.Popen:
    """A process standing in for a training one: it dies of the SIGTERM the Stop button sends."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(runs: Path, root: Path):
    """`lorafit ui`'s app on 127.0.0.1:PORT in a thread; yields the base URL."""
    import uvicorn

    from lorafit.ui.server import build_app

    app = build_app(runs, root)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the ui server did not start"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        app.state.ui.launcher.stop_all()
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def browser():
    """Headless Debian chromium (Playwright drives the system binary: nothing is downloaded)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
