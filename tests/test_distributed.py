"""`lorafit train CONFIG` under torchrun (DDP, gloo, 2 CPU processes) equals one process with the same global batch.

The CLI runs unchanged; a spy around `lorafit.train.loss.causal_lm_loss` records, per rank, which samples each
micro-batch held and its loss terms, so the test can check the sharding and the loss arithmetic.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import adapter_tensors, cli_env, metrics, tiny_config

SPY = """
import json, os
import lorafit.train.loss as loss_module


def install(trace_dir):
    real = loss_module.causal_lm_loss
    trace = os.path.join(trace_dir, f"rank{os.environ.get('RANK', '0')}.jsonl")

    def spy(model, inputs, num_items_in_batch=None, mode="chunked", **kwargs):
        loss, stats = real(model, inputs, num_items_in_batch=num_items_in_batch, mode=mode, **kwargs)
        if model.training:
            rows = [[t for t, m in zip(r.tolist(), mask.tolist()) if m]
                    for r, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
            with open(trace, "a") as f:
                f.write(json.dumps({"rows": rows, "loss_sum": float(stats["loss_sum"]), "count": int(stats["trained_tokens"]),
                                    "num_items": float(num_items_in_batch)}) + "\\n")
        return loss, stats

    loss_module.causal_lm_loss = spy

    import time
    import lorafit.train.setup as setup_module  # where the run calls prepare_data
    prepare = setup_module.prepare_data

    def timed_prepare(*args, **kwargs):
        started = time.time()
        out = prepare(*args, **kwargs)
        with open(os.path.join(trace_dir, f"prepare{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"start": started, "end": time.time()}, f)
        return out

    setup_module.prepare_data = timed_prepare
    return real
"""
LAUNCH = """
import os, sys
install(os.environ["LORAFIT_TRACE"])
from lorafit.cli import main

sys.argv = ["lorafit", *sys.argv[1:]]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trace(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _config(tmp_path: Path, model_dir: Path, name: str, micro_batch: int) -> Path:
    return tiny_config(
        tmp_path,
        model_dir,
        name=name,
        n_train=8,
        training={
            "epochs": 1,
            "max_steps": -1,
            "micro_batch_size": micro_batch,
            "learning_rate": 5e-2,
            "logging_steps": 1,
        },
    )


def _train_ddp(tmp_path: Path, model_dir: Path, procs: int = 2) -> tuple[Path, Path]:
    """`lorafit train CONFIG` under torchrun, through the real CLI entry point (with the spy installed)."""
    trace = tmp_path / "trace-ddp"
    trace.mkdir()
    cfg = _config(tmp_path, model_dir, "ddp", micro_batch=2)
    script = tmp_path / "spy_cli.py"
    script.write_text(SPY + LAUNCH, encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={procs}",
        "--nnodes=1",
        f"--master_port={_free_port()}",
        str(script),
        "train",
        str(cfg),
        "--quiet",
    ]
    env = dict(cli_env(), LORAFIT_TRACE=str(trace), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return tmp_path / "runs" / "ddp", trace


def _train_single(tmp_path: Path, model_dir: Path, monkeypatch) -> tuple[Path, Path]:
    """The reference: one process, micro-batch 4 = the DDP run's global batch (in this process: no start-up cost)."""
    import lorafit.train.loss
    import lorafit.train.setup
    from lorafit.config import load_config
    from lorafit.train.run import run_training

    trace = tmp_path / "trace-single"
    trace.mkdir()
    namespace: dict = {}
    exec(SPY, namespace)  # noqa: S102 - the same spy the DDP ranks run
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(
        lorafit.train.loss, "causal_lm_loss", lorafit.train.loss.causal_lm_loss
    )  # restored after the test
    monkeypatch.setattr(lorafit.train.setup, "prepare_data", lorafit.train.setup.prepare_data)
    namespace["install"](str(trace))
    run_training(load_config(_config(tmp_path, model_dir, "single", micro_batch=4)), quiet=True)
    return tmp_path / "runs" / "single", trace


@pytest.mark.slow
def test_torchrun_ddp_matches_single_process(tmp_path, tiny_chat_model, monkeypatch):
    ddp_run, ddp_trace = _train_ddp(tmp_path, tiny_chat_model)
    single_run, single_trace = _train_single(tmp_path, tiny_chat_model, monkeypatch)

    ranks = [_trace(ddp_trace, 0), _trace(ddp_trace, 1)]
    single = _trace(single_trace, 0)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2  # 8 samples, global batch 4: 2 steps each
    # Each rank sees its own shard: no sample twice, every sample once per epoch.
    seen = [tuple(r) for rank in ranks for step in rank for r in step["rows"]]
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) == {tuple(r) for step in single for r in step["rows"]}

    for step in range(2):
        a, b, one = ranks[0][step], ranks[1][step], single[step]
        # Same global batch in both runs, and the step's token count is the global one on every rank.
        assert sorted(a["rows"] + b["rows"]) == sorted(one["rows"])
        assert a["num_items"] == b["num_items"] == one["num_items"] == a["count"] + b["count"] == one["count"]
        ddp_loss = (a["loss_sum"] + b["loss_sum"]) / a["num_items"]
        assert ddp_loss == pytest.approx(one["loss_sum"] / one["num_items"], rel=1e-4)

    # What rank 0 logged is the global loss, and the trained adapters agree.
    logged = {r["step"]: r["loss"] for r in metrics(ddp_run) if "loss" in r}
    assert logged.keys() == {r["step"] for r in metrics(single_run) if "loss" in r} == {1, 2}
    for step, row in zip((1, 2), ranks[0]):
        expect = (row["loss_sum"] + ranks[1][step - 1]["loss_sum"]) / row["num_items"]
        assert logged[step] == pytest.approx(expect, rel=1e-3)
    ours, theirs = adapter_tensors(ddp_run / "adapter"), adapter_tensors(single_run / "adapter")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() < 1e-4, key

    # Token counts are the whole job's, not rank 0's share.
    ddp_summary, single_summary = (json.loads((r / "summary.json").read_text()) for r in (ddp_run, single_run))
    assert ddp_summary["tokens"] == single_summary["tokens"] > 0
    assert ddp_summary["trained_tokens"] == single_summary["trained_tokens"] == sum(step["count"] for step in single)

    # Rank 0 prepared the data (and wrote the Arrow cache) before rank 1 started on it.
    first, second = (json.loads((ddp_trace / f"prepare{r}.json").read_text()) for r in (0, 1))
    assert second["start"] >= first["end"]

    # Run files written once, by rank 0: one record per step, no stray run folder from rank 1.
    steps = [r["step"] for r in metrics(ddp_run) if "loss" in r]
    assert steps == [1, 2]
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"single", "ddp"}
    assert (ddp_run / "adapter" / "adapter_config.json").exists() and (ddp_run / "summary.json").exists()


FSDP2 = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, sys.argv[1])
from test_loss import batch, tiny_model
from lorafit.train.loss import causal_lm_loss

dist.init_process_group("gloo")
reference, model = tiny_model(), tiny_model()  # same seed: same weights
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)  # the root holds the embeddings, the final norm and the LM head (sharded DTensors)
inputs = batch([17, 9, 30])  # every rank the same batch, so averaged gradients equal one process's
loss, _ = causal_lm_loss(model, inputs, chunk_size=7)
loss.backward()
ref_loss, _ = causal_lm_loss(reference, inputs, mode="plain")
ref_loss.backward()
torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
assert got.keys() == expected.keys() and got
for name in got:
    torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
# A file per rank, not a printed line: the two ranks share one stdout pipe, and their writes can interleave.
(Path(sys.argv[2]) / f"ok{dist.get_rank()}").write_text("ok")
dist.destroy_process_group()
"""


def test_chunked_loss_under_fsdp2_matches_plain_loss(tmp_path):
    """FSDP (v2, fully_shard) keeps the LM head sharded: the loss gathers it and still gives the plain gradients."""
    script = tmp_path / "fsdp2_loss.py"
    script.write_text(FSDP2, encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
        str(Path(__file__).parent),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(cli_env(), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()  # both ranks got through every check


@pytest.mark.parametrize("name", ["llama31-8b-fsdp-8xh100", "llama31-8b-multinode"])
def test_distributed_presets_carry_their_launch_commands(name):
    import re

    from lorafit.config import load_config

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"-m lorafit.cli train configs/{name}.yaml" in header
    assert "torchrun" in header and "accelerate launch" in header
    cfg = load_config(root / "configs" / f"{name}.yaml")
    assert cfg.training.loss == "chunked" and cfg.data.packing
    ds = re.findall(r"configs/deepspeed/[\w.-]+\.json", header)
    assert ds, "a DeepSpeed alternative is named"
    for path in ds:
        conf = json.loads((root / path).read_text(encoding="utf-8"))
        assert conf["zero_optimization"]["stage"] in (2, 3)
        # Trainer fills "auto" from the lorafit config, so the JSON never contradicts it
        assert conf["train_micro_batch_size_per_gpu"] == conf["gradient_accumulation_steps"] == "auto"
