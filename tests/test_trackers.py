"""Experiment trackers (`training.report_to`), each run for real and offline: no account, no network.

TensorBoard is checked by tests/test_train.py::test_cli_train_end_to_end (event files in the run directory).
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, cli_env, lorafit_cmd, tiny_config, train_losses

from lorafit.config import load_config


def _train(tmp_path: Path, model_dir: Path, tracker: str, **env) -> Path:
    config = tiny_config(
        tmp_path,
        model_dir,
        name=tracker,
        n_train=8,
        training={"max_steps": 2, "logging_steps": 1, "report_to": [tracker]},
    )
    done = subprocess.run(
        lorafit_cmd("train", str(config), "--quiet"),
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(cli_env(), **env),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / tracker
    assert sorted(train_losses(run)) == [1, 2]
    return run


def _wandb_history(path: Path) -> list[dict]:
    """The history records of an offline W&B run file: a LevelDB-style log (7-byte header, 32 KiB blocks, records of
    checksum/length/type + a protobuf `Record`). wandb no longer ships a reader for it."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(chunks)
            chunks = b""
    history = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return history


def test_wandb_offline_logs_every_step(tmp_path, tiny_chat_model):
    run = _train(
        tmp_path,
        tiny_chat_model,
        "wandb",
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
        WANDB_SILENT="true",
        WANDB_PROJECT="lorafit-test",
    )
    [run_file] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = {int(r["train/global_step"]): r["train/loss"] for r in _wandb_history(run_file) if "train/loss" in r}
    assert logged == pytest.approx(train_losses(run), rel=1e-6)  # the losses of metrics.jsonl, step by step


def test_mlflow_offline_logs_every_step(tmp_path, tiny_chat_model, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 warns users off the file store, still reads it
    store = f"file://{tmp_path / 'mlruns'}"  # a local store: mlflow-skinny has no database backend
    run = _train(
        tmp_path,
        tiny_chat_model,
        "mlflow",
        MLFLOW_TRACKING_URI=store,
        MLFLOW_ALLOW_FILE_STORE="true",
        MLFLOW_EXPERIMENT_NAME="lorafit-test",
    )
    client = MlflowClient(store)
    [found] = client.search_runs([client.get_experiment_by_name("lorafit-test").experiment_id])
    assert found.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert logged == pytest.approx(train_losses(run), rel=1e-6)
    assert found.data.params["learning_rate"] == "0.005"  # the run's settings travel with it


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_is_refused_before_training(tmp_path, tiny_chat_model, monkeypatch, tracker):
    import importlib.util

    from lorafit.errors import ConfigError
    from lorafit.train.setup import check_training_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    cfg = load_config(tiny_config(tmp_path, tiny_chat_model, training={"report_to": [tracker]}))
    with pytest.raises(ConfigError, match=f"`{tracker}` needs the `{tracker}` package: pip install {tracker}"):
        check_training_config(cfg, has_validation=False)
