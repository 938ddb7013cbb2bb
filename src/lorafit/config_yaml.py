"""YAML for run configs, hardened: safe_load plus limits on size, aliases, nesting and expanded values, so a
hostile or broken file is a clear ConfigError, never a hang or a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import ConfigError

MAX_CONFIG_BYTES = 1_000_000  # a run config is a few KB; anything this big is a mistake or an attack


MAX_YAML_ALIASES = 100  # refuses "billion laughs" alias bombs before they expand


MAX_YAML_DEPTH = 50  # a run config nests 3-4 levels


MAX_YAML_NODES = 100_000  # values after aliases are expanded: 72 aliases can still stand for 9**9 values


class _CountingLoader(yaml.SafeLoader):
    """safe_load, refusing documents with many aliases (the expansion of an alias bomb is exponential)."""

    aliases_seen = 0
    depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - yaml hook
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise ConfigError(f"the YAML uses more than {MAX_YAML_ALIASES} aliases; refused (possible alias bomb).")
        self.depth += 1  # stop "[[[[..." early: PyYAML's scanner slows down the deeper a one-line flow goes
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise ConfigError(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep; refused.")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node) > MAX_YAML_NODES:
            raise ConfigError(
                f"the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases; refused (alias bomb)."
            )
        return node


def _expanded_size(root) -> int:
    """Values the document holds once every alias is copied out, counted on the shared node graph (linear time)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 1  # a recursive alias counts once instead of looping
            children = (
                [n for pair in node.value for n in pair]
                if isinstance(node, yaml.MappingNode)
                else node.value
                if isinstance(node, yaml.SequenceNode)
                else []
            )
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    return size(root)


def parse_yaml(text: str, source: str) -> Any:
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: the config is larger than {MAX_CONFIG_BYTES:,} bytes; refused.")
    try:
        return yaml.load(text, Loader=_CountingLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:  # from the loader, which does not know the file name
        raise ConfigError(f"{source}: {e.message}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply; refused.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            f"{where}: invalid YAML: {problem}.", "Fix the syntax at that line (indentation, a missing colon or quote)."
        ) from None
    except (
        Exception
    ) as e:  # PyYAML's constructors also raise these: `!!int ''` (IndexError), 5000-digit ints (ValueError)
        raise ConfigError(f"{source}: invalid YAML value ({type(e).__name__}: {str(e).split(':')[0][:120]}).") from None


def resolve_paths(raw: dict, base: Path) -> None:
    """Local paths in a config are relative to the config file, unless they exist relative to the cwd. Both are
    made absolute, so the saved config.yaml and the reports name exactly the files a run used."""
    model = raw.get("model")
    if isinstance(model, dict):
        from lorafit.models.sources import EMBEDDED

        for key in ("name", "tokenizer", "adapter"):
            if isinstance(model.get(key), str) and model[key] not in EMBEDDED:
                model[key] = _absolute(model[key], base)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation"):
        sources = data.get(key)
        if isinstance(sources, (str, dict)):
            sources = [sources]
        if not isinstance(sources, list):
            continue
        fixed = []
        for s in sources:
            path = s if isinstance(s, str) else s.get("path") if isinstance(s, dict) else None
            if isinstance(path, str):
                path = _absolute(path, base)
                s = path if isinstance(s, str) else {**s, "path": path}
            fixed.append(s)
        data[key] = fixed


def _absolute(path: str, base: Path) -> str:
    """An existing local path, absolute (cwd first, then the config's folder); anything else (Hub id, glob) unchanged."""
    p = Path(path)  # `~` is left to the reader, which expands it
    if p.is_absolute() or not path.strip():
        return path
    for candidate in (p, base / p):
        if candidate.exists():
            return str(candidate.resolve())
    return path
