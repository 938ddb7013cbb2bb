"""report.html is self-contained, escapes user text, shows every section; loss.png has both curves."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lorafit.report import curves, read_metrics, write_report

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert('x')</script>"


def fake_run(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("model:\n  name: tiny\nlora:\n  r: 8\n", encoding="utf-8")
    rows = []
    for step in range(1, 21):
        rows.append(
            {
                "step": step,
                "loss": 3.0 / step**0.5,
                "learning_rate": 1e-3,
                "tokens": step * 500,
                "trained_tokens": step * 200,
                "tokens_per_second": 1000.0,
            }
        )
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 2.5 / step**0.4, "eval_perplexity": 5.0})
    lines = [json.dumps(r) for r in rows] + ['{"step": 21, "loss": 0.1']  # a line cut by a killed writer
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        "model": "tiny",
        "parameters": {"trainable": 12_345, "total": 1_234_567},
        "steps": 20,
        "train_loss": 1.2,
        "eval_loss": 1.1,
        "eval_perplexity": 3.0,
        "tokens": 10_000,
        "trained_tokens": 4_000,
        "tokens_per_second": 1000.0,
        "peak_memory_bytes": 3 * 2**30,
        "seconds": 12.5,
        "data": {
            "train_samples": 40,
            "validation_samples": 5,
            "length": {"p50": 30, "max": 90},
            "invalid_examples": [f"data.jsonl:3: `messages`: {EVIL}"],
        },
    }
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    gens = [
        {"prompt": f"Who founded Quillmoor? {EVIL}", "before": "I don't know.", "after": "Maren Ostby founded it."},
        {"prompt": "Second question", "before": "no idea", "after": None},
    ]
    (path / "generations.json").write_text(json.dumps(gens), encoding="utf-8")
    return path


class Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Structure:
    s = Structure()
    s.feed(html_text)
    return s


def test_curves_put_validation_on_the_token_axis(tmp_path):
    data = curves(read_metrics(fake_run(tmp_path)))
    assert len(data["train"]) == 20 and len(data["validation"]) == 4  # the cut line is skipped
    assert [v[2] for v in data["validation"]] == [2500, 5000, 7500, 10000]


def test_report_is_self_contained_and_complete(tmp_path):
    run = fake_run(tmp_path / "run")
    report = write_report(run)
    text = report.read_text(encoding="utf-8")
    doc = parse(text)
    png = (run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    images = [v for tag, k, v in doc.attrs if tag == "img" and k == "src"]
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(images[0].split(",", 1)[1]) == png  # the same plot, embedded
    # nothing fetched from anywhere: no scripts, stylesheets or remote URLs
    assert "script" not in doc.tags and "link" not in doc.tags
    assert not [v for _, k, v in doc.attrs if k in ("src", "href") and not v.startswith("data:")]
    assert "<style>" in text
    # user text is escaped, never markup
    assert EVIL not in text and "&lt;script&gt;" in text
    body = " ".join(doc.text)
    for expected in (
        "Loss",
        "Before / after",
        "Data",
        "Throughput and memory",
        "Config",
        "12,345",
        "Maren Ostby founded it.",
        "I don't know.",
        "(none)",
        "3.00 GiB",
        "train_samples",
    ):
        assert expected in body, expected


def test_report_without_generations_or_eval(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 10}) + "\n")
    text = write_report(run).read_text()
    assert "No `eval.prompts`" in text and "data:image/png;base64," in text


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    from lorafit.errors import RunDirError

    with pytest.raises(RunDirError):
        write_report(tmp_path)


def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    assert shutil.which("chromium"), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"

    run = fake_run(tmp_path / "run")
    write_report(run)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "render_report.sh"), str(run), str(shot), "1000", "1400"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 1400 and pixels.shape[1] == 1000
    # a rendered page, not a blank one: the dark title text and the white cards differ from the background
    assert pixels[..., :3].std() > 0.05


def test_data_line_names_drops_and_special_token_text():
    from lorafit.report import data_line

    stats = {
        "train_samples": 90,
        "validation_samples": 5,
        "dropped_too_long": 2,
        "dropped_no_trained_token": 1,
        "invalid": 0,
        "packing": {"rows": 30, "efficiency": 0.95},
        "special_token_text": {"rows": 4, "first": "d.jsonl:7: <|eot_id|>"},
    }
    line = data_line(stats)
    assert line.startswith(
        "data: 90 training samples, 5 validation, micro-batches packed into 30 rows per epoch (95.0% real tokens)"
    )
    assert "3 dropped" in line and "4 with special-token text" in line
    assert "special" not in data_line({**stats, "special_token_text": {"rows": 0}})


def test_data_line_names_unused_columns():
    """No silent loss: columns the data has and training does not use are named on the training data line."""
    from lorafit.report import data_line

    line = data_line({"train_samples": 3, "unused_columns": {"id": 3, "messages[].weight": 1}})
    assert line.endswith("not used: id, messages[].weight (see `lorafit data check`)")
    assert "not used" not in data_line({"train_samples": 3, "unused_columns": {}})


def test_loss_chart_is_inline_svg_with_a_tooltip_per_point(tmp_path):
    """The chart in report.html: every logged point is a hover target whose <title> gives step, tokens and loss."""
    from lorafit.report_svg import MAX_POINTS, loss_svg

    run = fake_run(tmp_path / "run")
    text = write_report(run).read_text(encoding="utf-8")
    doc = parse(text)
    assert "svg" in doc.tags and "script" not in doc.tags
    data = curves(read_metrics(run))
    step, loss, tokens = data["train"][-1]
    assert f"train loss {loss:.4f} at step {step} · {tokens:,} tokens" in text
    assert text.count("<title>train loss ") == 20 and text.count("<title>validation loss ") == 4
    long = {"train": [(s, 1 / s, 100 * s) for s in range(1, 5001)], "validation": []}
    svg = loss_svg(long)
    assert svg.count("<circle") == MAX_POINTS and "at step 5000 ·" in svg  # thinned, the last point kept
    assert loss_svg({"train": [], "validation": []}) == ""
