"""`lorafit train` under the launchers users scale out with, through the real CLI, on 2 CPU processes (gloo):

- FSDP2 (`accelerate launch`, configs/accelerate/fsdp2.yaml) on the embedded SmolLM2-135M: the same losses and adapter
  as one process with the same global batch, checkpoints written once, SIGTERM then `--resume` continues the curve,
  the adapter loads with PEFT in one process; QLoRA is refused with the reason;
- DeepSpeed ZeRO-2 and ZeRO-3 (configs/deepspeed/*.json) on its CPU accelerator;
- two "nodes" on one machine (`torchrun --nnodes 2`, one process each) with the multi-node preset, equal to one node
  with two processes; `output.dir: ~/runs` gives every rank the same run directory.

The references run in this process (no start-up cost); the tolerances are stated where they are used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, adapter_tensors, cli_env, metrics, tiny_config, train_losses

from lorafit.train.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    list_checkpoints,
)

ACCELERATE = [sys.executable, "-c", "from accelerate.commands.accelerate_cli import main; main()", "launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Loss per step and adapter weights of a 2-rank run against one process with the same global batch. The arithmetic
# is the same (the loss is normalised by the global token count); only the order of fp32 sums differs (2 micro-batches
# of 2 rows vs 1 of 4, gradients averaged across ranks). Measured: FSDP2 (SmolLM2-135M, 4 steps, resumed) 4.3e-7
# relative on the loss, 9.1e-6 absolute on the adapter; ZeRO-2/3 1.8e-7 and <= 8.9e-7. Two nodes vs one: bitwise equal.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return dict(cli_env(), OMP_NUM_THREADS="1", **extra)


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=cwd, check=False)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _reference(config: Path, overrides: list[str] = ()) -> Path:
    """One process, in this one: the run the distributed ones must equal."""
    from lorafit.config import load_config
    from lorafit.train.run import run_training

    return run_training(load_config(config, list(overrides)), quiet=True)


# A sharded model answers eval prompts only when every rank generates (each forward gathers weights): run.py does.
PROMPTS = {"prompts": ["Tell me about Quillmoor."], "max_new_tokens": 4}


def _assert_answered(run: Path) -> None:
    [answer] = json.loads((run / "generations.json").read_text())
    assert answer["prompt"] == PROMPTS["prompts"][0]
    assert isinstance(answer["before"], str) and isinstance(answer["after"], str)


def _assert_same_run(ours: Path, reference: Path, steps: int) -> None:
    assert sorted(train_losses(ours)) == list(range(1, steps + 1))  # every step logged once
    ref = train_losses(reference)
    for step, loss in train_losses(ours).items():
        assert loss == pytest.approx(ref[step], rel=LOSS_RTOL), step
    a, b = adapter_tensors(ours / "adapter"), adapter_tensors(reference / "adapter")
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].shape == b[name].shape, name  # ZeRO-3 would leave empty slices if not gathered
        assert (a[name] - b[name]).abs().max() < WEIGHT_ATOL, name
    assert any(b[name].abs().max() > 0 for name in b if "lora_B" in name)  # it trained


def _assert_checkpoints_written_once(run: Path, ranks: int) -> list[int]:
    """Complete (manifest matches), one RNG state per rank, nothing half-written or stray beside them."""
    found = list_checkpoints(run / "checkpoints")
    assert found
    for ckpt in found:
        assert checkpoint_problem(ckpt) is None, ckpt
        assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == [f"rng_state_{r}.pth" for r in range(ranks)]
        assert (ckpt / "optimizer.pt").is_file() or list(ckpt.glob("global_step*"))
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    staging = run / "checkpoints" / ".partial"
    assert not staging.exists() or not any(staging.iterdir())
    return [checkpoint_step(p) for p in found]


# ---------------------------------------------------------------- FSDP2 through accelerate launch

FSDP_STEPS = 4
FSDP_TRAINING = {"max_steps": FSDP_STEPS, "save_every": 1, "learning_rate": 1e-3, "logging_steps": 1}


def _fsdp_cmd(config: Path, *args: str) -> list[str]:
    return [
        *ACCELERATE,
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lorafit.cli",
        "train",
        str(config),
        "--quiet",
        *args,
    ]


def _workers(launcher: subprocess.Popen) -> list:
    import psutil

    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "lorafit.cli" in " ".join(p.cmdline())]


def _sigterm_after_first_checkpoint(cmd: list[str], run: Path, cwd: Path) -> tuple[int, str]:
    """Start the FSDP run, SIGTERM every rank (as a preempting scheduler does) once checkpoint-1 is complete."""
    launcher = subprocess.Popen(
        cmd, env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        while not any(checkpoint_problem(p) is None for p in list_checkpoints(run / "checkpoints")):
            assert launcher.poll() is None, launcher.communicate()[1][-5000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _workers(launcher)
        assert len(workers) == 2
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=240)
        return launcher.returncode, out + err
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.slow
def test_fsdp2_accelerate_launch_equals_one_process_and_resumes(tmp_path, smollm2_dir):
    """The embedded SmolLM2-135M, LoRA, 2 ranks x micro-batch 2 against 1 process x micro-batch 4."""
    config = tiny_config(
        tmp_path, smollm2_dir, name="fsdp", n_train=8, training=dict(FSDP_TRAINING, micro_batch_size=2), eval=PROMPTS
    )
    run = tmp_path / "runs" / "fsdp"

    code, log = _sigterm_after_first_checkpoint(_fsdp_cmd(config), run, tmp_path)
    assert code != 0 and "training interrupted by SIGTERM" in log, log[-3000:]
    stopped_at = max(_assert_checkpoints_written_once(run, ranks=2))
    assert 1 <= stopped_at < FSDP_STEPS  # it stopped part-way, after saving where it was
    assert not (run / "adapter").exists()

    resumed = _ok(_run(_fsdp_cmd(config, "--resume"), tmp_path))
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{stopped_at}'}" in resumed.stdout
    assert "data: 8 training samples" in resumed.stdout  # printed once, by rank 0
    assert resumed.stdout.count("data: 8 training samples") == 1

    reference = _reference(
        tiny_config(
            tmp_path / "one", smollm2_dir, name="one", n_train=8, training=dict(FSDP_TRAINING, micro_batch_size=4)
        )
    )
    _assert_same_run(run, reference, FSDP_STEPS)
    _assert_answered(run)
    assert _assert_checkpoints_written_once(run, ranks=2)[-1] == FSDP_STEPS  # the newest (save_total_limit) kept
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == json.loads((reference / "summary.json").read_text())["tokens"] > 0

    # One process, plain PEFT, loads the adapter the two ranks trained.
    from lorafit.rundir import load_tuned

    model, _, _ = load_tuned(run)
    saved = adapter_tensors(run / "adapter")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    loaded = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    torch.testing.assert_close(loaded, saved[name])
    assert saved[name].abs().max() > 0


def test_fsdp_shards_the_base_weights_and_keeps_lora_whole(tmp_path, tiny_chat_model):
    """What `accelerate launch --use_fsdp` gets: the frozen base weights are DTensors split over the 2 ranks, the
    LoRA weights plain tensors, whole on each (accelerate alone would have trained plain DDP on a CPU)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE, encoding="utf-8")
    cmd = [
        *ACCELERATE,
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(tiny_chat_model),
        str(tmp_path),
    ]
    _ok(_run(cmd, tmp_path))
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"probe{rank}.json").read_text())
        assert seen["base"] == ["DTensor", [32, 64], [64, 64]]  # q_proj: half the rows here, the whole when gathered
        assert seen["lora"] == ["Parameter", [4, 64]]
        assert seen["accelerate_fsdp"] == "false"  # lorafit took the sharding over: nothing shards twice


