"""`lorafit verify`: transformers (base + adapter), the merged model and the GGUF in llama.cpp on the same prompts;
exit 0 when they agree within tolerance, 1 when the served file answers differently."""

from __future__ import annotations

import re

import pytest
import servekit
from helpers import run_cli, write_jsonl


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return servekit.served(tmp_path_factory)


def test_verify_passes_for_the_runs_own_export(served):
    result = run_cli(
        "verify",
        str(served.run),
        "--prompts",
        str(servekit.HELDOUT),
        "--max-new-tokens",
        str(servekit.MAX_NEW_TOKENS),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rows = [re.split(r"\s{2,}", line) for line in lines if line.startswith(("transformers", "llama.cpp"))]
    table = {row[0]: row[1:] for row in rows}  # identical, stopped by end token, prompt ids equal, tokens/s, first diff
    assert table["transformers, base + adapter"][:2] == ["reference", "10/10"]
    assert table["transformers, merged"][:3] == ["10/10", "10/10", "-"]
    assert table["llama.cpp, f16 GGUF (f16)"][:3] == ["10/10", "10/10", "10/10"]
    assert lines[-1].startswith("verify: ok")


def test_verify_fails_when_the_gguf_is_not_what_was_trained(served, smollm2_dir, tmp_path):
    """The base model's GGUF in place of the run's: different answers, exit code 1, the difference shown."""
    from lorafit.export.gguf import export_gguf

    wrong = export_gguf(smollm2_dir, tmp_path / "base-q8_0.gguf", "q8_0")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in served.prompts[:3]])
    result = run_cli(
        "verify",
        str(served.run),
        "--gguf",
        str(wrong),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "24",
        timeout=900,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED llama.cpp, base-q8_0.gguf (q8_0)" in result.stdout
    assert "prompt 1, token" in result.stdout or "prompt 2, token" in result.stdout  # where the answers part


def test_verify_input_errors_exit_2(served, tmp_path):
    missing = run_cli(
        "verify", str(served.run), "--gguf", str(tmp_path / "none.gguf"), "--prompts", str(servekit.HELDOUT)
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = run_cli("verify", str(served.run), "--min-identical", "1.5")
    assert bad.returncode == 2 and "`--min-identical`" in bad.stderr
    no_prompts = run_cli("verify", str(served.run))  # the run has no eval.prompts
    assert no_prompts.returncode == 2 and "--prompts FILE" in no_prompts.stderr
