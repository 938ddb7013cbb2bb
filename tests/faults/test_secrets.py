"""Hub tokens and other secrets never appear in logs, saved configs, reports or error messages."""

from __future__ import annotations

import json
import logging
import os
import secrets as stdlib_secrets
import string
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lorafit.errors import ConfigError, DataError
from lorafit.redact import RedactingFilter, redact, secret_values

from .fuzzkit import FUZZ

SRC = Path(__file__).resolve().parents[2] / "src"
ALNUM = string.ascii_letters + string.digits


def hub_token() -> str:
    return "hf_" + "".join(stdlib_secrets.choice(ALNUM) for _ in range(34))


# -- redact -----------------------------------------------------------------------------------------
def test_redacts_env_secrets_and_token_shapes():
    token, wandb = hub_token(), "0123456789abcdef0123456789abcdef01234567"
    env = {
        "HF_TOKEN": token,
        "WANDB_API_KEY": wandb,
        "AWS_SECRET_ACCESS_KEY": 'a"b\\c<d>e&f12',
        "TOKENIZERS_PARALLELISM": "false-but-long",
        "HF_TOKEN_PATH": "/home/u/.cache/huggingface/token",
        "MY_TOKEN": "1",
    }
    text = (
        f"token {token}; wandb={wandb}; json {json.dumps(env['AWS_SECRET_ACCESS_KEY'])}; "
        f"html a&quot;b\\c&lt;d&gt;e&amp;f12; url https://user:pa55word@example.com/x?access_token=abcdefgh123&y=1; "
        f"Authorization: Bearer abc.def-ghi_jkl; other hf_{'A1' * 20}"
    )
    out = redact(text, env)
    for secret in (
        token,
        wandb,
        "pa55word",
        "abcdefgh123",
        "abc.def-ghi_jkl",
        "hf_" + "A1" * 20,
        "a&quot;b",
        '\\"b\\\\c',
    ):
        assert secret not in out, (secret, out)
    assert "https://user:***@example.com" in out and "Bearer ***" in out and "hf_***" in out
    assert secret_values(env) == sorted([token, wandb, env["AWS_SECRET_ACCESS_KEY"]], key=len, reverse=True)
    ordinary = "self.hf_quantizer, TOKENIZERS_PARALLELISM=false-but-long, /home/u/.cache/huggingface/token, MY_TOKEN=1"
    assert redact(ordinary, env) == ordinary


@FUZZ
@given(before=st.text(max_size=40), after=st.text(max_size=40), body=st.text(ALNUM, min_size=34, max_size=40))
def test_a_hub_token_never_survives(before, after, body):
    token = "hf_" + body
    for env in ({}, {"HF_TOKEN": token}):
        out = redact(f"{before}{token}{after}", env)
        assert token not in out
        assert redact(out, env) == out  # idempotent: redacting twice changes nothing more


def test_errors_are_redacted_where_they_are_made(monkeypatch):
    token = hub_token()
    monkeypatch.setenv("HF_TOKEN", token)
    err = ConfigError(f"`model.token`: unknown field (got '{token}')", f"did you mean HF_TOKEN={token}?")
    assert token not in err.message and token not in err.hint and token not in str(err) and token not in repr(err.args)
    assert token not in DataError(f"data file {token}.jsonl does not exist.").message


def test_model_error_uses_the_same_redaction(monkeypatch):
    from lorafit.models.sources import hub_error as _hub_errors

    token = hub_token()
    monkeypatch.setenv("HF_TOKEN", token)
    err = _hub_errors("someone/model", RuntimeError(f"request with Authorization: Bearer {token} failed"))
    assert token not in err.message


def test_log_records_are_redacted(monkeypatch):
    token = hub_token()
    monkeypatch.setenv("HF_TOKEN", token)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("lorafit.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("loading with token %s", token)
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2 and all(token not in r for r in records) and "ValueError: bad token" in records[1]


# -- end to end: the CLI with HF_TOKEN set, one failing and one succeeding run ----------------------------
def _cli(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from lorafit.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_token_appears_nowhere_end_to_end(tmp_path, tiny_chat_model):
    from helpers import tiny_config

    token = hub_token()
    env = dict(
        os.environ,
        HF_TOKEN=token,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(SRC),
        LORAFIT_DATA_CACHE=str(tmp_path / "cache"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    # Failing: the token pasted where a model name goes, and as a field lorafit does not have.
    bad = tiny_config(tmp_path, tiny_chat_model, name="bad")
    failed = _cli(["data", "check", str(tmp_path / "train.jsonl"), "--model", token], tmp_path, env)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(bad.read_text() + f"\nhub_token: {token}\n")
    refused = _cli(["data", "check", str(unknown)], tmp_path, env)
    # Succeeding: a tiny run whose eval prompt quotes the token (it would be echoed by config.yaml and the reports).
    good = tiny_config(
        tmp_path,
        tiny_chat_model,
        name="good",
        training={"max_steps": 2},
        eval={"prompts": [f"Is {token} my token?"], "max_new_tokens": 4},
    )
    done = _cli(["train", str(good), "--quiet"], tmp_path, env)

    assert failed.returncode == 2 and refused.returncode == 2, (failed.stderr, refused.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "good"
    for name in ("config.yaml", "summary.json", "report.html", "generations.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert "***" in (run / "config.yaml").read_text() and "***" in (run / "report.html").read_text()
    for proc in (failed, refused, done):
        assert token not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "***" in failed.stderr and "***" in refused.stderr
    assert sorted(_files_holding(tmp_path, token)) == sorted([str(unknown), str(good)])  # only the user's own files
