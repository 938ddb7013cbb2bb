"""Paths: relative paths in a config are resolved (against the config's folder or the cwd) and recorded absolute;
a run writes only inside its own run directory (`output.dir/output.name`), whose name cannot climb out of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lorafit.config import dump_config, load_config
from lorafit.errors import ConfigError


@pytest.mark.parametrize(
    "name", ["..", "../elsewhere", "a/../../b", "/tmp/abs", "nested/run", "..\\up", ".", " ", "a\x00b"]
)
def test_run_name_cannot_leave_the_output_dir(tmp_path, name):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output": {"dir": str(tmp_path / "runs"), "name": name}}))
    with pytest.raises(ConfigError, match=r"`output.name`: .*plain folder name"):
        load_config(path)
    with pytest.raises(ConfigError):  # the same through a CLI override (YAML itself refuses the NUL)
        load_config(None, [f"output.name={name}"] if name.strip() else ["output.name=' '"])


@pytest.mark.parametrize("name", ["run-1", "my.run", "run..2", "Ünïcode run", "~tilde"])
def test_plain_names_are_fine(name):
    assert load_config(None, [f"output.name={name}"]).output.name == name


def test_config_file_name_is_the_default_run_name(tmp_path):
    path = tmp_path / "my-experiment.yaml"
    path.write_text("lora: {r: 4}\n")
    assert load_config(path).output.name == "my-experiment"
    odd = tmp_path / "..yaml"  # its stem is "." : refused as a name, as an error rather than a traceback
    odd.write_text("lora: {r: 4}\n")
    with pytest.raises(ConfigError, match="output.name"):
        load_config(odd)


def test_relative_paths_resolve_against_the_config_and_are_saved_absolute(tmp_path, monkeypatch, tiny_chat_model):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    (project / "data" / "val.jsonl").write_text('{"text": "bye"}\n')
    os.symlink(tiny_chat_model, project / "tiny-model")
    config = project / "configs" / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "../tiny-model"},
                "data": {
                    "train": ["../data/train.jsonl", {"path": "../data/*.jsonl", "weight": 2.0}],
                    "validation": "../data/val.jsonl",
                },
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert cfg.model.name == str((project / "tiny-model").resolve())
    assert cfg.data.train[0].path == str((project / "data" / "train.jsonl").resolve())
    assert cfg.data.validation[0].path == str((project / "data" / "val.jsonl").resolve())
    assert cfg.data.train[1].path == "../data/*.jsonl"  # a glob is expanded later, relative to the cwd, and named then
    saved = dump_config(cfg)
    assert str((project / "data" / "train.jsonl").resolve()) in saved and "../tiny-model" not in saved
    # Names that are not local paths stay as they are: the embedded model and Hub ids.
    hub = project / "configs" / "hub.yaml"
    hub.write_text("model: {name: meta-llama/Llama-3.1-8B-Instruct}\n")
    assert load_config(hub).model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert load_config(None).model.name == "smollm2-135m-instruct"


def test_a_run_writes_only_inside_its_run_directory(tmp_path, monkeypatch, tiny_chat_model):
    """Every file a training run creates is under output.dir/output.name (or the data cache we point elsewhere)."""
    from helpers import tiny_config

    from lorafit.train.run import run_training

    config = tiny_config(tmp_path / "in", tiny_chat_model, name="contained", n_train=6, training={"max_steps": 1})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(tmp_path / "cache"))
    before = {p for p in tmp_path.rglob("*")}
    run_dir = run_training(load_config(config), quiet=True)
    assert run_dir.resolve() == (tmp_path / "in" / "runs" / "contained").resolve()
    created = {p for p in tmp_path.rglob("*")} - before
    allowed = (run_dir, tmp_path / "cache")  # and output.dir itself, the run directory's parent
    outside = sorted(str(p) for p in created if not any(p.is_relative_to(a) for a in allowed) and p != run_dir.parent)
    assert not outside, outside
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and not any(cwd.iterdir())
    assert str(tmp_path / "in" / "train.jsonl") in (run_dir / "config.yaml").read_text()  # the data file, resolved


def test_unknown_home_directories_are_clear_errors():
    """`~nosuchuser/...`: Path.expanduser raises RuntimeError; lorafit treats it as the (missing) path it is."""
    from lorafit.data.readers import expand_source
    from lorafit.errors import DataError, ModelError
    from lorafit.models.sources import resolve_model

    with pytest.raises(DataError, match="does not exist"):
        expand_source("~nosuchuser-lorafit/train.jsonl")
    with pytest.raises(ModelError, match="neither an existing folder"):
        resolve_model("~nosuchuser-lorafit/model")


def test_paths_that_look_like_markup_are_printed_as_text(tmp_path, smollm2_dir):
    """Rich would read `a[/b]c` as a closing tag and crash the report or the error printer (MarkupError)."""
    import subprocess
    import sys

    (tmp_path / "a[").mkdir()
    data = tmp_path / "a[" / "b]c.jsonl"
    data.write_text('{"text": "hello there"}\n')
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORAFIT_DATA_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"),
    )
    for target, code in ((data, 0), (tmp_path / "a[" / "b]missing.jsonl", 2)):
        done = subprocess.run(
            [sys.executable, "-c", "from lorafit.cli import main; main()", "data", "check", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == code, done.stdout + done.stderr
        assert str(target) in done.stdout + done.stderr and "unexpected" not in done.stderr
