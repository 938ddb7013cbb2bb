"""The data pipeline in one call: read -> validate -> render/tokenize/mask -> length policy -> split -> mix -> pack.

Everything runs through `datasets` (Arrow files, memory-mapped, cached under the lorafit cache), so a
million rows are handled with bounded memory; the Python lists kept here are one int per sample.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lorafit.data.encode import Encoder, token_features, tokenize_rows
from lorafit.data.packing import best_fit_decreasing, pack_rows, packing_efficiency
from lorafit.data.sources import (
    MAX_LISTED,
    PIPELINE_VERSION,
    raise_for_problems,
    read_source,
    stable_hash,
    valid_rows,
)
from lorafit.data.templates import resolve_template
from lorafit.errors import DataError
from lorafit.hf_compat import dataset_fingerprint
from lorafit.paths import data_cache_dir

log = logging.getLogger("lorafit")
AUTO_PROC_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves
MAX_AUTO_PROCS = 8
ROWS_PER_BATCH = 500


@dataclass
class PreparedData:
    train: object  # datasets.Dataset: input_ids, labels (+ position_ids, seq_lengths when packed)
    validation: object | None
    stats: dict
    template: str
    lengths: np.ndarray | None = None  # token length of every valid training row, before the length policy


# -- tokenizing -----------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return stable_hash(body, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)


def tokenize_source_rows(rows, tokenizer, data_cfg, template: str, tok_fp: str):
    """input_ids, labels, length (before truncation), trained, status, source, loc for each valid row."""
    encoder = Encoder(tokenizer, template, data_cfg.train_on, data_cfg.system_prompt, data_cfg.tools_in_user_message)
    fp = stable_hash(
        "tok",
        PIPELINE_VERSION,
        dataset_fingerprint(rows),
        tok_fp,
        template,
        data_cfg.train_on,
        data_cfg.system_prompt,
        data_cfg.max_length,
        data_cfg.truncation,
        data_cfg.tools_in_user_message,
    )
    from datasets import Value

    features = token_features(
        {
            "length": Value("int32"),
            "n_tokens": Value("int32"),
            "trained": Value("int32"),
            "status": Value("string"),
            "digest": Value("int64"),
            "loc": Value("string"),
            "source": Value("int32"),
            "special": Value("string"),
        }
    )
    return rows.map(
        tokenize_rows,
        batched=True,
        batch_size=ROWS_PER_BATCH,
        fn_kwargs={"encoder": encoder, "max_length": data_cfg.max_length, "truncation": data_cfg.truncation},
        remove_columns=["messages", "text", "tools", "problems", "unused"],
        features=features,
        num_proc=worker_count(data_cfg.num_proc, len(rows)),
        new_fingerprint=fp,
        desc="tokenizing",
    )


def worker_count(setting: int | str, rows: int) -> int | None:
    """Tokenization processes for `rows` rows (None = in this process); each worker gets at least one batch."""
    if setting == "auto":
        if rows < AUTO_PROC_MIN_ROWS:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        setting = min(cores, MAX_AUTO_PROCS)
    setting = min(int(setting), max(1, rows // ROWS_PER_BATCH))
    return setting if setting > 1 else None


def status_masks(ds) -> dict[str, np.ndarray]:
    """One boolean array per status, computed in Arrow (a million Python strings would cost ~60 MB)."""
    import pyarrow.compute as pc

    column = ds.with_format("arrow")["status"]
    return {
        name: pc.equal(column, name).to_numpy(zero_copy_only=False).astype(bool) if len(ds) else np.zeros(0, bool)
        for name in ("ok", "truncated", "too_long", "no_trained")
    }


def _column(ds, name: str) -> np.ndarray:
    return ds.with_format("arrow")[name].to_numpy(zero_copy_only=False) if len(ds) else np.zeros(0)


# -- mixing and packing ---------------------------------------------------------------------------
def weighted_indices(indices: np.ndarray, sources: np.ndarray, weights: dict[int, float], rng) -> np.ndarray:
    """Each source sampled to weight x its size: whole repeats, plus a seeded sample for the fraction."""
    out = []
    for src, weight in weights.items():
        own = indices[sources[indices] == src]
        whole, frac = int(weight), weight - int(weight)
        out += [own] * whole
        extra = int(round(frac * len(own)))
        if extra:
            out.append(rng.choice(own, size=extra, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def pack_dataset(ds, lengths: list[int], capacity: int, seed: int):
    """Packed rows (input_ids, labels, position_ids, seq_lengths) and the packing efficiency; lengths[i] = len(ds[i])."""
    from datasets import Dataset, List, Value

    bins = best_fit_decreasing(lengths, capacity)
    order = np.random.default_rng(seed).permutation(len(bins))  # rows in random order, not sorted by fill
    bins = [bins[i] for i in order]
    efficiency = packing_efficiency(lengths, bins, capacity)
    table = Dataset.from_dict({"members": bins})
    fp = stable_hash("pack", dataset_fingerprint(ds), capacity, seed, PIPELINE_VERSION)
    features = token_features({"position_ids": List(Value("int32")), "seq_lengths": List(Value("int32"))})
    packed = table.map(
        partial(_gather_and_pack, source=ds),
        batched=True,
        batch_size=256,
        remove_columns=["members"],
        new_fingerprint=fp,
        features=features,
        cache_file_name=str(Path(data_cache_dir()) / f"packed-{fp}.arrow"),
        desc="packing",
    )
    return packed, efficiency


def _gather_and_pack(batch: dict, source) -> dict:
    flat = [i for members in batch["members"] for i in members]
    rows = source.select_columns(["input_ids", "labels"])[flat]
    member_ids, member_labels, at = [], [], 0
    for members in batch["members"]:
        member_ids.append(rows["input_ids"][at : at + len(members)])
        member_labels.append(rows["labels"][at : at + len(members)])
        at += len(members)
    return pack_rows({"member_ids": member_ids, "member_labels": member_labels})


# -- the pipeline ---------------------------------------------------------------------------------
def _pick_template(tokenizer, setting: str, formats: list[str | None]) -> str:
    """Raw text needs no chat format: a tokenizer without one is fine for text-only data."""
    try:
        return resolve_template(tokenizer, setting)
    except DataError:
        if all(f == "text" for f in formats):
            return "model"
        raise


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"p50": 0, "p95": 0, "max": 0, "mean": 0.0}
    return {
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }


def prepare_data(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Read every source, validate, tokenize with masks, apply the length policy, split, mix and pack."""
    import datasets

    # Our own one-line summaries replace datasets' per-stage progress bars (they flood training logs).
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    started = time.perf_counter()
    try:
        prepared = _prepare(data_cfg, tokenizer, seed)
    finally:
        if bars:
            datasets.enable_progress_bars()
    log.debug(
        "data: %s rows read, %s invalid, %s train samples%s in %.1f s",
        f"{prepared.stats['rows_read']:,}",
        f"{prepared.stats['invalid']:,}",
        f"{prepared.stats['train_samples']:,}",
        f" packed into {prepared.stats['packing']['rows']:,} rows" if "packing" in prepared.stats else "",
        time.perf_counter() - started,
    )
    return prepared


