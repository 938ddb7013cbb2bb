"""Preference tuning (`training.method: dpo`): data forms, token-id splits, the reference model, the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import adapter_tensors, metrics, run_cli, write_jsonl

from lorafit.config import DataSection, load_config
from lorafit.data.preference import normalize_pair, preference_form
from lorafit.errors import ConfigError, DataError

LN2 = math.log(2)

PAIRS = [
    ("Name a colour.", "Blue, like the sea at Quillmoor.", "No."),
    ("What is two plus two?", "Two plus two is four.", "Fish."),
    ("Say hello.", "Hello there, friend!", "Go away."),
    ("Where is Vantreth?", "Vantreth sits on the river Lune.", "Nowhere."),
]


def trl_rows(n: int = 8) -> list[dict]:
    return [
        {"prompt": p, "chosen": c, "rejected": r, "id": i}
        for i, (p, c, r) in enumerate(PAIRS[k % len(PAIRS)] for k in range(n))
    ]


def three_forms(prompt: str, chosen: str, rejected: str) -> list[dict]:
    user = {"role": "user", "content": prompt}
    return [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": chosen}], "rejected": rejected},
        {
            "conversations": [{"from": "human", "value": prompt}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        },
        {
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
        },
    ]


def test_every_preference_form_normalises_to_the_same_pair():
    seen = []
    for row in three_forms("Hi?", "Hello!", "Bye."):
        pair = normalize_pair(row, preference_form(row))
        assert not pair.problems, (row, pair.problems)
        seen.append((pair.prompt, pair.chosen, pair.rejected))
    assert all(s == seen[0] for s in seen)
    assert seen[0] == ([{"role": "user", "content": "Hi?"}], "Hello!", "Bye.")
    assert [preference_form(r) for r in three_forms("a", "b", "c")] == [
        "prompt_chosen_rejected",
        "prompt_chosen_rejected",
        "sharegpt_preference",
        "chosen_rejected",
    ]


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "same answer"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "got int"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt", "user turn"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen", "assistant"),
        ({"prompt": "q", "chosen": ["a", "b"], "rejected": "b"}, "chosen", "one assistant answer"),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            "rejected",
            "differs from `chosen` at turn 0",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt"}, "rejected": "b"},
            "chosen",
            "",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "tools": []}, "tools", "not supported"),
    ],
)
def test_bad_pairs_name_the_field_and_reason(row, field, words):
    problems = normalize_pair(row, preference_form(row)).problems
    assert problems and problems[0][0].startswith(field) and words in problems[0][1], problems


def test_llama3_pairs_have_bos_once_and_split_on_token_ids(llama3_tokenizer, tmp_path):
    from lorafit.data.preference_data import prepare_preferences
    from lorafit.data.templates import encode_prompt

    tok = llama3_tokenizer
    rows = [r for p in PAIRS for r in three_forms(*p)]
    data = DataSection(train=[str(write_jsonl(tmp_path / f"f{i}.jsonl", rows[i::4])) for i in range(4)])
    prepared = prepare_preferences(data, tok, seed=0)
    assert prepared.template == "llama3" and len(prepared.train) == len(rows)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for k, row in enumerate(prepared.train):
        prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        for answer in (chosen, rejected):
            assert (prompt + answer).count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id
            assert answer[-1] == eot and eot not in answer[:-1]
        pair = PAIRS[k % len(PAIRS)]
        # the prompt is exactly what inference feeds the model, and each answer decodes to its text
        assert prompt == encode_prompt(tok, [{"role": "user", "content": pair[0]}], "llama3")
        assert tok.decode(chosen) == pair[1] + "<|eot_id|>" and tok.decode(rejected) == pair[2] + "<|eot_id|>"


def _dpo_config(tmp_path: Path, model_dir: Path, name: str, **sections) -> Path:
    cfg = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(write_jsonl(tmp_path / "prefs.jsonl", trl_rows())), "max_length": 96},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "method": "dpo",
            "max_steps": 3,
            "micro_batch_size": 2,
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "seed": 7,
        },
        "dpo": {"beta": 0.5},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    for section, fields in sections.items():
        if fields is None:
            cfg.pop(section, None)
        else:
            cfg.setdefault(section, {}).update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _first_loss(trainer) -> tuple[float, float]:
    """(DPO loss, preference accuracy) of the first training batch, as the first optimizer step sees it."""
    import torch

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    accuracy = trainer._metrics["train"]["rewards/accuracies"][-1]
    trainer._metrics["train"].clear()
    return float(loss), accuracy


def test_reference_is_the_sft_adapter_not_the_bare_base(tmp_path, tiny_chat_model, tiny_run_dir):
    """From an SFT run the reference is that adapter, frozen: the first loss is ln 2 exactly. With the base as the
    reference (the adapter disabled, the classic mistake) the SFT policy already differs from it: not ln 2."""
    from lorafit.train.dpo import build_dpo_run

    cfg = load_config(
        _dpo_config(tmp_path, tiny_chat_model, "from-sft", model={"adapter": str(tiny_run_dir)}, lora=None)
    )
    run = build_dpo_run(cfg, tmp_path / "runs" / "from-sft", say=lambda *a: None)
    assert "ref" in run.model.peft_config and run.trainable == sum(
        p.numel() for n, p in run.model.named_parameters() if ".default." in n and "lora_" in n
    )
    loss, _ = _first_loss(run.trainer)
    assert loss == pytest.approx(LN2, abs=1e-5)

    run.model.delete_adapter("ref")  # TRL then takes the reference with the adapter disabled: the bare base
    wrong, _ = _first_loss(run.trainer)
    assert abs(wrong - LN2) > 0.05, wrong

    base = load_config(_dpo_config(tmp_path, tiny_chat_model, "from-base"))
    run = build_dpo_run(base, tmp_path / "runs" / "from-base", say=lambda *a: None)
    assert _first_loss(run.trainer)[0] == pytest.approx(LN2, abs=1e-5)


def test_lora_dropout_of_the_sft_adapter_is_off_for_dpo(tmp_path, tiny_chat_model, tiny_run_dir):
    """An SFT adapter trained with LoRA dropout: DPO switches dropout off (TRL's disable_dropout), so policy and
    reference agree at step 0 (ln 2). lorafit's fused dropout (models/lora_dropout.py) would hide it from TRL."""
    import shutil

    from lorafit.models.lora_dropout import DroppedInputLinear
    from lorafit.train.dpo import build_dpo_run

    sft = tmp_path / "sft"
    shutil.copytree(tiny_run_dir, sft)
    adapter_config = sft / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "lora_dropout": 0.3}))
    cfg = load_config(_dpo_config(tmp_path, tiny_chat_model, "dropout", model={"adapter": str(sft)}, lora=None))
    run = build_dpo_run(cfg, tmp_path / "runs" / "dropout", say=lambda *a: None)
    assert not any(isinstance(m, DroppedInputLinear) for m in run.model.modules())
    losses = [_first_loss(run.trainer)[0] for _ in range(2)]
    assert losses == pytest.approx([LN2, LN2], abs=1e-5)


