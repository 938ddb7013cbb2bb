"""Loading someone else's files must not run their code: no `auto_map` Python without `model.trust_remote_code`,
weights from safetensors only, and every pickle a resume reads goes through `torch.load(weights_only=True)`.

Each hostile file here writes a marker file when its code runs; a positive control shows that it really does
(with the flag, or with a plain unpickler), so "no marker" means "not run", not "broken payload".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.config import ModelSection, load_config
from lorafit.errors import LorafitError, ModelError, RunDirError

SRC = Path(__file__).resolve().parents[2] / "src"
ARGS = r"((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)"  # a call's arguments, with up to two levels of nested parentheses


def write_marker_code(marker: Path) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('their code ran')\n"


def remote_code_folder(folder: Path, tokenizer_dir: Path, marker: Path, model_type: str = "evil") -> Path:
    """A model folder whose config and tokenizer point (auto_map) at Python files that write `marker` on import."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        weights = model_type == "llama" and f.suffix in (".json", ".safetensors")  # a loadable Llama, or tokenizer only
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or weights:
            shutil.copy(f, folder / f.name)
    code = write_marker_code(marker)
    (folder / "configuration_evil.py").write_text(
        code + "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (folder / "modeling_evil.py").write_text(
        code + "from transformers import PreTrainedModel\nclass EvilModel(PreTrainedModel):\n    pass\n"
    )
    (folder / "tokenization_evil.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config.update(
        model_type=model_type,
        auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file whose unpickling runs code (what a tampered checkpoint or a hostile .bin holds)."""
    import torch

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('their code ran')",)

    torch.save({"state": Payload()}, path)
    return path


def runs_with_plain_unpickler(path: Path, marker: Path) -> bool:
    """Positive control, in a child process: torch.load(weights_only=False) does run the payload."""
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
        capture_output=True,
        timeout=60,
    )
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


# -- trust_remote_code --------------------------------------------------------------------------------
def test_remote_code_is_not_run_without_the_flag(tmp_path, smollm2_dir):
    from lorafit.models.sources import load_base_model
    from lorafit.models.tokenizer import load_tokenizer

    marker = tmp_path / "MARKER"
    folder = remote_code_folder(tmp_path / "evil", smollm2_dir, marker)
    assert ModelSection().trust_remote_code is False  # off by default
    with pytest.raises(ModelError, match=r"ships its own Python code[\s\S]*`model.trust_remote_code: true`"):
        load_tokenizer(str(folder))
    with pytest.raises(ModelError, match=r"ships its own Python code[\s\S]*`model.trust_remote_code: true`"):
        load_base_model(ModelSection(name=str(folder), dtype="fp32"))
    assert not marker.exists()


def test_remote_code_runs_only_when_the_config_says_so(tmp_path, smollm2_dir):
    """The positive control, in a child process with its own modules cache: the flag reaches transformers."""
    marker = tmp_path / "MARKER"
    folder = remote_code_folder(tmp_path / "evil", smollm2_dir, marker)
    config = tmp_path / "trusting.yaml"
    config.write_text(f"model: {{name: {folder}, dtype: fp32, trust_remote_code: true}}\n")
    child = (
        "import sys; from lorafit.config import load_config; from lorafit.models.sources import load_base_model\n"
        "try:\n    load_base_model(load_config(sys.argv[1]).model)\nexcept Exception:\n    pass\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(SRC))
    subprocess.run([sys.executable, "-c", child, str(config)], capture_output=True, timeout=120, env=env)
    assert marker.read_text() == "their code ran"


def test_known_architecture_with_auto_map_loads_built_in_code(tmp_path, tiny_chat_model):
    """A Llama config that also names custom code: transformers' own Llama is used, the custom code is not run."""
    from lorafit.models.sources import load_base_model

    marker = tmp_path / "MARKER"
    folder = remote_code_folder(tmp_path / "llama_with_code", tiny_chat_model, marker, model_type="llama")
    model = load_base_model(ModelSection(name=str(folder), dtype="fp32"))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_training_refuses_remote_code_before_any_work(tmp_path, smollm2_dir, monkeypatch):
    from helpers import tiny_config

    from lorafit.train.run import run_training

    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "MARKER"
    folder = remote_code_folder(tmp_path / "evil", smollm2_dir, marker)
    cfg = load_config(tiny_config(tmp_path, folder))
    with pytest.raises(ModelError, match="trust_remote_code"):
        run_training(cfg)
    assert not marker.exists() and not list((tmp_path / "runs").rglob("adapter_model.safetensors"))


# -- safetensors only -----------------------------------------------------------------------------------
def test_pickle_only_model_folder_is_refused(tmp_path, tiny_chat_model):
    from lorafit.inference.generate import load_for_inference
    from lorafit.models.sources import load_base_model

    marker = tmp_path / "MARKER"
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_chat_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    malicious_pickle(folder / "pytorch_model.bin", marker)
    assert runs_with_plain_unpickler(folder / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match=r"no safetensors weights \(it has pytorch_model.bin\)[\s\S]*save_pretrained"):
        load_base_model(ModelSection(name=str(folder), dtype="fp32"))
    with pytest.raises(ModelError):  # `lorafit chat/generate FOLDER` loads through its own path
        load_for_inference(str(folder))
    assert not marker.exists()


def test_run_dir_with_a_pickled_adapter_is_refused(tmp_path, tiny_run_dir):
    from lorafit.rundir import load_tuned

    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    malicious_pickle(run / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(RunDirError, match="no adapter_model.safetensors .only adapter_model.bin"):
        load_tuned(run)
    assert not marker.exists()


# -- pickles that resume reads: optimizer, scheduler, RNG state -------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_chat_model):
    """A finished 2-step run with a checkpoint at step 1 (checkpoint-2 removed, so resume starts from step 1)."""
    from helpers import tiny_config

    from lorafit.train.run import run_training

    tmp = tmp_path_factory.mktemp("resume")
    old = os.environ.get("LORAFIT_DATA_CACHE")
    os.environ["LORAFIT_DATA_CACHE"] = str(tmp / "cache")
    try:
        config = tiny_config(tmp, tiny_chat_model, n_train=8, training={"max_steps": 2, "save_every": 1})
        run_dir = run_training(load_config(config), quiet=True)
    finally:
        os.environ.pop("LORAFIT_DATA_CACHE") if old is None else os.environ.__setitem__("LORAFIT_DATA_CACHE", old)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-2", ignore_errors=True)
    assert (run_dir / "checkpoints" / "checkpoint-1").is_dir()
    return config, run_dir


@pytest.mark.parametrize("victim", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_resume_never_unpickles_code(tmp_path, trained_checkpoint, victim, monkeypatch):
    from lorafit.train import checkpoints as ckpt
    from lorafit.train.run import run_training

    config, run_dir = trained_checkpoint
    work = tmp_path / "copy"
    shutil.copytree(config.parent, work, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(tmp_path / "cache"))
    cfg = load_config(work / config.name, [f"output.dir={work / 'runs'}"])
    step = work / "runs" / run_dir.name / "checkpoints" / "checkpoint-1"
    assert (step / victim).exists(), sorted(p.name for p in step.iterdir())
    marker = tmp_path / "MARKER"
    malicious_pickle(step / victim, marker)
    assert runs_with_plain_unpickler(step / victim, marker)
    manifest = ckpt.read_manifest(step)
    if manifest:  # someone who can write the file can fix the size list too: resume must still be safe
        manifest["files"][victim] = (step / victim).stat().st_size
        (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
        assert ckpt.checkpoint_problem(step) is None
    with pytest.raises(LorafitError) as info:
        run_training(cfg, resume=True, quiet=True)
    assert not marker.exists()
    assert info.value.exit_code == 2 and str(step) in info.value.message and "not plain tensors" in info.value.message


# -- the code base: no unsafe loader anywhere ---------------------------------------------------------
def test_no_unsafe_deserialization_in_lorafit():
    """torch.load only with weights_only=True; no pickle/dill/joblib loads; no model load that could pick a .bin."""
    problems = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(rf"torch\.load\({ARGS}\)", text):
            if "weights_only=True" not in call.group(1):
                problems.append(f"{path.name}: torch.load({call.group(1)})")
        for bad in re.finditer(
            r"\b(pickle|dill|joblib|cloudpickle)\.loads?\(|allow_pickle=True|trust_remote_code=True", text
        ):
            problems.append(f"{path.name}: {bad.group(0)}")
        for call in re.finditer(rf"AutoModel\w*\.from_pretrained\({ARGS}\)", text):
            if (
                "use_safetensors=True" not in call.group(1)
                and "gguf_file=" not in call.group(1)
                and "**kwargs" not in call.group(1)
            ):
                problems.append(f"{path.name}: from_pretrained({call.group(1)}) may load pickle weights")
    assert not problems, problems


def test_transformers_resume_loads_with_weights_only():
    """The Trainer's resume path is transformers' code: guard against a version that drops weights_only=True."""
    import torch
    import transformers.trainer as trainer_module

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 6)  # torch.load defaults to weights_only=True from 2.6
    source = Path(trainer_module.__file__).read_text(encoding="utf-8")
    calls = re.findall(rf"torch\.load\({ARGS}\)", source)
    assert calls and all("weights_only=True" in c for c in calls), [c for c in calls if "weights_only=True" not in c]