def _prepare(data_cfg, tokenizer, seed: int) -> PreparedData:
    if not data_cfg.train:
        raise DataError(
            "no training data: `data.train` is empty.", "Set `data.train: path/to/data.jsonl` in the config."
        )
    train_sources = [read_source(s, i) for i, s in enumerate(data_cfg.train)]
    val_sources = [read_source(s, len(train_sources) + i) for i, s in enumerate(data_cfg.validation)]
    if not data_cfg.skip_invalid:
        raise_for_problems(train_sources, "training")
        raise_for_problems(val_sources, "validation")
    template = _pick_template(tokenizer, data_cfg.template, [s.format for s in train_sources + val_sources])
    tok_fp = tokenizer_fingerprint(tokenizer)
    rng = np.random.default_rng(seed)

    _refuse_all_invalid(train_sources)
    train_tok = tokenize_source_rows(valid_rows(train_sources), tokenizer, data_cfg, template, tok_fp)
    status = status_masks(train_tok)
    keep = status["ok"] | status["truncated"]
    all_idx = np.arange(len(train_tok))
    val_tok, val_idx = None, None
    if val_sources:
        if sum(s.rows - s.invalid for s in val_sources) == 0:
            raise DataError("no valid validation rows.", "Check `data.validation`.")
        val_tok = tokenize_source_rows(valid_rows(val_sources), tokenizer, data_cfg, template, tok_fp)
        val_status = status_masks(val_tok)
        val_idx = np.flatnonzero(val_status["ok"] | val_status["truncated"])
        train_idx = all_idx
    elif data_cfg.val_fraction > 0:
        order = rng.permutation(len(all_idx))
        n_val = max(1, int(round(data_cfg.val_fraction * len(all_idx))))
        if n_val >= len(all_idx):
            raise DataError(
                f"`data.val_fraction: {data_cfg.val_fraction}` leaves no training rows out of {len(all_idx)}."
            )
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        val_idx = val_idx[keep[val_idx]]
        val_tok = train_tok
    else:
        train_idx = all_idx
    train_idx = train_idx[keep[train_idx]]
    if len(train_idx) == 0:
        raise DataError(
            _nothing_left_message(status, data_cfg),
            "Raise `data.max_length`, set `data.truncation: right`, or check that the rows have assistant answers.",
        )
    weights = {i: s.weight for i, s in enumerate(train_sources)}
    if any(w != 1.0 for w in weights.values()):
        train_idx = weighted_indices(train_idx, _column(train_tok, "source"), weights, rng)

    train = _select(train_tok, train_idx, "train")
    validation = _select(val_tok, val_idx, "val") if val_tok is not None and val_idx is not None else None
    stats = _stats(train_sources, val_sources, train_tok, status, train, validation, template, data_cfg)
    lengths = stats.pop("_lengths")
    for source in train_sources + val_sources:  # unmap the raw rows' Arrow files before packing touches the tokens
        source.dataset = None
    train, validation = _final_columns(train, validation, data_cfg, seed, stats)
    return PreparedData(train=train, validation=validation, stats=stats, template=template, lengths=lengths)


