"""Preference data for DPO: read -> validate -> render with lorafit's template -> split prompt/answers on token ids.

Each pair becomes `prompt_ids`, `chosen_ids`, `rejected_ids` (the columns TRL's DPO collator joins): the
conversation prompt+answer is encoded by the same Encoder as supervised data (data/encode.py), with the last
assistant turn trained, so the prompt is exactly the tokens before the answer segment (BOS once, generation prompt
included) and each answer runs to its end-of-turn token. Nothing is cut mid-token: the answer is a segment of its
own, tokenized separately, as at inference where the prompt is tokenized alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorafit.data.encode import Encoder
from lorafit.data.preference import Pair, normalize_pair, preference_form
from lorafit.data.prepare import PreparedData, length_stats
from lorafit.data.readers import expand_source, read_rows
from lorafit.data.sources import MAX_LISTED, raise_for_problems
from lorafit.data.special_tokens import IGNORE_INDEX
from lorafit.data.templates import resolve_template
from lorafit.errors import DataError

FORM_HINT = "prompt+chosen+rejected | conversations+chosen+rejected | chosen+rejected conversations"


@dataclass
class PreferenceSource:
    path: str
    format: str | None
    pairs: list[tuple[str, Pair]]  # (loc, pair) of every valid row
    rows: int = 0
    invalid: int = 0
    weight: float = 1.0
    problems: list[str] = field(default_factory=list)  # the first MAX_LISTED, as "loc: `field`: reason"
    unused: dict[str, int] = field(default_factory=dict)


def _mapped(row: dict, columns: dict) -> dict:
    return {columns.get(k, k): v for k, v in row.items()} if columns else row


def looks_preference(spec) -> bool:
    """Whether a source's first readable row is a preference pair (`chosen` and `rejected`)."""
    if spec.format == "preference":
        return True
    if spec.format != "auto":
        return False
    for f in expand_source(spec.path):
        if f.startswith("hub:"):  # not downloaded just to look; a Hub preference set needs `format: preference`
            return False
        for _, row, _ in read_rows(f, spec.split):
            if row is not None:
                return preference_form(_mapped(row, spec.columns)) is not None
    return False


def read_preference_source(spec) -> PreferenceSource:
    """Every row of a source as a Pair; invalid rows are counted and the first ones named by file:line."""
    if spec.format not in ("auto", "preference"):
        raise DataError(
            f"`data.train[].format: {spec.format}` ({spec.path}) is not preference data, and `training.method: dpo` "
            "trains on chosen/rejected pairs.",
            "Use `format: preference` (or auto) with rows that have `chosen` and `rejected`.",
        )
    source = PreferenceSource(spec.path, "preference", [], weight=spec.weight)
    for f in expand_source(spec.path):
        for loc, row, problem in read_rows(f, spec.split):
            source.rows += 1
            found = [f"(row): {problem}"] if problem is not None else []
            if row is not None:
                row = _mapped(row, spec.columns)
                form = preference_form(row)
                if form is None:
                    found = [f"(row): not a preference pair: keys {sorted(row)[:8]} (expected {FORM_HINT})"]
                else:
                    pair = normalize_pair(row, form)
                    found = [f"`{fld}`: {reason}" for fld, reason in pair.problems]
                    for name in pair.unused:
                        source.unused[name] = source.unused.get(name, 0) + 1
                    if not found:
                        source.pairs.append((loc, pair))
            if found:
                source.invalid += 1
                source.problems += [f"{loc}: {p}" for p in found][: max(0, MAX_LISTED - len(source.problems))]
    return source


