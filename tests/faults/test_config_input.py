"""Config files are input too: only safe YAML, no code execution, and bombs, huge or deep files refused
quickly with a ConfigError naming the file — never a hang, a blow-up or a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.config import RunConfig, load_config
from lorafit.config_yaml import MAX_CONFIG_BYTES, MAX_YAML_ALIASES
from lorafit.errors import ConfigError

from .fuzzkit import FUZZ, time_limit

SRC = Path(__file__).resolve().parents[2] / "src"


def billion_laughs(levels: int = 9) -> str:
    """9 levels of 9 aliases: 72 aliases (under the alias cap) that stand for 9**9 values once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines + [f"eval: {{prompts: *a{levels - 1}}}"]) + "\n"


def refused(path: Path, match: str) -> ConfigError:
    """load_config ends in a ConfigError naming the file, within seconds and 64 MiB of Python heap."""
    started = time.perf_counter()
    with time_limit(10), pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert time.perf_counter() - started < 5
    assert str(path) in info.value.message
    tracemalloc.start()  # a second run, measured (tracemalloc slows PyYAML down ~5x)
    try:
        with pytest.raises(ConfigError):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    return info.value


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    assert billion_laughs().count("*") < MAX_YAML_ALIASES  # the alias cap alone would let this one through
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    refused(path, "alias bomb")


def test_too_many_aliases_refused_and_a_few_are_fine(tmp_path):
    many = tmp_path / "many.yaml"
    many.write_text("x: &x 1\nl: [" + ", ".join(["*x"] * (MAX_YAML_ALIASES + 1)) + "]\n")
    refused(many, "aliases")
    few = tmp_path / "few.yaml"
    few.write_text("lora: {r: &rank 8, alpha: *rank}\neval: {prompts: &p [Hi, Bye]}\n")
    cfg = load_config(few)
    assert cfg.lora.r == 8 and cfg.lora.alpha == 8 and cfg.eval.prompts == ["Hi", "Bye"]


def test_recursive_alias_is_a_config_error(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("eval: {prompts: &a [*a]}\n")
    refused(path, "eval.prompts")


def test_huge_file_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as fh:  # sparse: 4 GiB on paper, nothing on disk
        fh.truncate(4 * 2**30)
    refused(path, "larger than")
    just_over = tmp_path / "over.yaml"
    just_over.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    refused(just_over, "larger than")


@pytest.mark.parametrize(
    "text,match",
    [
        ("[" * 100_000, "nested more than"),
        ("{a: " * 50_000, "nested more than"),
        ("a:\n" + "".join(" " * i + "a:\n" for i in range(1, 300)), "nested more than"),
        ("lora: {r: " + "9" * 5000 + "}\n", "4300 digits"),
        ("model:\n\tname: x\n", r"2:1: invalid YAML"),
    ],
)
def test_deep_long_and_broken_yaml(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    refused(path, match)


PYTHON_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.check_call [[touch, '{marker}']]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:pathlib.Path {{}}",
    "!!python/tuple [1, 2]",
    "!custom {marker}",
]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_are_refused_not_executed(tmp_path, tag):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  name: {tag.format(marker=marker)}\n")
    err = refused(path, "could not determine a constructor")
    assert re.search(rf"{re.escape(str(path))}:2:\d+: invalid YAML", err.message)
    with pytest.raises(ConfigError, match="could not determine a constructor"):  # a CLI override is parsed the same way
        load_config(None, [f"model.name={tag.format(marker=marker)}"])
    assert not marker.exists()


def test_only_safe_yaml_loading_in_the_code_base():
    """Every YAML read in lorafit goes through a SafeLoader (subclass); no full/unsafe loader anywhere."""
    unsafe = re.compile(
        r"yaml\.(unsafe_load|full_load|load_all|Loader\b|FullLoader|UnsafeLoader|CLoader)|Loader=yaml\.Loader"
    )
    loads = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not unsafe.search(text), f"{path}: {unsafe.search(text).group(0)}"
        loads += [(path, m) for m in re.findall(r"yaml\.load\((.*?)\)", text)]
    import yaml

    from lorafit import config_yaml

    assert issubclass(config_yaml._CountingLoader, yaml.SafeLoader)
    for path, args in loads:
        assert "Loader=_CountingLoader" in args or "SafeLoader" in args, f"{path}: yaml.load({args})"


yaml_fragments = st.sampled_from(
    [
        "model:",
        "data:",
        "lora:",
        "  r: ",
        "  name: ",
        "train: ",
        "&a ",
        "*a",
        "<<: ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ": ",
        "? ",
        "!!str ",
        "!!int ",
        "!!binary ",
        "!!python/none ",
        "%YAML 1.1\n",
        "---\n",
        "...\n",
        "\t",
        "\n",
        "  ",
        "'",
        '"',
        "\\",
        "#",
        "|\n",
        ">-\n",
        "1e999",
        "-.inf",
        ".nan",
        "~",
        "\x00",
        "\ufeff",
        "\udc80",
        "\u2028",
        "99999999999999999999999",
    ]
)


@settings(FUZZ, max_examples=150)
@given(parts=st.lists(yaml_fragments | st.text(max_size=6), max_size=30))
def test_any_text_is_a_config_or_a_config_error(tmp_path, parts):
    path = tmp_path / "fuzz.yaml"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogateescape")
    with time_limit():
        try:
            assert isinstance(load_config(path), RunConfig)
        except ConfigError as err:
            assert str(path) in err.message


@pytest.mark.parametrize(
    "content", [billion_laughs(), "model: {name: !!python/object/apply:os.system ['touch PWNED']}\n"]
)
def test_cli_refuses_bad_configs_with_exit_2(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC))
    # `data check CONFIG` reads the config with the same load_config as `train`, without importing torch first.
    done = subprocess.run(
        [sys.executable, "-c", "from lorafit.cli import main; main()", "data", "check", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"error: {path}" in done.stderr, done.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()
