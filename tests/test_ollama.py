"""`lorafit export --format ollama`: the Modelfile's TEMPLATE renders, as Ollama passes conversations to it, the same
token ids as the chat template the model was trained with (rendered here by lorafit's Go-template evaluator)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from lorafit.export import gotemplate
from lorafit.export.ollama import LLAMA31_TEMPLATE, check_template, go_template_for, ollama_values

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_TEMPLATE = ROOT.parent / "shared" / "llama3" / "chat_template.jinja"
CONVERSATIONS = [
    [{"role": "user", "content": "Ünïcödé question 😀 with 12345 digits?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e\n\nf"},
    ],
]


def _ollama_ids(tokenizer, go_source, messages):
    from lorafit.data.special_tokens import encode_rendered

    return encode_rendered(tokenizer, gotemplate.render(go_source, ollama_values(messages)))


def _trained_ids(tokenizer, messages, template):
    from lorafit.data.templates import encode_prompt

    return encode_prompt(tokenizer, messages, template)


def test_chatml_template_keeps_smollm2s_default_system_turn(smollm2_tokenizer):
    go_source = go_template_for(smollm2_tokenizer, "model")
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in go_source
    check_template(go_source, smollm2_tokenizer, "model", None)
    check_template(go_source, smollm2_tokenizer, "model", "You are Quill, a guide to Quillmoor.")
    for messages in CONVERSATIONS:
        assert _ollama_ids(smollm2_tokenizer, go_source, messages) == _trained_ids(smollm2_tokenizer, messages, "model")


def test_llama31_template_matches_builtin_and_official_templates(llama3_tokenizer):
    assert go_template_for(llama3_tokenizer, "llama3") == LLAMA31_TEMPLATE
    check_template(LLAMA31_TEMPLATE, llama3_tokenizer, "llama3", None)
    check_template(LLAMA31_TEMPLATE, llama3_tokenizer, "llama3", "You are Quill.")
    official = copy.deepcopy(llama3_tokenizer)
    official.chat_template = OFFICIAL_TEMPLATE.read_text()
    assert go_template_for(official, "model") == LLAMA31_TEMPLATE  # recognised from what it renders
    check_template(LLAMA31_TEMPLATE, official, "model", "You are Quill.")
    for messages in CONVERSATIONS:
        ids = _ollama_ids(official, LLAMA31_TEMPLATE, messages)
        assert ids == _trained_ids(official, messages, "model") == _trained_ids(official, messages, "llama3")
        assert ids[0] == 128000 and ids.count(128000) == 1  # Ollama adds the BOS the GGUF asks for, once


def test_a_template_that_differs_is_refused(smollm2_tokenizer):
    from lorafit.errors import ModelError

    broken = go_template_for(smollm2_tokenizer, "model").replace(
        "<|im_end|>\n{{ end }}\n{{- if and", "{{ end }}\n{{- if and"
    )
    with pytest.raises(ModelError, match="differs from the chat template at character"):
        check_template(broken, smollm2_tokenizer, "model", None)
    unknown = copy.deepcopy(smollm2_tokenizer)
    unknown.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(ModelError, match="Llama 3.1 and ChatML"):
        go_template_for(unknown, "model")


def _modelfile(folder: Path) -> dict:
    text = (folder / "Modelfile").read_text()
    return {
        "from": re.search(r"^FROM (.+)$", text, re.MULTILINE).group(1),
        "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.MULTILINE | re.DOTALL).group(1),
        "system": (m.group(1) if (m := re.search(r'^SYSTEM """(.*?)"""$', text, re.MULTILINE | re.DOTALL)) else None),
        "stops": re.findall(r'^PARAMETER stop "(.+)"$', text, re.MULTILINE),
    }


def test_export_ollama_writes_gguf_and_modelfile(tmp_path_factory, tiny_chat_model, smollm2_tokenizer):
    from gguf import GGUFReader
    from helpers import run_cli, save_tiny_run

    run = save_tiny_run(
        tmp_path_factory.mktemp("runs") / "quill",
        tiny_chat_model,
        data__system_prompt="You are Quill, a guide to Quillmoor.",
    )
    out = tmp_path_factory.mktemp("ollama") / "quill"
    result = run_cli("export", str(run), "--format", "ollama", "--out", str(out), "--outtype", "q8_0", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ollama create NAME -f" in result.stdout
    modelfile = _modelfile(out)
    gguf_file = out / modelfile["from"].removeprefix("./")
    assert gguf_file.is_file() and gguf_file.suffix == ".gguf" and "q8_0" in gguf_file.name
    assert sorted(p.name for p in out.iterdir()) == sorted(["Modelfile", gguf_file.name])
    assert modelfile["stops"] == ["<|im_end|>", "<|endoftext|>"]  # every end token, end of turn first
    assert modelfile["system"] == "You are Quill, a guide to Quillmoor."
    assert GGUFReader(gguf_file).fields["tokenizer.chat_template"].contents() == smollm2_tokenizer.chat_template
    for messages in CONVERSATIONS[:1] + [[{"role": "user", "content": "Where is Quillmoor?"}]]:
        with_system = [{"role": "system", "content": modelfile["system"]}] + messages  # Ollama adds SYSTEM
        assert _ollama_ids(smollm2_tokenizer, modelfile["template"], with_system) == _trained_ids(
            smollm2_tokenizer, with_system, "model"
        )

    again = run_cli("export", str(run), "--format", "ollama", "--out", str(out), timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwrites
    assert _modelfile(out) == modelfile