def test_config_validates_dpo_settings(tmp_path, tiny_chat_model, tiny_run_dir):
    with pytest.raises(ConfigError, match="only used with `training.method: dpo`"):
        load_config(_dpo_config(tmp_path, tiny_chat_model, "a", training={"method": "sft"}))
    with pytest.raises(ConfigError, match="dpo.loss"):
        load_config(_dpo_config(tmp_path, tiny_chat_model, "b", dpo={"loss": "simpo"}))
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(_dpo_config(tmp_path, tiny_chat_model, "c", dpo={"beta": 0}))
    with pytest.raises(ConfigError, match="cannot change an existing adapter"):
        load_config(_dpo_config(tmp_path, tiny_chat_model, "d", model={"adapter": str(tiny_run_dir)}))
    ok = load_config(_dpo_config(tmp_path, tiny_chat_model, "e", dpo={"loss": "ipo", "beta": 0.2}))
    assert (ok.training.method, ok.dpo.loss, ok.dpo.beta) == ("dpo", "ipo", 0.2)


def test_wrong_base_for_the_adapter_is_refused(tmp_path, tiny_chat_model, tiny_run_dir, smollm2_dir):
    from lorafit.models.adapter import resolve_adapter_base

    cfg = load_config(_dpo_config(tmp_path, smollm2_dir, "x", model={"adapter": str(tiny_run_dir)}, lora=None))
    with pytest.raises(ConfigError, match="was trained on"):
        resolve_adapter_base(cfg)


