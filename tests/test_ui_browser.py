"""Every view of `lorafit ui` in real headless Debian chromium: Runs (overlay, report), a live run whose curve grows
and whose Stop button ends the training process, Data (check + pages), Train (field errors, plan, a real start that
trains and is stopped into a checkpoint), Chat (base and tuned streamed), and report.html at phone width.
Set LORAFIT_UI_SHOTS=DIR to keep a screenshot of each view (docs/ui/ holds the README's)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, tiny_config
from uikit import browser, serving, sleeper, write_metrics, write_run, write_status

SHOTS = os.environ.get("LORAFIT_UI_SHOTS")


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    yield pg
    context.close()


def test_runs_view_overlay_and_report(page, tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "first", steps=20)
    write_run(runs / "second", steps=30, scale=0.7)
    (runs / "first" / "report.html").write_text("<h1>report of first</h1>")
    with serving(runs, tmp_path) as (url, _):
        page.goto(url + "/#runs")
        page.wait_for_selector('tr[data-run="second"]')
        assert page.locator("#runs-table tr").count() == 3
        assert "1.25" in page.inner_text('tr[data-run="first"]')
        page.check('input.pick[value="first"]')
        page.check('input.pick[value="second"]')
        page.click("#overlay-btn")
        page.wait_for_selector("#overlay-chart path.series")
        assert page.locator("#overlay-chart path.series").count() == 2
        shot(page, "runs")
        with page.expect_popup() as popup:
            page.click('tr[data-run="first"] a[href$="report.html"]')
        popup.value.wait_for_selector("h1")
        assert popup.value.inner_text("h1") == "report of first"


def test_live_view_grows_and_stop_terminates(page, tmp_path):
    """A run written by another process (as from the CLI): the curve gains points as metrics.jsonl grows."""
    runs = tmp_path / "runs"
    run = write_run(runs / "live", steps=3, finished=False)
    proc = sleeper()
    write_status(run, proc.pid, step=3, max_steps=100)
    stop = threading.Event()

    def writer():
        step = 3
        while not stop.is_set() and step < 60:
            time.sleep(0.3)
            step += 1
            write_metrics(run, range(step, step + 1), with_eval=False)
            write_status(run, proc.pid, step=step, max_steps=100)

    feeder = threading.Thread(target=writer, daemon=True)
    try:
        with serving(runs, tmp_path) as (url, _):
            page.goto(url + "/#run/live")
            page.wait_for_selector("#run-chart circle")
            first = page.locator("#run-chart circle").count()
            feeder.start()
            page.wait_for_function(f"document.querySelectorAll('#run-chart circle').length >= {first + 4}")
            assert page.inner_text("#run-state") == "training"
            assert "/ 100" in page.inner_text("#run-cards")
            shot(page, "live")
            page.click("#stop-btn")
            page.wait_for_selector("#stop-msg:has-text('SIGTERM sent')")
            assert proc.wait(timeout=10) == -15
            page.wait_for_function("document.querySelector('#run-state').textContent === 'stopped'")
    finally:
        stop.set()
        proc.kill()


def test_data_view_checks_and_pages(page, tmp_path, tiny_chat_model):
    data = ROOT / "examples" / "train.jsonl"
    with serving(tmp_path / "runs", tmp_path) as (url, _):
        page.goto(url + "/#data")
        page.fill("#data-target", str(data))
        page.fill("#data-model", str(tiny_chat_model))
        page.click("#data-form button[type=submit]")
        page.wait_for_selector("#data-verdict")
        assert page.inner_text("#data-verdict") == "ok: the data can train"
        assert "messages" in page.inner_text("#data-sources")
        assert page.locator("#data-examples .ex").count() == 5
        assert page.locator("#data-examples .trained").count() >= 5
        assert "capital of Quillmoor" in page.inner_text("#data-examples .ex >> nth=0")
        page.click("#ex-next")
        page.wait_for_selector("#ex-range:has-text('examples 6–10 of 75')")
        assert page.inner_text("#data-examples .ex >> nth=0 >> span.sub").split(" · ")[0].endswith("train.jsonl:6")
        shot(page, "data")


def test_data_view_max_length_override(page, tmp_path, tiny_chat_model):
    """The max_length box re-checks the data at that length: rows longer than it are dropped, as training drops them."""
    with serving(tmp_path / "runs", tmp_path) as (url, _):
        page.goto(url + "/#data")
        page.fill("#data-target", str(ROOT / "examples" / "train.jsonl"))
        page.fill("#data-model", str(tiny_chat_model))
        page.click("#data-form button[type=submit]")
        page.wait_for_selector("#data-verdict")
        dropped = '.card[data-card="dropped: too long"] b'
        assert page.inner_text(dropped) == "0" and page.inner_text("#data-max") == "max_length 2048"
        page.fill("#data-max-length", "55")  # row 4 of the first page has 56 tokens
        page.click("#data-form button[type=submit]")
        page.wait_for_selector("#data-max:has-text('max_length 55')")
        cut = int(page.inner_text(dropped))
        assert 0 < cut < 75 and page.inner_text('.card[data-card="training samples"] b') == str(75 - cut)
        for k in range(5):  # each example says whether training keeps it at this length
            ex = page.locator("#data-examples .ex").nth(k)
            tokens = int(ex.locator("span.sub").inner_text().split(" · ")[1].split()[0])
            assert ("dropped: longer than max_length" in ex.inner_text()) == (tokens > 55), ex.inner_text()
        assert page.locator("#data-examples .ex.too_long").count() >= 1
        shot(page, "data-max-length")
        page.fill("#data-max-length", "20")  # nothing left: the check's refusal is shown, not a stale report
        page.click("#data-form button[type=submit]")
        page.wait_for_selector("#data-error:has-text('no training sample is left')")
        assert page.locator("#data-verdict").count() == 0


def test_train_view_field_errors_plan_start_and_stop(page, tmp_path, tiny_chat_model):
    """A real `lorafit train` started from the form, watched live, and stopped by the button into a checkpoint."""
    runs = tmp_path / "runs"
    config = tiny_config(
        tmp_path,
        tiny_chat_model,
        name="ui-run",
        n_train=16,
        training={"max_steps": 5000, "logging_steps": 1, "save_every": 1000},
    )
    with serving(runs, tmp_path) as (url, app):
        page.goto(url + "/#train")
        page.fill("#train-config", str(config))
        page.click("#train-load button[type=submit]")
        page.wait_for_selector('.field[data-field="lora.r"] input')
        page.fill('.field[data-field="lora.r"] input', "0")
        page.click("#validate-btn")
        page.wait_for_selector('.field.bad[data-field="lora.r"]')
        assert "greater than or equal to 1" in page.inner_text('.field[data-field="lora.r"] .problem')
        assert page.is_disabled("#start-btn")
        shot(page, "train-errors")
        page.fill('.field[data-field="lora.r"] input', "4")
        page.click("#validate-btn")
        page.wait_for_selector("#plan-line")
        assert "5000 optimizer steps" in page.inner_text("#plan-line")
        page.click("#start-btn")
        page.wait_for_url("**/#run/ui-run")
        points = "(document.querySelector('#run-chart path.series')?.getAttribute('d') || '').split('L').length"
        page.wait_for_function(f"() => {points} >= 3", timeout=50_000)
        seen = page.evaluate(f"() => {points}")
        page.wait_for_function(f"() => {points} > {seen}")  # the curve grows while the run trains
        assert page.inner_text("#run-state") == "training"
        shot(page, "train-live")
        page.click("#stop-btn")
        proc = app.state.ui.launcher.procs[0]
        assert proc.wait(timeout=40) == 128 + 15  # StopOnSignal: checkpoint saved, then exit 128+SIGTERM
    checkpoints = list((runs / "ui-run" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, (runs / ".ui-logs" / "ui-run.log").read_text()


def test_chat_view_base_and_tuned(page, tmp_path, tiny_run_dir):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "tiny")
    with serving(runs, tmp_path) as (url, _):
        page.goto(url + "/#chat/tiny")
        page.wait_for_selector("#chat-run option", state="attached")
        page.fill("#chat-max", "6")
        page.fill("#chat-input", "Tell me about Quillmoor.")
        page.click("#chat-send")
        page.wait_for_function(
            "!document.querySelector('#chat-send').disabled && document.querySelector('#chat-tuned .answer')"
        )
        page.wait_for_function("!document.querySelector('#chat-send').disabled")
        base, tuned = page.inner_text("#chat-base .answer"), page.inner_text("#chat-tuned .answer")
        assert base.strip() and tuned.strip()
        assert base != tuned  # the adapter (non-zero B weights) changes the answer
        assert page.inner_text("#chat-base .user") == "Tell me about Quillmoor."
        shot(page, "chat")


def test_report_html_reads_at_phone_width(chromium, tmp_path):
    from test_report import fake_run

    from lorafit.report import write_report

    report = write_report(fake_run(tmp_path / "run"))
    context = chromium.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    page.goto(report.as_uri())
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    assert page.locator("table.data td").count() > 0 and "<pre>{" not in page.content()
    shot(page, "report-phone")
    context.close()


def test_chat_view_tools_box_and_tool_calls(page, tmp_path, tiny_run_dir):
    """A tools file is checked (a broken one shows its error), sent with every answer, and a call the model makes is
    shown parsed and answered by the next line as the tool's result. A tiny random model makes no real call, so the
    call comes from `end_message` (what the server sends after a real answer) fed to the page."""
    import json

    from lorafit.config import DataSection, dump_config, load_config
    from lorafit.ui.chat import end_message

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "tiny")
    cfg = load_config(runs / "tiny" / "config.yaml")  # a tool-trained run: its rows offer the demo's three tools
    cfg.data = cfg.data.model_copy(update={"train": DataSection(train=str(ROOT / "examples/tools/train.jsonl")).train})
    (runs / "tiny" / "config.yaml").write_text(dump_config(cfg))
    (tmp_path / "tools.json").write_text((ROOT / "examples" / "tools" / "tools.json").read_text())
    (tmp_path / "broken.json").write_text('[{"name": "ferry_times",')
    sent = []
    with serving(runs, tmp_path) as (url, _):
        page.goto(url + "/#chat/tiny")
        page.wait_for_selector("#chat-tools-msg:has-text('(from the training data)')")
        assert "ferry_times, otter_census, book_lantern_hall" in page.inner_text("#chat-tools-msg")
        assert '"ferry_times"' in page.input_value("#chat-tools")
        page.fill("#chat-tools", "broken.json")
        page.click("#chat-tools-btn")
        page.wait_for_selector("#chat-tools-error:has-text('broken JSON')")
        assert str(tmp_path / "broken.json") in page.inner_text("#chat-tools-error")
        page.fill("#chat-tools", "tools.json")
        page.click("#chat-tools-btn")
        page.wait_for_selector("#chat-tools-msg:has-text('ferry_times, otter_census, book_lantern_hall')")
        assert page.inner_text("#chat-tools-error") == ""

        def watch(route):  # the real model answers; the request is kept to check what the page sent
            sent.append(route.request.post_data_json)
            route.continue_()

        page.route("**/answer", watch)
        page.fill("#chat-max", "3")
        page.fill("#chat-input", "When does the ferry leave Brindle?")
        page.click("#chat-send")
        page.wait_for_function("document.querySelectorAll('#chat-tuned .answer').length === 1")
        page.wait_for_function("!document.querySelector('#chat-send').disabled")
        assert [b["tools"] for b in sent] == ["tools.json", "tools.json"]
        assert "Error" not in page.inner_text("#chat-tuned .answer")
        page.unroute("**/answer")

        call = {"name": "ferry_times", "arguments": {"island": "Brindle", "day": "monday"}}
        text = "<tool_call>" + json.dumps(call) + "</tool_call>"  # the Hermes form SmolLM2's ChatML runs learn

        def calls(route):
            body = route.request.post_data_json
            sent.append(body)
            end = end_message(body["side"], text)
            route.fulfill(
                content_type="application/x-ndjson", body=json.dumps({"text": text}) + "\n" + json.dumps(end) + "\n"
            )

        page.route("**/answer", calls)
        page.fill("#chat-input", "And on monday?")
        page.click("#chat-send")
        page.wait_for_function("document.querySelectorAll('#chat-tuned .call').length === 1")
        page.wait_for_function("!document.querySelector('#chat-send').disabled")
        shown = page.inner_text("#chat-tuned .call")
        assert "ferry_times" in shown and '"island":"Brindle"' in shown
        page.fill("#chat-input", "09:40 and 15:10")
        page.click("#chat-send")
        page.wait_for_function("document.querySelectorAll('#chat-base .result').length === 1")
        page.wait_for_function("!document.querySelector('#chat-send').disabled")
        history = sent[-1]["history"]
        assert history[-1] == {"role": "tool", "content": "09:40 and 15:10"}
        assert history[-2]["tool_calls"][0]["function"] == call and history[-2]["content"] == ""
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant", "tool"]
        shot(page, "chat-tools")
