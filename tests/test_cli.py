"""The CLI: fast help, errors as one paragraph with exit code 2 and no traceback."""

import os
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "lorafit.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, lorafit.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    start = time.perf_counter()
    result = run("--help")
    assert result.returncode == 0 and "train" in result.stdout
    assert time.perf_counter() - start < 3.0  # generous on a shared CI box; tests/test_startup.py measures < 0.5 s


def test_config_error_exit_code_2_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora:\n  rr: 8\ntraining:\n  epochs: -1\n")
    result = run("train", str(cfg))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "`lora.rr`" in result.stderr and "`training.epochs`" in result.stderr


def test_missing_config_and_unknown_model(tmp_path):
    result = run("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  name: ./no/such/model\n")
    result = run("train", str(cfg), "output.dir=" + str(tmp_path / "runs"))
    assert result.returncode == 2 and "no/such/model" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "train", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "~nouser-lorafit/run"],
        ["export", "~nouser-lorafit/run", "--out", "x.gguf"],
        ["plan", "~nouser-lorafit/c.yaml"],
    ],
)
def test_unknown_home_directory_is_a_plain_error(tmp_path, args):
    """`~name` of a user that does not exist: pathlib raises RuntimeError; the path is simply not found."""
    result = run(*args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "~nouser-lorafit" in result.stderr, result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