PROBE = """
import json, os, sys
from lorafit.config import LoraSection, ModelSection
from lorafit.models.lora import attach_lora
from lorafit.models.sources import load_base_model
from lorafit.runtime import take_over_fsdp

assert take_over_fsdp() == 2
model = attach_lora(load_base_model(ModelSection(name=sys.argv[1], dtype="fp32")), LoraSection(r=4, alpha=8))
params = dict(model.named_parameters())
base = params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
lora = params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
seen = {"base": [type(base).__name__, list(base.to_local().shape), list(base.shape)],
        "lora": [type(lora).__name__, list(lora.shape)], "accelerate_fsdp": os.environ["ACCELERATE_USE_FSDP"]}
with open(os.path.join(sys.argv[2], f"probe{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
"""


def test_qlora_under_fsdp_is_refused_with_the_reason(tmp_path, tiny_chat_model):
    config = tiny_config(tmp_path, tiny_chat_model, name="qfsdp", n_train=8, model={"quantization": "4bit"})
    done = _run(_fsdp_cmd(config), tmp_path)
    assert done.returncode != 0
    assert "`model.quantization: 4bit` cannot be sharded with FSDP" in done.stderr
    assert "compress_statistics" in done.stderr and "torchrun" in done.stderr  # why, and what to do instead
    # lorafit's message and its exit code for bad input, on each rank, before any weight is loaded
    assert done.stderr.count("cannot be sharded with FSDP") == 2 and "exitcode  : 2" in done.stderr
    assert "Loading weights" not in done.stderr


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3

