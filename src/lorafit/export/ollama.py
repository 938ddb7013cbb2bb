"""`lorafit export --format ollama`: the GGUF plus a Modelfile that renders prompts exactly as training did.

A Modelfile with only `FROM x.gguf` gives Ollama no chat template and no stop tokens: the tuned model then
answers raw text and never stops. lorafit writes the TEMPLATE in Go template syntax, structured as Ollama's own
library models write it (`.Messages`, `$last`), for the two chat formats it knows — Llama 3.1 and ChatML — and
checks it before writing: sample conversations rendered by the TEMPLATE (with lorafit.export.gotemplate, the way
Ollama passes them) must give the same token ids as the Jinja chat template the model was trained with.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lorafit.data.special_tokens import encode_rendered
from lorafit.data.templates import DATE_STRING, end_of_turn_ids, render, render_prompt, with_system
from lorafit.errors import ModelError
from lorafit.export import gotemplate
from lorafit.export.gguf import check_gguf_target, export_gguf, load_export_source
from lorafit.export.merge import check_empty_target
from lorafit.paths import user_path

log = logging.getLogger("lorafit")

PROBE = "lorafit-probe"
# Conversations the TEMPLATE must render exactly as the chat template does (Ollama asks for the next assistant turn).
SAMPLES = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "Name a colour.\nJust one."},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": 'Thanks {{ .System }} "quoted"'},
    ],
]

# The pieces both templates share: the turn loop leaves the last assistant turn open (Ollama continues it) and
# opens an assistant turn after any other last message, as Ollama's library templates do.
CHATML_TURNS = """
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA31_TEMPLATE = (
    """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: """
    + DATE_STRING
    + """

{{ .System }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""
)


def chatml_template(default_system: str | None) -> str:
    """ChatML; a template that writes a default system turn when there is none (SmolLM2's) keeps doing so."""
    if default_system is None:
        return CHATML_TURNS.lstrip("\n")
    if "{{" in default_system or "}}" in default_system:
        raise ModelError(
            "the chat template's default system prompt contains `{{` or `}}`, which a Go template "
            "would read as an action.",
            "Set `data.system_prompt` in the run config instead.",
        )
    return "{{- if not .System }}<|im_start|>system\n" + default_system + "<|im_end|>\n{{ end }}" + CHATML_TURNS


def go_template_for(tokenizer, template: str) -> str:
    """The Ollama TEMPLATE for this chat format (checked by `check_template` before it is written)."""
    if template == "llama3":
        return LLAMA31_TEMPLATE
    prompt = render_prompt(tokenizer, [{"role": "user", "content": PROBE}], template)
    if "<|start_header_id|>user<|end_header_id|>\n\n" + PROBE in prompt:
        return LLAMA31_TEMPLATE
    if "<|im_start|>user\n" + PROBE in prompt:
        default = None
        if prompt.startswith("<|im_start|>system\n"):  # (SmolLM2's BOS is <|im_start|> itself: nothing to strip)
            default = prompt[len("<|im_start|>system\n") : prompt.index("<|im_end|>")]
        return chatml_template(default)
    raise ModelError(
        "lorafit writes Ollama templates for the Llama 3.1 and ChatML chat formats; this model's chat "
        f"template is neither (it renders a user turn as {prompt[:120]!r}).",
        "Export with `--format gguf` (llama.cpp reads the chat template inside the file) and write the "
        "Modelfile's TEMPLATE by hand.",
    )


def check_template(go_source: str, tokenizer, template: str, system_prompt: str | None) -> None:
    """Each sample, as Ollama would render it, must tokenize exactly as the training chat template renders it."""
    for sample in SAMPLES:
        messages = with_system(sample, system_prompt)  # Ollama adds the Modelfile's SYSTEM the same way
        want = render(tokenizer, messages, template, add_generation_prompt=True)
        got = gotemplate.render(go_source, ollama_values(messages))
        if encode_rendered(tokenizer, got) != encode_rendered(tokenizer, want):  # Ollama adds BOS as the GGUF says
            bos = tokenizer.bos_token or ""
            want_text = want[len(bos) :] if bos and want.startswith(bos) and not got.startswith(bos) else want
            at = next((i for i, (a, b) in enumerate(zip(got, want_text)) if a != b), min(len(got), len(want_text)))
            raise ModelError(
                f"the Ollama TEMPLATE lorafit built differs from the chat template at character {at}: "
                f"{got[at : at + 60]!r} instead of {want_text[at : at + 60]!r}.",
                "Please report this; meanwhile export with `--format gguf`.",
            )


def modelfile_text(gguf_name: str, go_source: str, stops: list[str], system_prompt: str | None, origin: str) -> str:
    for label, text in (("TEMPLATE", go_source), ("SYSTEM", system_prompt or "")):
        if '"""' in text:
            raise ModelError(
                f'the Modelfile {label} would contain `"""`, which ends a Modelfile string early.',
                "Remove the triple quote from `data.system_prompt`.",
            )
    lines = [
        f"# Written by lorafit from {origin}: chat template and stop tokens as in training.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_source}"""',
    ]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_ollama(source: str | Path, out_dir: str | Path, outtype: str = "f16") -> Path:
    """OUT_DIR/<name>-<outtype>.gguf and OUT_DIR/Modelfile; the folder appears complete or not at all."""
    out = user_path(out_dir)
    check_empty_target(out)
    check_gguf_target(out / "x.gguf", outtype)
    loaded = load_export_source(source)
    go_source = go_template_for(loaded.tokenizer, loaded.template)
    check_template(go_source, loaded.tokenizer, loaded.template, loaded.system_prompt)
    stops = [loaded.tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(loaded.tokenizer, loaded.template)]
    gguf_name = f"{loaded.name}-{outtype}.gguf"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        export_gguf(source, tmp / gguf_name, outtype, loaded=loaded)
        (tmp / "Modelfile").write_text(
            modelfile_text(gguf_name, go_source, stops, loaded.system_prompt, str(user_path(source))), encoding="utf-8"
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ollama_values(messages: list[dict], tools: list | None = None) -> dict:
    """What Ollama passes a `.Messages` template: every system message joined as `.System`, consecutive
    messages of one role (tool results excepted) merged with a blank line, fields named as in api.Message."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append(
                {
                    "Role": m["role"],
                    "Content": m["content"],
                    "ToolCalls": m.get("tool_calls") or [],
                    "ToolName": m.get("name", ""),
                    "Thinking": "",
                    "Images": [],
                }
            )
    return {
        "System": "\n\n".join(system),
        "Messages": collated,
        "Tools": tools or [],
        "Response": "",
        "Think": False,
        "IsThinkSet": False,
    }