def encode_pairs(encoder: Encoder, pairs: list[Pair]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of each pair, split where the trained answer segment starts."""
    conversations = []
    for p in pairs:
        conversations += [
            p.prompt + [{"role": "assistant", "content": p.chosen}],
            p.prompt + [{"role": "assistant", "content": p.rejected}],
        ]
    encoded = encoder.encode_batch(conversations, [None] * len(conversations)) if conversations else []
    out = []
    for k in range(0, len(encoded), 2):
        prompt_c, chosen = split_answer(*encoded[k])
        prompt_r, rejected = split_answer(*encoded[k + 1])
        if prompt_c != prompt_r:  # the same turns render the same way; a template that does not is refused
            raise DataError(
                "the chat template renders the same prompt differently before two answers, so a preference pair "
                "has no common prompt.",
                "Use `data.template: llama3`, or a tokenizer whose chat template renders prefixes stably.",
            )
        out.append((prompt_c, chosen, rejected))
    return out


def split_answer(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, answer): the answer is the trained span (to its end-of-turn token); template glue after it is dropped."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return ids, []
    return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, truncation: str):
    """The length policy on a pair: (prompt, chosen, rejected, status) with status ok, truncated or too_long."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, "ok"
    room = max_length - len(prompt)
    if truncation != "right" or room < 1:
        return prompt, chosen, rejected, "too_long"
    return prompt, chosen[:room], rejected[:room], "truncated"


def tokenize_pairs(pairs, encoder: Encoder, data_cfg) -> tuple[dict, dict, list[int]]:
    """Token columns of the pairs kept by the length policy, counts per status, and every pair's full length."""
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    counts = {"ok": 0, "truncated": 0, "too_long": 0}
    lengths = []
    for start in range(0, len(pairs), 256):
        for prompt, chosen, rejected in encode_pairs(encoder, pairs[start : start + 256]):
            lengths.append(len(prompt) + max(len(chosen), len(rejected)))
            prompt, chosen, rejected, status = fit_pair(
                prompt, chosen, rejected, data_cfg.max_length, data_cfg.truncation
            )
            counts[status] += 1
            if status != "too_long":
                columns["prompt_ids"].append(prompt)
                columns["chosen_ids"].append(chosen)
                columns["rejected_ids"].append(rejected)
    return columns, counts, lengths


def _dataset(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns) if columns["prompt_ids"] else None


def prepare_preferences(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Read, validate, encode and split preference pairs; `train` and `validation` hold the three id columns."""
    if not data_cfg.train:
        raise DataError("no training data: `data.train` is empty.", "Set `data.train: path/to/pairs.jsonl`.")
    train_sources = [read_preference_source(s) for s in data_cfg.train]
    val_sources = [read_preference_source(s) for s in data_cfg.validation]
    if not data_cfg.skip_invalid:
        raise_for_problems(train_sources, "training")
        raise_for_problems(val_sources, "validation")
    if not any(s.pairs for s in train_sources):
        raise_for_problems(train_sources, "training")
        raise DataError("no valid preference pairs in the training data.")
    template = resolve_template(tokenizer, data_cfg.template)
    encoder = Encoder(tokenizer, template, "last_assistant", data_cfg.system_prompt)
    train_pairs = [p for s in train_sources for _, p in s.pairs]
    val_pairs = [p for s in val_sources for _, p in s.pairs]
    if not val_pairs and data_cfg.val_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(train_pairs))
        n_val = max(1, int(round(data_cfg.val_fraction * len(train_pairs))))
        if n_val >= len(train_pairs):
            raise DataError(f"`data.val_fraction: {data_cfg.val_fraction}` leaves no training pair.")
        val_pairs = [train_pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [train_pairs[i] for i in sorted(order[n_val:])]
    columns, counts, lengths = tokenize_pairs(train_pairs, encoder, data_cfg)
    train = _dataset(columns)
    if train is None:
        raise DataError(
            f"no training pair is left: all {counts['too_long']} are longer than max_length {data_cfg.max_length}.",
            "Raise `data.max_length`, or set `data.truncation: right`.",
        )
    val_columns, _, _ = tokenize_pairs(val_pairs, encoder, data_cfg) if val_pairs else ({"prompt_ids": []}, 0, 0)
    validation = _dataset(val_columns)
    stats = _stats(train_sources, val_sources, counts, columns, validation, template, data_cfg, lengths)
    return PreparedData(train, validation, stats, template, np.asarray(lengths))


def _stats(train_sources, val_sources, counts, columns, validation, template, data_cfg, lengths) -> dict:
    unused: dict[str, int] = {}
    for s in train_sources + val_sources:
        for name, rows in s.unused.items():
            unused[name] = unused.get(name, 0) + rows
    answer_tokens = sum(len(c) + len(r) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"]))
    total = answer_tokens + 2 * sum(len(p) for p in columns["prompt_ids"])
    return {
        "method": "dpo",
        "sources": [{"path": s.path, "format": s.format, "rows": s.rows, "invalid": s.invalid} for s in train_sources],
        "validation_sources": [
            {"path": s.path, "format": s.format, "rows": s.rows, "invalid": s.invalid} for s in val_sources
        ],
        "rows_read": sum(s.rows for s in train_sources),
        "invalid": sum(s.invalid for s in train_sources),
        "invalid_examples": [p for s in train_sources for p in s.problems][:MAX_LISTED],
        "dropped_too_long": counts["too_long"],
        "dropped_no_trained_token": 0,
        "truncated": counts["truncated"],
        "unused_columns": dict(sorted(unused.items(), key=lambda kv: (-kv[1], kv[0]))),
        "train_samples": len(columns["prompt_ids"]),
        "validation_samples": len(validation) if validation is not None else 0,
        "trained_tokens": answer_tokens,
        "total_tokens": total,
        "trained_fraction": round(answer_tokens / max(1, total), 4),
        "length": length_stats(np.asarray(lengths)),
        "max_length": data_cfg.max_length,
        "template": template,
        "train_on": "chosen and rejected answers",
    }
