"""A small evaluator for Go's text/template, enough for Ollama chat templates (and to test the ones lorafit writes).

Ollama cannot run here, so the TEMPLATE lorafit writes into a Modelfile is rendered with this evaluator and
compared, token for token, with the Jinja chat template the model was trained with. It follows Go's rules for
what these templates use: `{{- ` / ` -}}` trim all adjacent white space; `if` / `else if` / `else` / `range`
(with `$i, $x :=`) / `with` / `end`; variables scoped to their block; `$` is the root value; fields (`.Role`,
`$.Messages`); parenthesised calls; the built-ins and, or, not, eq (several arguments), ne, lt, le, gt, ge, len,
slice, index, print and Ollama's `json`; Go's truthiness (false, 0, "", empty list / map and nil are false).
Anything else is a GoTemplateError, never a silent wrong rendering.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SPACE = " \t\r\n"
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<decl>:=)|(?P<assign>=)'
    r"|(?P<punct>[()|,])|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))"
)


class GoTemplateError(ValueError):
    pass


@dataclass
class Node:
    kind: str  # text | action | if | range | with
    text: str = ""
    pipe: list = field(default_factory=list)  # tokens of the action (for if: of the condition)
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


# -- parsing -------------------------------------------------------------------------------------------------------


def _action_end(source: str, pos: int) -> int:
    """Offset of the `}}` closing the action opened before POS (a `}}` inside a quoted string does not count)."""
    quote = None
    while pos < len(source):
        ch = source[pos]
        if quote:
            if ch == "\\" and quote == '"':
                pos += 1
            elif ch == quote:
                quote = None
        elif ch in '"`':
            quote = ch
        elif source.startswith("}}", pos):
            return pos
        pos += 1
    raise GoTemplateError("unclosed action: `{{` without `}}`")


def _actions(source: str):
    """('text', str) and ('action', str) pieces, with Go's trim markers already applied to the text."""
    pieces, pos = [], 0
    while True:
        start = source.find("{{", pos)
        if start < 0:
            pieces.append(["text", source[pos:]])
            return pieces
        end = _action_end(source, start + 2)
        text, body = source[pos:start], source[start + 2 : end]
        if body.startswith("-") and body[1:2] in tuple(SPACE):
            text, body = text.rstrip(SPACE), body[1:]
        trim_after = body.endswith("-") and body[-2:-1] in tuple(SPACE)
        if trim_after:
            body = body[:-1]
        pieces.append(["text", text])
        pieces.append(["action", body.strip()])
        pos = end + 2
        if trim_after:
            while pos < len(source) and source[pos] in SPACE:
                pos += 1