DEEPSPEED_STEPS = 3
DEEPSPEED_TRAINING = {"max_steps": DEEPSPEED_STEPS, "save_every": 2, "learning_rate": 5e-2, "logging_steps": 1}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_equals_one_process(tmp_path, tiny_chat_model, stage):
    assert importlib.util.find_spec("deepspeed"), "DeepSpeed is in the `test` extra: `make test` installs it"
    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        name=f"zero{stage}",
        n_train=8,
        training=dict(DEEPSPEED_TRAINING, micro_batch_size=2),
        eval=PROMPTS,
    )
    cmd = [
        *ACCELERATE,
        "--num_processes",
        "2",
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json"),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lorafit.cli",
        "train",
        str(config),
        "--quiet",
    ]
    done = _ok(_run(cmd, tmp_path, timeout=600))
    # On CPU its collectives go over gloo (runtime.deepspeed_collectives_over_gloo): DeepSpeed compiled no
    # shared-memory op (it prints "deepspeed_shm_comm_op built successfully" when it does, ~2 min on a fresh machine).
    assert "shm_comm" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    run = tmp_path / "runs" / f"zero{stage}"
    # DeepSpeed really ran: its engine wrote the ZeRO-partitioned optimizer state, one file per rank.
    shards = sorted(p.name for p in (run / "checkpoints" / "checkpoint-2").glob("global_step2/*optim_states.pt"))
    assert len(shards) == 2, shards
    assert _assert_checkpoints_written_once(run, ranks=2) == [2, 3]
    reference = _reference(
        tiny_config(
            tmp_path / "one",
            tiny_chat_model,
            name="one",
            n_train=8,
            training=dict(DEEPSPEED_TRAINING, micro_batch_size=4),
        )
    )
    _assert_same_run(run, reference, DEEPSPEED_STEPS)
    _assert_answered(run)


# ---------------------------------------------------------------- two nodes on one machine

MULTINODE = ROOT / "configs" / "llama31-8b-multinode.yaml"


def _multinode_overrides(tmp_path: Path, model_dir: Path, name: str) -> list[str]:
    """The preset as shipped, made small: the tiny model, 8 rows, 3 steps; `output.dir: ~/runs` (HOME is tmp)."""
    from helpers import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(8))
    return [
        f"model.name={model_dir}",
        "model.dtype=fp32",
        "training.precision=fp32",
        f"data.train={data}",
        "data.val_fraction=0",
        "data.max_length=128",
        "data.num_proc=1",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0",
        "training.max_steps=3",
        "training.save_every=2",
        "training.logging_steps=1",
        "training.warmup_ratio=0",
        "training.learning_rate=5e-2",
        "training.micro_batch_size=1",
        "output.dir=~/runs",
        f"output.name={name}",
    ]