def test_sft_on_preference_data_is_refused(tmp_path, tiny_chat_model):
    from lorafit.train.setup import build_run

    cfg = load_config(_dpo_config(tmp_path, tiny_chat_model, "s", training={"method": "sft"}, dpo=None))
    with pytest.raises(ConfigError, match="training.method: dpo"):
        build_run(cfg, tmp_path / "runs" / "s", say=lambda *a: None)


def test_invalid_rows_stop_dpo_with_their_lines(tmp_path, smollm2_tokenizer):
    from lorafit.data.preference_data import prepare_preferences

    path = write_jsonl(tmp_path / "p.jsonl", trl_rows(2) + ['{"prompt": "q", "chosen": "a"}', "{broken"])
    with pytest.raises(DataError) as err:
        prepare_preferences(DataSection(train=[str(path)]), smollm2_tokenizer, seed=0)
    text = err.value.message
    assert f"{path}:3: (row): not a preference pair" in text and f"{path}:4: (row): broken JSON" in text


def test_data_check_cli_on_preference_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [r for p in PAIRS for r in three_forms(*p)][:3] + trl_rows(2))
    done = run_cli("data", "check", str(good), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["method"] == "dpo" and report["train_samples"] == 5
    assert report["unused_columns"] == {"id": 2}
    parts = {p["part"] for p in report["example"]["spans"]}
    assert parts == {"prompt", "chosen", "rejected"}

    bad = write_jsonl(tmp_path / "bad.jsonl", trl_rows(2) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    done = run_cli("data", "check", str(bad))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{bad}:3: `rejected`: the same answer as `chosen`" in done.stdout
    assert "Traceback" not in done.stderr


def test_dpo_train_cli_end_to_end(tmp_path, tiny_chat_model, tiny_run_dir):
    """`lorafit train` with `training.method: dpo` from an SFT run: metrics, adapter (no reference copy), report."""
    config = _dpo_config(
        tmp_path,
        tiny_chat_model,
        "dpo",
        model={"adapter": str(tiny_run_dir)},
        lora=None,
        data={"val_fraction": 0.25},
        training={"eval_every": 3, "save_every": 2},
        eval={"prompts": ["Name a colour."], "max_new_tokens": 4},
    )
    done = run_cli("train", str(config), "--quiet", timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    run = tmp_path / "runs" / "dpo"
    records = metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-4)  # the reference is the SFT adapter it starts from
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "tokens"):
        assert key in steps[-1], steps[-1]
    assert any("eval_preference_accuracy" in r for r in records)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "adapter" / "ref").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == str(tiny_chat_model) and saved["training"]["method"] == "dpo"
    assert (run / "report.html").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["preference"]["eval_preference_accuracy"] >= 0.0
    assert "Preference (DPO)" in (run / "report.html").read_text()
    generations = json.loads((run / "generations.json").read_text())
    assert generations[0]["before"] and generations[0]["after"]  # answered with TRL's patched model, before and after

    # the result is an ordinary run: the SFT adapter, trained further, on the same base; merge reads it as any run
    import torch

    from lorafit.export.merge import merged_model

    tuned, sft = adapter_tensors(run / "adapter"), adapter_tensors(tiny_run_dir / "adapter")
    assert tuned.keys() == sft.keys() and any(not torch.equal(tuned[k], sft[k]) for k in sft)
    model, _, cfg, _ = merged_model(run, torch.float32)
    assert cfg.model.adapter == str(tiny_run_dir) and not hasattr(model, "peft_config")

    from lorafit.inference.compare import compare

    result = compare(str(run), str(tmp_path / "prefs.jsonl"), as_json=True)
    assert result["pairs"] == 8 and {"accuracy", "mean_margin"} <= set(result["base"]) == set(result["tuned"])

    # export and chat read a DPO run as any run: a GGUF with the chat template, and answers in the chat format
    from gguf import GGUFReader

    from lorafit.export.gguf import export_gguf
    from lorafit.inference.chat import reply
    from lorafit.inference.generate import load_for_inference

    gguf = export_gguf(run, tmp_path / "dpo.gguf", "f16")
    assert "tokenizer.chat_template" in GGUFReader(str(gguf)).fields
    import io

    loaded = load_for_inference(str(run))
    shown = io.StringIO()
    answer, kept = reply(loaded, [{"role": "user", "content": "Name a colour."}], None, 4, 0.0, shown)
    assert loaded.kind == "run" and answer and answer.strip() in shown.getvalue() and len(kept) == 1  # streamed


