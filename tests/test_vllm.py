"""`lorafit export --format vllm`: the adapter folder, chat template, generation config and the exact `vllm serve`
command; adapters vLLM cannot load as a LoRA are refused with the merged model offered instead."""

from __future__ import annotations

import json
import shlex

import pytest

from lorafit.export.vllm import (
    TOOL_CALL_PARSERS,
    max_lora_rank,
    serve_command,
    vllm_problems,
)


def test_export_vllm_writes_what_vllm_serve_needs(tiny_run_dir, tiny_chat_model, tmp_path, smollm2_tokenizer):
    from helpers import run_cli
    from transformers import GenerationConfig

    out = tmp_path / "serve"
    result = run_cli("export", str(tiny_run_dir), "--format", "vllm", "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = ["adapter", "chat_template.jinja", "generation_config.json", "serve.sh"]
    assert sorted(p.name for p in out.iterdir()) == files
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the adapter exactly as PEFT saved it
        assert (out / "adapter" / name).read_bytes() == (tiny_run_dir / "adapter" / name).read_bytes()
    assert (out / "chat_template.jinja").read_text() == smollm2_tokenizer.chat_template
    im_end, endoftext = (smollm2_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert sorted(GenerationConfig.from_pretrained(out).eos_token_id) == sorted({im_end, endoftext})
    command = shlex.split((out / "serve.sh").read_text().splitlines()[-1])
    assert command == shlex.split(result.stdout.strip().splitlines()[-1])  # printed = saved
    assert command[:3] == ["vllm", "serve", str(tiny_chat_model.resolve())]  # the base the adapter was trained on
    assert "--enable-lora" in command and command[command.index("--max-lora-rank") + 1] == "8"  # r=4 -> vLLM's 8
    assert command[command.index("--lora-modules") + 1] == f"tiny={out / 'adapter'}"
    assert command[command.index("--chat-template") + 1] == str(out / "chat_template.jinja")
    assert command[command.index("--generation-config") + 1] == str(out)
    assert "--tool-call-parser" not in command


@pytest.mark.parametrize(
    "setting, reason",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "lm_head"),
        ({"modules_to_save": ["embed_tokens"]}, "embed_tokens"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"bias": "lora_only"}, "biases"),
    ],
)
def test_adapters_vllm_cannot_load_are_refused_naming_why(tiny_run_dir, tmp_path, setting, reason):
    import shutil

    from helpers import run_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, **setting}))
    result = run_cli("export", str(run), "--format", "vllm", "--out", str(tmp_path / "serve"))
    assert result.returncode == 2
    assert "vLLM cannot serve this run as a LoRA" in result.stderr and reason in result.stderr
    assert f"lorafit merge {run} --out merged/" in result.stderr and "vllm serve merged/" in result.stderr
    assert not (tmp_path / "serve").exists()  # nothing written


def test_plain_adapters_pass_and_ranks_round_up_to_what_vllm_accepts():
    plain = {"r": 16, "lora_alpha": 32, "use_rslora": True, "init_lora_weights": "gaussian", "modules_to_save": None}
    assert vllm_problems(plain) == []
    assert [max_lora_rank({"r": r}) for r in (1, 4, 8, 9, 33, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    assert max_lora_rank({"r": 8, "rank_pattern": {"q_proj": 40}}) == 64


def test_tool_runs_get_the_tool_call_parser(tmp_path):
    from lorafit.export.vllm import run_uses_tools

    assert not run_uses_tools(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"data": {"tool_rows": 12}}))
    assert run_uses_tools(tmp_path)
    command = serve_command("meta-llama/Llama-3.1-8B-Instruct", 16, "x", tmp_path, TOOL_CALL_PARSERS["llama3"])
    assert command[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
