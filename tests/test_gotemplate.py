"""The Go text/template evaluator follows Go's rules for what Ollama templates use (expected outputs are Go's)."""

from __future__ import annotations

import pytest

from lorafit.export.gotemplate import GoTemplateError, render
from lorafit.export.ollama import ollama_values

MESSAGES = [
    {"Role": "system", "Content": "S"},
    {"Role": "user", "Content": "hi"},
    {"Role": "assistant", "Content": "yo"},
    {"Role": "user", "Content": "q"},
]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("a  {{- .X -}}  \n b", "a1b"),  # trim markers eat all adjacent white space, newlines included
        ("a {{.X}} b", "a 1 b"),
        ("a\n{{- /* a comment */ -}}\nb", "ab"),
        ("{{ if .T }}yes{{ else }}no{{ end }}", "yes"),
        ("{{ if .F }}yes{{ else if .X }}x{{ else }}no{{ end }}", "x"),
        ("{{ if .F }}a{{ else if .Empty }}b{{ else if eq .X 1 }}c{{ else }}d{{ end }}", "c"),
        (
            "{{ if .Empty }}a{{ else }}b{{ end }}{{ if .None }}c{{ end }}"
            "{{ if .Zero }}d{{ end }}{{ if .List }}e{{ end }}",
            "be",
        ),
        ("{{ range .List }}[{{ . }}]{{ end }}", "[1][2][3]"),
        ("{{ range $i, $v := .List }}{{ $i }}={{ $v }};{{ end }}", "0=1;1=2;2=3;"),
        ("{{ range .Nothing }}x{{ else }}empty{{ end }}", "empty"),
        ("{{ $x := 5 }}{{ if .T }}{{ $x = 6 }}{{ end }}{{ $x }}", "6"),  # `=` assigns the outer variable
        ('{{ eq .S "b" "c" "x" }} {{ ne .X 2 }} {{ lt 1 2 }} {{ not .T }}', "true true true false"),
        ("{{ and .X .S }} {{ or .Empty .S }} {{ and .Empty .S }}", "x x "),  # and/or return an operand, as in Go
        ("{{ len .List }} {{ len .S }} {{ slice .List 1 }} {{ index .List 2 }}", "3 1 [2 3] 3"),
        ('{{ print "a" 1 }} {{ .S | len }} {{ json .Map }}', 'a1 1 {"k":"v"}'),
        ("{{ .Missing }}", "<no value>"),  # missingkey=zero on a map, as Ollama parses templates
        ("{{ with .S }}<{{ . }}>{{ else }}none{{ end }}{{ with .Empty }}x{{ else }}none{{ end }}", "<x>none"),
        ("{{ range $i, $_ := .List }}{{ if eq (len (slice $.List $i)) 1 }}last={{ . }}{{ end }}{{ end }}", "last=3"),
        ("{{ `raw {{ text }}` }}", "raw {{ text }}"),
    ],
)
def test_go_semantics(source, expected):
    data = {
        "X": 1,
        "T": True,
        "F": False,
        "Empty": "",
        "Zero": 0,
        "None": None,
        "List": [1, 2, 3],
        "Nothing": [],
        "S": "x",
        "Map": {"k": "v"},
    }
    assert render(source, data) == expected


def test_variables_end_with_their_block():
    with pytest.raises(GoTemplateError, match="undefined variable"):
        render("{{ if .T }}{{ $y := 1 }}{{ end }}{{ $y }}", {"T": True})
    with pytest.raises(GoTemplateError, match="undefined variable"):
        render("{{ range .L }}{{ $v := . }}{{ end }}{{ $v }}", {"L": [1]})


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ if .T }}open", "never closed"),
        ("{{ end }}", "without a block"),
        ("{{ nosuch .X }}", "not defined"),
        ("{{ .X", "unclosed action"),
        ("{{ .T .X }}", "non-function"),
    ],
)
def test_errors_are_loud(source, message):
    with pytest.raises(GoTemplateError, match=message):
        render(source, {"T": True, "X": 1})


def test_content_is_data_never_template():
    assert render("{{ .C }}", {"C": "{{ .Secret }}"}) == "{{ .Secret }}"


def test_ollama_values_collate_like_ollama():
    """Every system message joined as .System (and kept in .Messages); consecutive same-role messages merged."""
    values = ollama_values(
        [
            {"role": "system", "content": "A"},
            {"role": "system", "content": "B"},
            {"role": "user", "content": "1"},
            {"role": "user", "content": "2"},
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
        ]
    )
    assert values["System"] == "A\n\nB"
    assert [(m["Role"], m["Content"]) for m in values["Messages"]] == [
        ("system", "A\n\nB"),
        ("user", "1\n\n2"),
        ("tool", "r1"),
        ("tool", "r2"),
    ]
    chatml = (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ if $last }}<|im_start|>assistant\n{{ end }}"
        "{{- end }}"
    )
    text = render(chatml, ollama_values([{"role": m["Role"], "content": m["Content"]} for m in MESSAGES]))
    assert text.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n") and text.count("<|im_start|>") == 5
