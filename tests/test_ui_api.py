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


def test_chat_tools_reach_the_prompt_as_in_lorafit_chat(tmp_path, tiny_run_dir):
    """Tools from the Chat view's box render into the prompt token for token as `lorafit chat RUN --tools FILE` does,
    and a call with its result continues the conversation as the CLI continues it."""
    import io
    import shutil

    from lorafit.data.templates import encode_prompt, with_system
    from lorafit.inference.chat import chat
    from lorafit.inference.tool_calls import call_message, read_tools_file

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "tiny")
    client = TestClient(build_app(runs, root=ROOT), base_url="http://127.0.0.1")
    client.get("/api/chat/tiny")
    loaded = client.app.state.ui.chat.loaded["tiny"]
    prompts, generate = [], loaded.model.generate
    loaded.model.generate = lambda **kw: prompts.append(kw["input_ids"][0].tolist()) or generate(**kw)
    tools_file = ROOT / "examples" / "tools" / "tools.json"
    tools = read_tools_file(str(tools_file))
    question = "When does the ferry leave Brindle on monday?"

    def answer(history, tools_box):
        body = {"side": "tuned", "history": history, "system": "Be brief.", "max_new_tokens": 2, "tools": tools_box}
        r = client.post("/api/chat/tiny/answer", json=body)
        assert r.status_code == 200, r.text
        assert "error" not in json.loads(r.text.strip().splitlines()[-1])
        return prompts[-1]

    def expected(history, with_tools):
        spec = tools if with_tools else None
        rendered = with_system(history, "Be brief.")
        return encode_prompt(loaded.tokenizer, rendered, loaded.template, spec, loaded.tools_in_user_message)

    user = [{"role": "user", "content": question}]
    by_path = answer(user, "examples/tools/tools.json")  # relative to the folder the UI was started in
    assert by_path == expected(user, True) and "ferry_times" in loaded.tokenizer.decode(by_path)
    assert answer(user, tools_file.read_text()) == by_path  # pasted JSON: the same prompt
    assert answer(user, "") == expected(user, False) != by_path
    cli_in = io.StringIO(question + "\n")
    chat(
        str(runs / "tiny"),
        "Be brief.",
        2,
        input_stream=cli_in,
        output=io.StringIO(),
        loaded=loaded,
        tools_file=str(tools_file),
    )
    assert prompts[-1] == by_path  # what `lorafit chat RUN --system "Be brief." --tools FILE` sends the model
    call = {"name": "ferry_times", "arguments": {"island": "Brindle", "day": "monday"}}
    turns = user + [call_message(call), {"role": "tool", "content": "09:40 and 15:10"}]
    assert answer(turns, str(tools_file)) == expected(turns, True)


def test_chat_tools_box_errors(client, tmp_path):
    good = tmp_path / "tools.json"
    good.write_text((ROOT / "examples" / "tools" / "tools.json").read_text())
    names = client.post("/api/tools/check", json={"tools": "tools.json"}).json()["tools"]
    assert names == ["ferry_times", "otter_census", "book_lantern_hall"]
    assert client.post("/api/tools/check", json={"tools": ""}).json()["tools"] == []
    (tmp_path / "broken.json").write_text('[{"name": "x",')
    (tmp_path / "nameless.json").write_text('[{"description": "no name"}]')
    for box, words in (
        ("broken.json", "broken JSON"),
        ("nameless.json", "nameless.json: `tools[0]"),
        ("missing.json", "does not exist"),
        ('[{"name": 3}]', "the pasted tools"),
    ):
        r = client.post("/api/tools/check", json={"tools": box})
        assert r.status_code == 400 and words in r.json()["error"], (box, r.json())
    refused = client.post("/api/chat/alpha/answer", json={"history": [{"role": "user", "content": "hi"}], "tools": "x"})
    assert refused.status_code == 400 and "does not exist" in refused.json()["error"]


def test_data_check_max_length_override(client, tiny_chat_model):
    data = str(ROOT / "examples" / "train.jsonl")
    full = client.post("/api/data/check", json={"target": data, "model": str(tiny_chat_model)}).json()
    short = client.post("/api/data/check", json={"target": data, "model": str(tiny_chat_model), "max_length": "60"})
    short = short.json()
    assert full["dropped_too_long"] == 0 and short["max_length"] == 60
    assert 0 < short["dropped_too_long"] < 75 and short["train_samples"] == 75 - short["dropped_too_long"]
    pages = [client.get("/api/data/examples", params={"target": data, "start": k, "count": 50}).json() for k in (0, 50)]
    statuses = [e["status"] for p in pages for e in p["examples"]]
    assert len(statuses) == 75 and statuses.count("too_long") == short["dropped_too_long"]
    bad = client.post("/api/data/check", json={"target": data, "max_length": "-3"})
    assert bad.status_code == 400 and "`max_length`" in bad.json()["error"]