def test_two_nodes_equal_one_node_with_two_processes(tmp_path, tiny_chat_model):
    home = tmp_path / "home"
    home.mkdir()
    text = MULTINODE.read_text(encoding="utf-8")
    assert "torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK" in text  # the command this test runs
    assert "--master_addr $MASTER_ADDR --master_port 29500" in text

    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "lorafit.cli",
                "train",
                str(MULTINODE),
                *_multinode_overrides(tmp_path, tiny_chat_model, "two-nodes"),
                "--quiet",
            ],
            # each "machine" its own data cache, as separate disks would be
            env=_env(HOME=str(home), LORAFIT_DATA_CACHE=str(tmp_path / f"cache{rank}")),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        for node in nodes:
            out, err = node.communicate(timeout=300)
            assert node.returncode == 0, out[-2000:] + err[-4000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    _ok(
        _run(
            [
                *TORCHRUN,
                "--nnodes",
                "1",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(_free_port()),
                "-m",
                "lorafit.cli",
                "train",
                str(MULTINODE),
                *_multinode_overrides(tmp_path, tiny_chat_model, "one-node"),
                "--quiet",
            ],
            tmp_path,
            HOME=str(home),
        )
    )

    two, one = home / "runs" / "two-nodes", home / "runs" / "one-node"
    # `~/runs` is the same folder for every rank: rank 1 wrote its RNG state beside rank 0's, nothing under ./~
    assert _assert_checkpoints_written_once(two, ranks=2) == [2, 3]
    assert not (tmp_path / "~").exists()
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-6)
    a, b = adapter_tensors(two / "adapter"), adapter_tensors(one / "adapter")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert [r["tokens"] for r in metrics(two) if "loss" in r] == [r["tokens"] for r in metrics(one) if "loss" in r]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] > 0


def test_every_rank_computes_the_same_run_directory(monkeypatch, tmp_path):
    """The path rank 0 creates and the one the other ranks use come from one function, `~` expanded in both."""
    from lorafit.rundir import create_run_dir, run_dir_path

    monkeypatch.setenv("HOME", str(tmp_path))
    path = run_dir_path("~/runs", "demo")
    assert path == tmp_path / "runs" / "demo" and run_dir_path("~/runs", None) == tmp_path / "runs" / "run"
    created = create_run_dir(path, overwrite=False)
    assert created == path
    assert created.is_dir() and "~" not in str(created)


def test_deepspeed_configs_are_valid_for_the_trainer():
    """The shipped ZeRO configs: stage, `auto` where the lorafit config decides, and what ZeRO-3 needs to save."""
    for stage in (2, 3):
        conf = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text(encoding="utf-8"))
        assert conf["zero_optimization"]["stage"] == stage
        for key in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "gradient_clipping",
        ):
            assert conf[key] == "auto", key
        if stage == 3:  # else the final adapter would be empty slices (checkpoints.final_adapter_state)
            assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_accelerate_fsdp_config_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig

    conf = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"))
    assert str(conf.distributed_type).endswith("FSDP") and conf.fsdp_config["fsdp_version"] == 2
    assert conf.mixed_precision == "no"  # lorafit's training.precision decides


@pytest.mark.gpu
@pytest.mark.parametrize("launcher", ["fsdp", "zero3"])
def test_launchers_on_two_gpus(tmp_path, tiny_chat_model, launcher):
    """The same commands on GPUs (nccl): the CPU tests above run the same lorafit code over gloo."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs; the CPU tests above run the same code path over gloo")
    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        name=launcher,
        n_train=8,
        training=dict(DEEPSPEED_TRAINING, micro_batch_size=2, precision="bf16"),
    )
    if launcher == "fsdp":
        cmd = _fsdp_cmd(config)
    else:
        cmd = [
            *ACCELERATE,
            "--num_processes",
            "2",
            "--use_deepspeed",
            "--deepspeed_config_file",
            str(ROOT / "configs" / "deepspeed" / "zero3.json"),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "lorafit.cli",
            "train",
            str(config),
            "--quiet",
        ]
    _ok(_run(cmd, tmp_path))
    run = tmp_path / "runs" / launcher
    assert sorted(train_losses(run)) == list(range(1, DEEPSPEED_STEPS + 1))
    assert all(t.numel() > 0 for t in adapter_tensors(run / "adapter").values())
