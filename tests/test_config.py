"""Config loading: typos and wrong types are errors, all reported at once; overrides; shipped presets."""

from pathlib import Path

import pytest

from lorafit.config import RunConfig, load_config, reference
from lorafit.config_yaml import parse_yaml
from lorafit.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_several_problems_reported_together(tmp_path):
    p = write(tmp_path, "lora:\n  rank: 8\n  alpha: -1\ntraining:\n  learning_rate: fast\n  epoch: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    for field in ("lora.rank", "lora.alpha", "training.learning_rate", "training.epoch"):
        assert f"`{field}`" in text
    assert "4 problem(s)" in text
    assert "'fast'" in text  # the value received is shown


def test_typo_in_section_name_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="`trainig`: unknown field"):
        load_config(write(tmp_path, "trainig:\n  epochs: 1\n"))


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, "lora:\n  r: 8\n"),
        ["lora.r=4", "data.packing=false", "training.learning_rate=1e-3", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert cfg.lora.r == 4 and cfg.data.packing is False
    assert cfg.training.learning_rate == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output.name == "run"  # the file's stem


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["lora.r"])
    with pytest.raises(ConfigError, match=r"run.yaml:\d+:\d+: invalid YAML"):
        load_config(write(tmp_path, "lora:\n  r: [1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_alias_bomb_is_refused():
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
        for i in range(12)
    )
    with pytest.raises(ConfigError, match="alias"):
        parse_yaml(bomb, "bomb.yaml")


def test_data_paths_relative_to_config(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, "data:\n  train: d.jsonl\n"))
    assert Path(cfg.data.train[0].path) == tmp_path / "d.jsonl"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_is_valid_and_documents_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(cmd in line for line in header for cmd in ("lorafit train", "lorafit.cli train", "lorafit demo")), (
        "the header must give the command"
    )


def test_reference_lists_every_field():
    text = reference()
    assert "`lora.r`" in text and "`training.micro_batch_size`" in text and "`data.train[].path`" in text


def test_readme_carries_the_current_config_reference():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert reference() in readme, "README's config table is stale: paste `lorafit config-reference` into it"