def test_dpo_trainer_private_methods_are_checked():
    from lorafit.hf_compat import check_dpo_trainer
    from lorafit.train.dpo import dpo_trainer_class

    check_dpo_trainer()
    trainer = dpo_trainer_class()
    assert {"_prepare_dataset", "_send_telemetry"} <= set(vars(trainer))


def test_dpo_resume_continues_like_an_uninterrupted_run(tmp_path, tiny_chat_model, tiny_run_dir):
    """Checkpoint at step 2, resume to step 4: steps 3-4 match a run that never stopped (reference included)."""
    from lorafit.train.run import run_training

    def train(name: str, steps: int, resume: bool = False) -> dict[int, float]:
        training = {"max_steps": steps, "save_every": 2, "lr_scheduler": "constant", "learning_rate": 2e-3}
        path = _dpo_config(tmp_path, tiny_chat_model, name, model={"adapter": str(tiny_run_dir)}, lora=None)
        cfg = load_config(path, [f"training.{k}={v}" for k, v in training.items()])
        run = run_training(cfg, resume=resume, quiet=True)
        return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}

    whole = train("whole", 4)
    train("parts", 2)
    resumed = train("parts", 4, resume=True)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5), (resumed, whole)
    assert whole[4] < whole[1]


def test_precomputed_reference_is_the_same_reference(tmp_path, tiny_chat_model, tiny_run_dir):
    """`dpo.precompute_reference`: the SFT adapter's log-probs are computed once, before training; the first loss
    is still ln 2, and the batches carry them so no reference forward runs during training."""
    from lorafit.train.dpo import build_dpo_run

    path = _dpo_config(
        tmp_path,
        tiny_chat_model,
        "pre",
        model={"adapter": str(tiny_run_dir)},
        lora=None,
        dpo={"precompute_reference": True},
    )
    run = build_dpo_run(load_config(path), tmp_path / "runs" / "pre", say=lambda *a: None)
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(run.trainer.train_dataset.column_names)
    assert _first_loss(run.trainer)[0] == pytest.approx(LN2, abs=1e-5)


@pytest.mark.slow
def test_dpo_demo_meets_its_bar(tmp_path):
    """The README's claim (configs/dpo_demo.yaml, embedded SmolLM2 on the CPU, ~5 minutes): on the held-out pairs
    the base model is near chance and the DPO-tuned one prefers the chosen answer in at least 90% of them."""
    from helpers import ROOT

    from lorafit.inference.compare import compare

    done = run_cli("train", str(ROOT / "configs" / "dpo_demo.yaml"), f"output.dir={tmp_path}", "--quiet", timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    result = compare(str(tmp_path / "dpo-demo"), str(ROOT / "examples" / "prefs_heldout.jsonl"), as_json=True)
    assert 0.3 <= result["base"]["accuracy"] <= 0.6, result
    assert result["tuned"]["accuracy"] >= 0.9, result
