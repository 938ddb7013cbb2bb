"""The Data view: `lorafit data check` on a file or config, and every valid example rendered as training sees it.

The check is data/check.py's `build_report` (the same dict `lorafit data check --json` prints); the pages of
examples are encoded by the same Encoder training uses, one row at a time, with the trained tokens marked and
training's length policy applied (max_length, truncation): a row training drops is shown with the reason.
A target is "opened" by checking it: only opened targets can be paged through afterwards.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.check import build_report, example_spans, load_target
from lorafit.data.encode import Encoder
from lorafit.data.sources import read_source, valid_rows
from lorafit.errors import DataError
from lorafit.paths import user_path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".txt")
PAGE_MAX = 50


@dataclass
class Opened:
    """A checked target: its report and what paging needs (rows, encoder, tokenizer)."""

    report: dict
    rows: object  # datasets.Dataset of the valid rows of every training source, in file order
    encoder: Encoder
    tokenizer: object
    truncation: str = "none"  # with report["max_length"], what training does to a long row


class DataViews:
    """The targets the user has opened in this UI session, by resolved path."""

    def __init__(self):
        self.opened: dict[str, Opened] = {}
        self.lock = threading.Lock()  # tokenizers and datasets are not for two threads at once

    def check(self, target: str, model: str | None = None, max_length: int | None = None) -> dict:
        from lorafit.models.tokenizer import load_tokenizer

        key = str(user_path(target).resolve())
        if not Path(key).exists():
            raise DataError(f"{target} does not exist.", "Type the path of a data file, a folder of them, or a config.")
        with self.lock:
            cfg, model_name, tokenizer_name = load_target(key, model, max_length)
            data_cfg = cfg.data
            report = build_report(data_cfg, model_name, tokenizer_name, cfg)
            tokenizer = load_tokenizer(model_name, tokenizer_name)
            rows = valid_rows([read_source(s, i) for i, s in enumerate(data_cfg.train)])
            encoder = Encoder(
                tokenizer, report["template"], data_cfg.train_on, data_cfg.system_prompt, data_cfg.tools_in_user_message
            )
            self.opened[key] = Opened(report, rows, encoder, tokenizer, data_cfg.truncation)
        return {"target": key, "examples": len(rows), **report}

    def examples(self, target: str, start: int = 0, count: int = 5) -> dict:
        key = str(user_path(target).resolve())
        opened = self.opened.get(key)
        if opened is None:
            raise DataError(f"{target} has not been opened in this session.", "Check it in the Data view first.")
        total = len(opened.rows)
        start = max(0, min(start, max(total - 1, 0)))
        stop = min(total, start + max(1, min(count, PAGE_MAX)))
        with self.lock:
            items = [
                example_spans(
                    opened.encoder, opened.tokenizer, opened.rows[k], opened.report["max_length"], opened.truncation
                )
                for k in range(start, stop)
            ]
        return {"target": key, "start": start, "total": total, "examples": items}


def candidates(root: Path, limit: int = 200) -> list[str]:
    """Data files and configs near the working directory, for the picker (the user may type any other path)."""
    found = []
    for pattern in ("*", "*/*", "*/*/*"):
        for path in sorted(root.glob(pattern)):
            parts = path.relative_to(root).parts
            if any(p.startswith(".") or p in ("runs", "node_modules", "src", "tests") for p in parts):
                continue
            if path.is_file() and path.suffix.lower() in DATA_SUFFIXES and path.name != "status.json":
                found.append(str(path.relative_to(root)))
            if len(found) >= limit:
                return found
    return found