def _select(ds, idx: np.ndarray, split: str):
    """The rows `idx` of a tokenized dataset (an index view), fingerprinted by content; None when idx is empty."""
    if not len(idx):
        return None
    salt = () if split == "train" else (split,)  # the fingerprints earlier versions cached under
    return ds.select(idx, new_fingerprint=stable_hash(dataset_fingerprint(ds), *salt, idx.tobytes()))


def _refuse_all_invalid(train_sources) -> None:
    """Every training row invalid: an error naming them (file:line, reason), even with `data.skip_invalid`."""
    if sum(s.rows - s.invalid for s in train_sources) > 0:
        return
    try:
        raise_for_problems(train_sources, "training")
    except DataError as err:
        raise DataError(
            f"no valid training rows: every row is invalid. {err.message}",
            "Run `lorafit data check` on the data to see every problem.",
        ) from None
    raise DataError("no valid training rows: every row is invalid.", "Run `lorafit data check` on the data to see why.")


def _nothing_left_message(status: dict[str, np.ndarray], data_cfg) -> str:
    too_long = int(status["too_long"].sum())
    untrained = int(status["no_trained"].sum())
    return (
        f"no training sample is left: {too_long} longer than max_length {data_cfg.max_length} (dropped), "
        f"{untrained} with no trained token."
    )


def _final_columns(train, validation, data_cfg, seed: int, stats: dict):
    cols = ["input_ids", "labels"]
    if not data_cfg.packing:
        return train.select_columns(cols), validation.select_columns(cols) if validation is not None else None
    packed, efficiency = pack_dataset(
        train.select_columns(cols), _column(train, "n_tokens").tolist(), data_cfg.max_length, seed
    )
    stats["packing"] = {"efficiency": round(efficiency, 4), "rows": len(packed), "samples": len(train)}
    if validation is not None:
        validation, _ = pack_dataset(
            validation.select_columns(cols), _column(validation, "n_tokens").tolist(), data_cfg.max_length, seed
        )
        stats["packing"]["validation_rows"] = len(validation)
    return packed, validation


def _special_text(ds) -> dict:
    """Rows whose content holds special-token text, and the first of them (file:line and the token)."""
    import pyarrow.compute as pc

    if not len(ds):
        return {"rows": 0}
    found = np.flatnonzero(pc.not_equal(ds.with_format("arrow")["special"], "").to_numpy(zero_copy_only=False))
    if not len(found):
        return {"rows": 0}
    first = ds.select_columns(["loc", "special"])[int(found[0])]
    return {"rows": int(len(found)), "first": f"{first['loc']}: {first['special']}"}


def _unused_columns(sources) -> dict[str, int]:
    """Columns (and turn keys) of the data that training does not use, with the rows that have each."""
    out: dict[str, int] = {}
    for source in sources:
        for name, rows in source.unused.items():
            out[name] = out.get(name, 0) + rows
    return out


def _stats(train_sources, val_sources, train_tok, status, train, validation, template, data_cfg) -> dict:
    lengths = _column(train_tok, "length")
    digests = _column(train_tok, "digest")
    trained = _column(train, "trained").astype(np.int64)
    tokens = _column(train, "n_tokens").astype(np.int64)
    return {
        "sources": [
            {"path": s.path, "format": s.format, "rows": s.rows, "invalid": s.invalid, "weight": s.weight}
            for s in train_sources
        ],
        "validation_sources": [
            {"path": s.path, "format": s.format, "rows": s.rows, "invalid": s.invalid} for s in val_sources
        ],
        "rows_read": sum(s.rows for s in train_sources),
        "invalid": sum(s.invalid for s in train_sources),
        "invalid_examples": [p for s in train_sources for p in s.problems][:MAX_LISTED],
        "dropped_too_long": int(status["too_long"].sum()),
        "dropped_no_trained_token": int(status["no_trained"].sum()),
        "truncated": int(status["truncated"].sum()),
        "duplicates": int(len(digests) - len(np.unique(digests))),
        "special_token_text": _special_text(train_tok),
        "unused_columns": _unused_columns(train_sources + val_sources),
        "train_samples": len(train),
        "validation_samples": len(validation) if validation is not None else 0,
        "trained_tokens": int(trained.sum()),
        "total_tokens": int(tokens.sum()),
        "trained_fraction": round(float(trained.sum() / max(1, tokens.sum())), 4),
        "length": length_stats(lengths),
        "_lengths": lengths,
        "max_length": data_cfg.max_length,
        "template": template,
        "train_on": data_cfg.train_on,
    }