def _tokens(action: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(action):
        if action[pos:].strip() == "":
            break
        m = _TOKEN.match(action, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot read {action[pos:]!r} in {{{{ {action} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse(source: str) -> list[Node]:
    nodes: list[Node] = []
    stack: list[tuple[Node, list]] = []  # open block, the list being filled (body or orelse)
    current = nodes
    for kind, piece in _actions(source):
        if kind == "text":
            if piece:
                current.append(Node("text", text=piece))
            continue
        if piece.startswith("/*"):
            continue  # comment
        toks = _tokens(piece)
        word = toks[0][1] if toks and toks[0][0] == "ident" else ""
        if word in ("if", "range", "with"):
            block = Node(word, pipe=toks[1:])
            current.append(block)
            stack.append((block, current))
            current = block.body
        elif word == "else":
            if not stack:
                raise GoTemplateError("{{ else }} outside a block")
            block, parent = stack[-1]
            if len(toks) > 1 and toks[1][1] in ("if", "with"):  # else if: a nested block closed by the same end
                nested = Node(toks[1][1], pipe=toks[2:])
                block.orelse.append(nested)
                stack[-1] = (block, parent)
                stack.append((nested, None))  # None: closed together with its parent
                current = nested.body
            else:
                current = block.orelse
        elif word == "end":
            if not stack:
                raise GoTemplateError("{{ end }} without a block")
            while True:
                _, parent = stack.pop()
                if parent is not None:
                    current = parent
                    break
        else:
            current.append(Node("action", pipe=toks))
    if stack:
        raise GoTemplateError(f"{{{{ {stack[-1][0].kind} }}}} is never closed with {{{{ end }}}}")
    return nodes


# -- evaluation ----------------------------------------------------------------------------------------------------


def truth(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float, str, list, tuple, dict)):
        return bool(value) if not isinstance(value, bool) else value
    return True


def show(value) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{show(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _eq(first, *others):
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    return any(first == other for other in others)


def _slice(value, *bounds):
    ints = [int(b) for b in bounds]
    if len(ints) == 0:
        return value
    if any(b < 0 or b > len(value) for b in ints):
        raise GoTemplateError(f"slice index out of range: {ints} of {len(value)}")
    return value[ints[0] : ints[1]] if len(ints) > 1 else value[ints[0] :]


def _and(*args):
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if truth(a):
            return a
    return args[-1]


FUNCS = {
    "and": _and,
    "or": _or,
    "not": lambda a: not truth(a),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": len,
    "slice": _slice,
    "index": lambda v, *keys: _index(v, keys),
    "print": lambda *a: "".join(map(show, a)),
    "json": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
}


def _index(value, keys):
    for key in keys:
        value = value[key] if not isinstance(value, dict) else value.get(key)
    return value


def _field(value, names: list[str]):
    for name in names:
        if isinstance(value, dict):
            value = value.get(name)  # missingkey=zero, as Ollama parses its templates
        elif value is None:
            raise GoTemplateError(f"nil pointer evaluating .{name}")
        else:
            value = getattr(value, name)
    return value


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name: str):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name: str, value, declare: bool):
        if declare:
            self.frames[-1][name] = value
            return
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _operand(toks: list, i: int, dot, scope: _Scope):
    """(value, next index) of one operand: literal, field, variable or parenthesised pipeline."""
    kind, text = toks[i]
    if kind == "str":
        return json.loads(text), i + 1
    if kind == "raw":
        return text[1:-1], i + 1
    if kind == "num":
        return int(text), i + 1
    if kind == "field":
        return (dot if text == "." else _field(dot, text[1:].split("."))), i + 1
    if kind == "var":
        name, *names = text.split(".")
        return _field(scope.get(name), names), i + 1
    if kind == "ident" and text in ("true", "false", "nil"):
        return {"true": True, "false": False, "nil": None}[text], i + 1
    if text == "(":
        depth, j = 1, i + 1
        while depth:
            if j >= len(toks):
                raise GoTemplateError("unclosed parenthesis")
            depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "punct" else 0
            j += 1
        return _pipeline(toks[i + 1 : j - 1], dot, scope), j
    raise GoTemplateError(f"unexpected {text!r}")


def _command(toks: list, dot, scope: _Scope, piped=None, has_piped=False):
    if toks and toks[0][0] == "ident" and toks[0][1] not in ("true", "false", "nil"):
        name = toks[0][1]
        if name not in FUNCS:
            raise GoTemplateError(f"function {name!r} not defined")
        args, i = [], 1
        while i < len(toks):
            value, i = _operand(toks, i, dot, scope)
            args.append(value)
        return FUNCS[name](*args, *([piped] if has_piped else []))
    value, i = _operand(toks, 0, dot, scope)
    if i != len(toks) or has_piped:
        raise GoTemplateError(f"cannot call a non-function in {' '.join(t for _, t in toks)!r}")
    return value


def _split(toks: list, sep: str) -> list[list]:
    parts, depth, current = [], 0, []
    for tok in toks:
        if tok[0] == "punct" and tok[1] in "()":
            depth += 1 if tok[1] == "(" else -1
        if depth == 0 and tok == ("punct", sep):
            parts.append(current)
            current = []
        else:
            current.append(tok)
    return parts + [current]


def _pipeline(toks: list, dot, scope: _Scope):
    value, has = None, False
    for cmd in _split(toks, "|"):
        value, has = _command(cmd, dot, scope, value, has), True
    return value


def _declared(toks: list):
    """([variable names], declare?, rest) for `$x := ...`, `$i, $v := ...` and `$x = ...`."""
    for i, (kind, _) in enumerate(toks):
        if kind in ("decl", "assign"):
            names = [t for k, t in toks[:i] if k == "var"]
            return names, kind == "decl", toks[i + 1 :]
    return [], False, toks


def _run(nodes: list[Node], dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "action":
            names, declare, rest = _declared(node.pipe)
            value = _pipeline(rest, dot, scope)
            if names:
                scope.set(names[0], value, declare)
            else:
                out.append(show(value))
        elif node.kind == "range":
            _range(node, dot, scope, out)
        else:  # if / with
            names, declare, rest = _declared(node.pipe)
            value = _pipeline(rest, dot, scope)
            scope.frames.append({})
            if names:
                scope.set(names[0], value, declare)
            if truth(value):
                _run(node.body, value if node.kind == "with" else dot, scope, out)
            else:
                _run(node.orelse, dot, scope, out)
            scope.frames.pop()


def _range(node: Node, dot, scope: _Scope, out: list[str]) -> None:
    names, _, rest = _declared(node.pipe)
    items = _pipeline(rest, dot, scope)
    pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
    if not pairs:
        _run(node.orelse, dot, scope, out)
        return
    for key, item in pairs:
        scope.frames.append({})
        if len(names) == 1:
            scope.set(names[0], item, True)
        elif len(names) == 2:
            scope.set(names[0], key, True)
            scope.set(names[1], item, True)
        _run(node.body, item, scope, out)
        scope.frames.pop()


def render(source: str, data) -> str:
    """The text Go's template.Execute writes for `data` (dicts stand for Go structs and maps)."""
    out: list[str] = []
    _run(parse(source), data, _Scope(data), out)
    return "".join(out)
