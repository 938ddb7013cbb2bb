"""`lorafit ui`'s JSON endpoints over plain HTTP: runs and their numbers, Stop, files that may and may not be served,
the data check and its pages, the config form's field errors and planned steps."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, tiny_config
from starlette.testclient import TestClient
from uikit import sleeper, write_run, write_status

from lorafit.ui.server import build_app


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs"
    write_run(folder / "alpha", steps=20)
    write_run(folder / "beta", steps=8, finished=False)
    (folder / "beta" / "report.html").write_text("<p>beta report</p>")
    (tmp_path / "secret.txt").write_text("not for the browser")
    return folder


@pytest.fixture
def client(runs, tmp_path):
    return TestClient(build_app(runs, root=tmp_path), base_url="http://127.0.0.1")


def test_runs_list_key_numbers(client):
    rows = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"]["state"] == "finished" and rows["alpha"]["train_loss"] == 1.25
    assert rows["alpha"]["steps"] == 20 and rows["alpha"]["peak_memory_bytes"] == 3 * 2**30
    # an unfinished run without a live process: numbers from metrics.jsonl
    assert rows["beta"]["state"] == "incomplete" and rows["beta"]["steps"] == 8
    assert rows["beta"]["train_loss"] == pytest.approx(3.0 / 8**0.5) and rows["beta"]["report"] is True


def test_run_detail_curves(client):
    r = client.get("/api/runs/alpha").json()
    assert len(r["train"]) == 20 and [v[0] for v in r["validation"]] == [5, 10, 15, 20]
    assert r["live"]["tokens_per_second"] == 820.0 and r["summary"]["steps"] == 20


def test_live_numbers_and_stop_sends_sigterm(client, runs):
    proc = sleeper()
    try:
        write_status(runs / "beta", proc.pid, step=8, max_steps=40, elapsed=16)
        live = client.get("/api/runs/beta").json()["live"]
        assert live["state"] == "training" and live["max_steps"] == 40
        assert live["eta_seconds"] == pytest.approx(16 / 8 * 32, rel=0.05)  # 2 s a step, 32 steps left
        assert live["memory_bytes"] == 2**30
        assert client.post("/api/runs/beta/stop", json={}).json()["pid"] == proc.pid
        assert proc.wait(timeout=10) == -15  # SIGTERM: what the training's checkpoint-and-stop handler catches
    finally:
        proc.kill()
    assert client.get("/api/runs/beta").json()["live"]["state"] == "stopped"
    refused = client.post("/api/runs/beta/stop", json={})
    assert refused.status_code == 404 and "not training now" in refused.json()["error"]


def test_files_only_from_inside_a_run(client):
    assert client.get("/runs/beta/report.html").text == "<p>beta report</p>"
    for escape in (
        "/runs/beta/..%2F..%2Fsecret.txt",
        "/runs/beta/%2E%2E/%2E%2E/secret.txt",
        "/runs/beta/%2Fetc%2Fpasswd",
        "/runs/..%2F/secret.txt",
        "/runs/beta/../../secret.txt",
    ):
        r = client.get(escape)
        assert r.status_code == 404 and "not for the browser" not in r.text, escape
    assert client.get("/api/runs/..").status_code == 404
    assert client.get("/api/runs/%2Fetc").status_code == 404


def test_local_only_and_json_commands(client):
    assert client.get("/api/runs", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    r = client.post("/api/runs/alpha/stop", content="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_data_check_and_examples(client, tiny_chat_model):
    data = str(ROOT / "examples" / "train.jsonl")
    refused = client.get("/api/data/examples", params={"target": data})
    assert refused.status_code == 400 and "not been opened" in refused.json()["error"]
    report = client.post("/api/data/check", json={"target": data, "model": str(tiny_chat_model)}).json()
    assert report["ok"] and report["train_samples"] == 75 and report["examples"] == 75
    assert report["sources"][0]["format"] == "messages" and sum(b["count"] for b in report["histogram"]) == 75
    page = client.get("/api/data/examples", params={"target": data, "start": 70, "count": 10}).json()
    assert page["start"] == 70 and len(page["examples"]) == 5 and page["total"] == 75
    spans = page["examples"][0]["spans"]
    assert page["examples"][0]["loc"].endswith("train.jsonl:71")
    assert any(s["trained"] for s in spans) and any(not s["trained"] for s in spans)
    missing = client.post("/api/data/check", json={"target": "nope/missing.jsonl"})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]


def test_invalid_rows_are_listed(client, tmp_path, tiny_chat_model):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + '{"messages": 3}\n' + json.dumps(good) + "\n")
    report = client.post("/api/data/check", json={"target": str(bad), "model": str(tiny_chat_model)}).json()
    assert report["ok"] is False and report["invalid"] == 1
    assert report["invalid_examples"][0].startswith(f"{bad}:2")
    assert report["duplicates"] == 1


def test_train_form_field_errors_and_plan(client, tmp_path, tiny_chat_model, runs):
    config = tiny_config(
        tmp_path, tiny_chat_model, name="fresh", n_train=16, training={"max_steps": -1, "epochs": 2, "min_steps": 0}
    )
    form = client.get("/api/train/form", params={"config": str(config)}).json()
    fields = {f["name"]: f for f in form["fields"]}
    assert fields["lora.r"]["value"] == "4" and fields["training.lr_scheduler"]["kind"] == "choice"
    assert fields["data.packing"]["kind"] == "bool" and fields["output.dir"]["value"] == str(runs)
    bad = client.post(
        "/api/train/validate",
        json={"config": str(config), "changes": {"lora.r": "0", "training.learning_rate": "fast", "lora.alpha": "8"}},
    ).json()
    assert bad["ok"] is False and set(bad["fields"]) == {"lora.r", "training.learning_rate"}
    assert "greater than or equal to 1" in bad["fields"]["lora.r"]
    good = client.post("/api/train/validate", json={"config": str(config), "changes": {}}).json()
    assert good["ok"] and good["plan"]["train_samples"] == 16
    assert good["plan"]["steps"] == 2 * 8  # 16 samples, 2 per step, 2 epochs (the small-data floor off)
    assert good["plan"]["samples_per_step"] == 2 and good["plan"]["schedule_line"].startswith("schedule: 16 samples")
    taken = client.post("/api/train/validate", json={"config": str(config), "changes": {"output.name": "alpha"}}).json()
    assert not taken["ok"] and "exists" in taken["fields"]["output.name"]
