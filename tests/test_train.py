"""Training through transformers' Trainer: the CLI end to end, exact gradient accumulation, LoRA options reaching
PEFT, gradient checkpointing, precision, schedules, evaluation, early stopping, trackers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import metrics, run_cli, tiny_config
from transformers import TrainerCallback

from lorafit.config import LoraSection, ModelSection, load_config


def quiet_session(cfg, run_dir, callbacks=None):
    from lorafit.train.setup import build_run

    run_dir.mkdir(parents=True, exist_ok=True)
    return build_run(cfg, run_dir, quiet=True, callbacks=callbacks, say=lambda *a: None)


class GradAtFirstStep(TrainerCallback):
    """The accumulated gradient of the first optimizer step, as the optimizer would see it."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- the CLI, end to end


def test_cli_train_end_to_end(tmp_path, tiny_chat_model):
    # tensorboard is in the `test` extra; the refusal without it is tests/test_trackers.py's
    cfg = tiny_config(
        tmp_path,
        tiny_chat_model,
        n_val=4,
        training={
            "max_steps": 6,
            "eval_every": 3,
            "save_every": 3,
            "learning_rate": 2e-2,
            "report_to": ["tensorboard"],
        },
        eval={"prompts": ["Tell me about Quillmoor.", "Where is Vantreth?"], "max_new_tokens": 6},
    )
    done = run_cli("train", str(cfg), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    assert "trainable" in done.stdout and "run directory" in done.stdout
    assert "step 6/6" in done.stderr  # --quiet: plain progress lines for logs

    rows = metrics(run)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens"] > 0 and r["trained_tokens"] > 0 and r["learning_rate"] > 0 for r in train)
    assert [r["tokens"] for r in train] == sorted(r["tokens"] for r in train)
    assert [r["step"] for r in evals] == [3, 6]  # every eval_every steps and at the end, never twice
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-6) for r in evals)

    gens = json.loads((run / "generations.json").read_text())
    assert [g["prompt"] for g in gens] == ["Tell me about Quillmoor.", "Where is Vantreth?"]
    assert all(isinstance(g["before"], str) and isinstance(g["after"], str) for g in gens)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"]
    assert summary["peak_memory_bytes"] > 0 and summary["precision"] == "fp32"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    ckpt = run / "checkpoints" / "checkpoint-3"  # everything an exact resume needs
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "lorafit_checkpoint.json",
    ):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] > 0  # the data position: step and epoch
    manifest = json.loads((ckpt / "lorafit_checkpoint.json").read_text())
    assert manifest["tokens"] == train[2]["tokens"] and manifest["step"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").exists() and (run / "tokenizer").is_dir()
    assert (run / "report.html").exists() and (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name == ".partial" and any(p.iterdir())]


# ---------------------------------------------------------------- gradient accumulation


def _first_step_grads(tmp_path, model_dir, micro: int, accum: int):
    # PiSSA starts with B != 0, so the gradients of A are compared too (they are 0 at a default init)
    cfg = load_config(
        tiny_config(
            tmp_path / f"mb{micro}x{accum}",
            model_dir,
            n_train=8,
            lora={"init": "pissa"},
            training={"micro_batch_size": micro, "gradient_accumulation": accum, "max_steps": 1, "max_grad_norm": 0},
        )
    )
    grab = GradAtFirstStep()
    s = quiet_session(cfg, tmp_path / f"run{micro}x{accum}", [grab])
    s.trainer.train()
    return grab.grads, s.prepared.train


def test_accumulation_1x4_equals_4x1(tmp_path, tiny_chat_model, monkeypatch):
    one_by_four, data = _first_step_grads(tmp_path, tiny_chat_model, micro=1, accum=4)
    four_by_one, _ = _first_step_grads(tmp_path, tiny_chat_model, micro=4, accum=1)
    trained = [sum(1 for x in row[1:] if x != -100) for row in data["labels"]]
    assert len(set(trained)) > 1  # samples of different lengths: a per-micro-batch mean would weigh them wrongly
    assert one_by_four.keys() == four_by_one.keys() and one_by_four
    assert all(g.abs().max() > 0 for g in one_by_four.values())
    for name in one_by_four:
        torch.testing.assert_close(one_by_four[name], four_by_one[name], rtol=1e-4, atol=1e-7)

    # the test has teeth: averaging each micro-batch on its own gives a different gradient
    import lorafit.train.loss
    import lorafit.train.trainer

    def per_micro_batch_mean(trainer, model, inputs, return_outputs=False, num_items_in_batch=None, mode="chunked"):
        loss, _ = lorafit.train.loss.causal_lm_loss(model, inputs, None, mode)
        return loss / trainer.args.gradient_accumulation_steps

    monkeypatch.setattr(lorafit.train.trainer, "trainer_compute_loss", per_micro_batch_mean)
    naive, _ = _first_step_grads(tmp_path / "naive", tiny_chat_model, micro=1, accum=4)
    differences = [(naive[n] - four_by_one[n]).abs().max() / four_by_one[n].abs().max() for n in naive]
    assert max(differences) > 1e-2


# ---------------------------------------------------------------- LoRA options reach PEFT


def _lora(model_dir, **fields):
    from lorafit.models.lora import attach_lora
    from lorafit.models.sources import load_base_model

    torch.manual_seed(0)
    return attach_lora(load_base_model(ModelSection(name=str(model_dir), dtype="fp32")), LoraSection(**fields))


def test_rslora_dora_and_target_modules_reach_peft(tiny_chat_model):
    plain = _lora(tiny_chat_model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    rs = _lora(tiny_chat_model, r=4, alpha=8, use_rslora=True)
    dora = _lora(tiny_chat_model, r=4, alpha=8, use_dora=True)
    q = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert q(plain).scaling["default"] == pytest.approx(8 / 4)
    assert q(rs).scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert rs.peft_config["default"].use_rslora and dora.peft_config["default"].use_dora
    assert "default" in q(dora).lora_magnitude_vector and not q(plain).lora_magnitude_vector
    adapted = {n.rsplit(".", 1)[-1] for n, m in plain.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert adapted == {"q_proj", "v_proj"}
    everything = {n.rsplit(".", 1)[-1] for n, m in rs.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert everything == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }  # all-linear: not lm_head


def test_modules_to_save_are_trained_and_saved(tiny_chat_model, tmp_path):
    from peft.utils import ModulesToSaveWrapper
    from safetensors.torch import load_file

    model = _lora(tiny_chat_model, r=4, modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in head.modules_to_save.parameters())
    model.save_pretrained(tmp_path / "a")
    assert any("lm_head" in k for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "init, b_is_zero, base_changes",
    [("default", True, False), ("gaussian", True, False), ("pissa", False, True), ("olora", False, True)],
)
def test_init_options_reach_peft(tiny_chat_model, init, b_is_zero, base_changes):
    from lorafit.models.sources import load_base_model

    before = (
        load_base_model(ModelSection(name=str(tiny_chat_model), dtype="fp32")).model.layers[0].self_attn.q_proj.weight
    )
    model = _lora(tiny_chat_model, r=4, init=init)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert model.peft_config["default"].init_lora_weights == (True if init == "default" else init)
    assert bool(q.lora_B["default"].weight.abs().sum() == 0) == b_is_zero
    assert bool((q.base_layer.weight - before).abs().max() > 0) == base_changes  # PiSSA/OLoRA move the residual


def test_eva_init_uses_the_training_data(tmp_path, tiny_chat_model):
    # big batches: EVA cycles over the data until its incremental SVD converges, so fewer, fuller batches are faster
    cfg = load_config(
        tiny_config(
            tmp_path,
            tiny_chat_model,
            lora={"init": "eva", "r": 4, "alpha": 8},
            training={"max_steps": 1, "micro_batch_size": 16},
        )
    )
    s = quiet_session(cfg, tmp_path / "run")
    q = s.model.base_model.model.model.layers[0].self_attn.q_proj
    a = q.lora_A["default"].weight  # EVA: the top right-singular vectors of the layer inputs, orthonormal rows
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    s.trainer.train()


# ---------------------------------------------------------------- checkpointing, precision, schedules


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_chat_model):
    grads = {}
    for on in (False, True):
        cfg = load_config(
            tiny_config(
                tmp_path / str(on),
                tiny_chat_model,
                training={"max_steps": 1, "gradient_checkpointing": on, "max_grad_norm": 0},
            )
        )
        grab = GradAtFirstStep()
        s = quiet_session(cfg, tmp_path / f"run{on}", [grab])
        layer = s.model.base_model.model.model.layers[0]
        if on:
            assert layer.gradient_checkpointing
            assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False
        s.trainer.train()
        grads[on] = grab.grads
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-7)


def test_precision_per_device(tmp_path, tiny_chat_model):
    from lorafit.runtime import resolve_precision
    from lorafit.train.trainer import training_arguments

    expected = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "fp32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"
    cfg = load_config(tiny_config(tmp_path, tiny_chat_model, training={"precision": "bf16", "max_steps": 2}))
    args = training_arguments(cfg, tmp_path / "run", has_eval=False)
    assert args.bf16 and not args.fp16
    s = quiet_session(cfg, tmp_path / "run")  # bf16 autocast also runs on CPU
    out = s.trainer.train()
    assert math.isfinite(out.training_loss)


def test_adamw_is_torchs_fused_kernel(tmp_path, tiny_chat_model):
    """training.optimizer adamw_torch: torch's AdamW with its fused kernel (trainer.optimizer_name), on the LoRA
    weights alone, with the configured weight decay."""
    cfg = load_config(tiny_config(tmp_path, tiny_chat_model, training={"max_steps": 2, "weight_decay": 0.01}))
    s = quiet_session(cfg, tmp_path / "run")
    s.trainer.create_optimizer_and_scheduler(num_training_steps=2)
    optimizer = s.trainer.optimizer.optimizer if hasattr(s.trainer.optimizer, "optimizer") else s.trainer.optimizer
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    trained = {id(p) for p in s.model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trained
    assert max(group["weight_decay"] for group in optimizer.param_groups) == 0.01
    out = s.trainer.train()
    assert math.isfinite(out.training_loss)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_warm_up_then_decay(tmp_path, tiny_chat_model, schedule):
    cfg = load_config(
        tiny_config(
            tmp_path,
            tiny_chat_model,
            training={"max_steps": 20, "warmup_ratio": 0.2, "lr_scheduler": schedule, "learning_rate": 1e-3},
        )
    )
    s = quiet_session(cfg, tmp_path / "run")
    s.trainer.create_optimizer_and_scheduler(num_training_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(s.trainer.lr_scheduler.get_last_lr()[0])
        s.trainer.optimizer.step()
        s.trainer.lr_scheduler.step()
    assert lrs[0] < lrs[2] and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 4
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1e-3
    mid = lrs[8]  # a quarter into the decay: linear is at 3/4 of the peak, cosine above it
    assert (mid > 1e-3 * (20 - 8) / 16 + 1e-6) == (schedule == "cosine")


# ---------------------------------------------------------------- evaluation and early stopping


def test_early_stopping_stops_and_keeps_the_best_adapter(tmp_path, tiny_chat_model):
    from lorafit.train.run import run_training

    # a learning rate this small leaves the validation loss where it is: no improvement after the first eval
    cfg = load_config(
        tiny_config(
            tmp_path,
            tiny_chat_model,
            n_val=4,
            training={"max_steps": 30, "eval_every": 1, "early_stopping_patience": 2, "learning_rate": 1e-12},
        )
    )
    run = run_training(cfg, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3  # eval 1 sets the best, evals 2 and 3 do not improve: stop
    assert [r["step"] for r in metrics(run) if "eval_loss" in r][:3] == [1, 2, 3]


def test_early_stopping_needs_validation_data(tmp_path, tiny_chat_model):
    from lorafit.errors import ConfigError
    from lorafit.train.run import run_training

    cfg = load_config(tiny_config(tmp_path, tiny_chat_model, training={"early_stopping_patience": 2, "eval_every": 1}))
    with pytest.raises(ConfigError, match="validation data"):
        run_training(cfg, quiet=True)


def test_keep_best_adapter_restores_the_best_weights(tiny_chat_model):
    from peft import get_peft_model_state_dict

    from lorafit.train.callbacks import KeepBestAdapter

    model = _lora(tiny_chat_model, r=4)
    keep = KeepBestAdapter()
    state = type("S", (), {"global_step": 1})()
    keep.on_evaluate(None, state, None, metrics={"eval_loss": 2.0}, model=model)
    snapshot = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    state.global_step = 2
    keep.on_evaluate(None, state, None, metrics={"eval_loss": 2.5}, model=model)  # worse: not kept
    assert keep.restore(model) == 1
    for k, v in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(v, snapshot[k])


# ---------------------------------------------------------------- progress and metrics


class FakeState:
    def __init__(self, step, max_steps=10):
        self.global_step, self.max_steps, self.is_world_process_zero, self.epoch = step, max_steps, True, 0.1 * step


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_progress_shows_step_loss_lr_throughput_and_eta(mode, capsys, caplog):
    from lorafit.train.callbacks import ProgressCallback, TokenCounter

    tokens = TokenCounter()
    tokens.add({"input_ids": torch.ones(2, 50, dtype=torch.long), "labels": torch.ones(2, 50, dtype=torch.long)}, 0)
    progress = ProgressCallback(tokens, mode=mode)
    with caplog.at_level("INFO", logger="lorafit"):
        progress.on_train_begin(None, FakeState(0), None)
        for step in (1, 2, 3):
            progress.on_step_end(None, FakeState(step), None)
            progress.on_log(None, FakeState(step), None, logs={"loss": 2.0 / step, "learning_rate": 1e-4})
        progress.on_train_end(None, FakeState(3), None)
    shown = capsys.readouterr().err + caplog.text
    for part in ("3/10", "loss 0.6667", "lr 1.00e-04", "tok/s", "eta"):
        assert part in shown, (part, shown)


def test_metrics_truncate_to_the_checkpoint_on_resume(tmp_path):
    from lorafit.train.callbacks import MetricsCallback, TokenCounter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    MetricsCallback(path, TokenCounter()).truncate_after(4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
