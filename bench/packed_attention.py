"""Packed attention on CPU: which kernel keeps samples apart without L x L memory, and how fast is it?

    PYTHONPATH=src python bench/packed_attention.py            # ~10 min on 2 cores; writes BENCHMARKS.md
    PYTHONPATH=src python bench/packed_attention.py --smoke    # tiny shapes, nothing written

Data: the packed rows lorafit makes from 200 Alpaca-like rows (bench/_alpaca.py) at max_length 1024 with the
embedded SmolLM2-135M's tokenizer; the first `--rows` rows form the micro-batch of the op measurements, the first
`--step-rows` that of the training step (a 4-row fp32 step of this model needs ~14 GB per process).
1. The attention op alone, forward + backward, SmolLM2-135M's shapes (9 query heads, 3 KV heads, head dim 64), fp32,
   for each candidate: transformers' sdpa with lorafit's former 4D block mask, eager with the same mask as an
   additive float, one sdpa call per sample (lorafit_sdpa), the same with sdpa's own GQA, length-bucketed padded
   batches (one causal sdpa per bucket), and flex_attention with a block mask (compiled).
2. One training micro-batch of the real model (LoRA r=16 all-linear, lorafit's loss), former path vs new: time and
   peak RSS, each in a fresh process.
Bytes saved for backward are counted with autograd's saved-tensor hooks (one count per storage, parameters excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
OPS = (
    "block_mask_sdpa",
    "block_mask_eager",
    "per_sample_sdpa",
    "per_sample_sdpa_gqa",
    "length_buckets",
    "flex_attention",
)
STEPS = ("former_sdpa", "lorafit_sdpa", "former_eager", "lorafit_eager")


# -- the candidates (attention op only) ---------------------------------------------------------------------------
def block_mask(rows: list[list[int]]):
    import torch

    width = max(sum(r) for r in rows)
    segment = torch.full((len(rows), width), -1)
    for b, row in enumerate(rows):
        start = 0
        for k, n in enumerate(row):
            segment[b, start : start + n] = k
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def op_candidate(name: str, rows: list[list[int]]):
    """(make_inputs, attention) for one candidate; attention(q, k, v) -> output."""
    import torch
    import torch.nn.functional as F

    lengths = [n for r in rows for n in r]
    total, width, groups = sum(lengths), max(sum(r) for r in rows), HEADS // KV_HEADS

    def rep(x):
        return x.repeat_interleave(groups, dim=1)

    def inputs(batch: int, length: int):
        def make(h):
            return torch.randn(batch, h, length, HEAD_DIM, requires_grad=True)

        return make(HEADS), make(KV_HEADS), make(KV_HEADS)

    if name.startswith("block_mask"):
        mask = block_mask(rows)
        if name == "block_mask_sdpa":
            return lambda: inputs(len(rows), width), lambda q, k, v: F.scaled_dot_product_attention(
                q, rep(k), rep(v), attn_mask=mask
            )
        additive = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)

        def eager(q, k, v):
            scores = torch.matmul(q, rep(k).transpose(2, 3)) * HEAD_DIM**-0.5 + additive
            return torch.matmul(torch.softmax(scores, dim=-1), rep(v))

        return lambda: inputs(len(rows), width), eager
    flat = lambda: inputs(1, total)  # noqa: E731
    if name == "per_sample_sdpa":
        return flat, lambda q, k, v: torch.cat(
            [
                F.scaled_dot_product_attention(a, b, c, is_causal=True)
                for a, b, c in zip(q.split(lengths, 2), rep(k).split(lengths, 2), rep(v).split(lengths, 2))
            ],
            2,
        )
    if name == "per_sample_sdpa_gqa":
        return flat, lambda q, k, v: torch.cat(
            [
                F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
                for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
            ],
            2,
        )
    if name == "length_buckets":
        return flat, lambda q, k, v: _buckets(q, rep(k), rep(v), lengths)
    if name == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask = create_block_mask(
            lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), 1, None, total, total, device="cpu"
        )
        compiled = torch.compile(flex_attention)
        return flat, lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=True)
    raise ValueError(name)


def _buckets(q, k, v, lengths: list[int], waste: float = 1.25):
    """Samples sorted by length, grouped while padding stays under `waste`, one right-padded causal sdpa per group."""
    import torch
    import torch.nn.functional as F

    pieces = [list(t) for t in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    order, groups, current = sorted(range(len(lengths)), key=lengths.__getitem__), [], []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > waste * (sum(lengths[j] for j in current) + lengths[i]):
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    out = [None] * len(lengths)
    for group in groups:
        m = max(lengths[i] for i in group)
        qkv = [torch.cat([F.pad(pieces[i][t], (0, 0, 0, m - lengths[i])) for i in group]) for t in range(3)]
        o = F.scaled_dot_product_attention(*qkv, is_causal=True)
        for j, i in enumerate(group):
            out[i] = o[j : j + 1, :, : lengths[i]]
    return torch.cat(out, 2)


def saved_bytes(fn, params=()):
    """Run fn() under saved-tensor hooks: (its result, bytes autograd keeps for backward, one count per storage)."""
    import torch

    skip, seen = {p.untyped_storage().data_ptr() for p in params}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def child_op(name: str, rows: list[list[int]], repeats: int) -> dict:
    make, attention = op_candidate(name, rows)
    try:
        q, k, v = make()
        attention(q, k, v).sum().backward()  # warm-up (and compile, for flex)
    except Exception as err:  # noqa: BLE001 - a candidate that cannot run is a result
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:140]}"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, saved = [], 0
    for _ in range(repeats):
        q, k, v = make()
        start = time.perf_counter()
        out, saved = saved_bytes(lambda q=q, k=k, v=v: attention(q, k, v))
        out.sum().backward()
        times.append(time.perf_counter() - start)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"ms": 1000 * min(times), "saved_mib": saved / 2**20, "rss_growth_mib": grew}


# -- one training micro-batch of the real model -------------------------------------------------------------------
def prepared(work: Path, max_length: int, samples: int = 200):
    from _alpaca import make_alpaca_like

    from lorafit.config import RunConfig
    from lorafit.data.packing import best_fit_decreasing
    from lorafit.data.prepare import prepare_data
    from lorafit.models.tokenizer import load_tokenizer

    data = work / "alpaca_like.jsonl"
    if not data.exists():
        make_alpaca_like(data, samples)
    cfg = RunConfig.model_validate(
        {
            "model": {"name": "smollm2-135m-instruct", "dtype": "fp32"},
            "data": {"train": [str(data)], "max_length": max_length, "packing": True},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        }
    )
    tokenizer = load_tokenizer(cfg.model.name)
    samples = prepare_data(cfg.data, tokenizer, seed=0).train
    # The rows packing makes of these samples (the collator packs each micro-batch the same way, best fit decreasing)
    bins = best_fit_decreasing([len(ids) for ids in samples["input_ids"]], max_length)
    return cfg, tokenizer, samples, bins


def child_step(name: str, work: Path, max_length: int, rows: int) -> dict:
    from lorafit.data.collate import make_collator
    from lorafit.models.attention import training_attention
    from lorafit.models.lora import attach_lora
    from lorafit.models.sources import load_base_model
    from lorafit.train.loss import causal_lm_loss

    kernel = name.split("_")[1]
    cfg, tokenizer, samples, bins = prepared(work, max_length)
    cfg.model.attn_implementation = kernel
    model = load_base_model(cfg.model)
    attention = training_attention(model, kernel) if name.startswith("lorafit") else kernel
    model = attach_lora(model, cfg.lora, gradient_checkpointing=False).train()
    features = [samples[j] for members in bins[:rows] for j in members]  # the samples of the first `rows` rows
    collate = make_collator(tokenizer, packed=True, attn_implementation=attention, max_length=max_length)
    batch = collate(features)
    batch.pop("seq_lengths", None)
    times, saved = [], 0
    for _ in range(2):  # the first step pays one-time costs; the second is timed
        start = time.perf_counter()
        (loss, _), saved = saved_bytes(lambda: causal_lm_loss(model, dict(batch)), list(model.parameters()))
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "s": times[-1],
        "saved_mib": saved / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": int(batch["input_ids"].numel()),
        "loss": float(loss),
        "batch": list(batch["input_ids"].shape),
    }


# -- driver --------------------------------------------------------------------------------------------------------
def run_child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit {proc.returncode}{killed}"}
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4, help="Packed rows in the op's micro-batch (lorafit's default: 4).")
    p.add_argument("--step-rows", type=int, default=1, help="Packed rows in the training step's micro-batch.")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="Alternating rounds over the candidates.")
    p.add_argument("--smoke", action="store_true", help="Tiny shapes, one round, BENCHMARKS.md untouched.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lengths", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import warnings

        warnings.filterwarnings("ignore")
        if a.child in OPS:
            out = child_op(a.child, json.loads(a.lengths), repeats=2)
        else:
            out = child_step(a.child, a.work, a.max_length, a.step_rows)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if a.smoke:
        a.rows, a.step_rows, a.max_length, a.repeats = 2, 2, 128, 1
    with tempfile.TemporaryDirectory(prefix="lorafit-attn-") as tmp:
        work = Path(tmp)
        _, _, samples, bins = prepared(work, a.max_length)
        lengths = [len(ids) for ids in samples["input_ids"]]
        rows = [[lengths[j] for j in members] for members in bins[: a.rows]]
        ops, steps = {n: [] for n in OPS}, {n: [] for n in STEPS}
        for rep in range(a.repeats):
            for name in OPS if rep % 2 == 0 else OPS[::-1]:
                ops[name].append(run_child(["--child", name, "--lengths", json.dumps(rows)]))
                print(f"round {rep + 1} op   {name:20s} {ops[name][-1]}", flush=True)
            for name in STEPS if rep % 2 == 0 else STEPS[::-1]:
                steps[name].append(
                    run_child(
                        [
                            "--child",
                            name,
                            "--work",
                            str(work),
                            "--max-length",
                            str(a.max_length),
                            "--rows",
                            str(a.step_rows),
                        ]
                    )
                )
                print(f"round {rep + 1} step {name:20s} {steps[name][-1]}", flush=True)
    report(a, rows, ops, steps)


def _best(results: list[dict], key: str):
    good = [r[key] for r in results if "error" not in r]
    return min(good) if good else None


def report(a, rows: list[list[int]], ops: dict, steps: dict) -> None:
    from _report import machine, table, write_section

    tokens = sum(map(sum, rows))
    base = _best(ops["block_mask_sdpa"], "ms")
    op_rows = []
    for name in OPS:
        ms = _best(ops[name], "ms")
        if ms is None:
            op_rows.append([name, "—", "—", "—", "—", ops[name][0]["error"]])
            continue
        saved = _best(ops[name], "saved_mib")
        op_rows.append(
            [name, f"{ms:,.0f}", f"{base / ms:.2f}x", f"{saved:,.1f}", f"{_best(ops[name], 'rss_growth_mib'):,.0f}", ""]
        )
    step_rows = []
    for name in STEPS:
        s = _best(steps[name], "s")
        if s is None:
            step_rows.append([name, "—", "—", "—", "—", steps[name][0]["error"]])
            continue
        former = _best(steps["former_" + name.split("_")[1]], "s")
        step_rows.append(
            [
                name,
                f"{s:.1f}",
                f"{former / s:.2f}x",
                f"{_best(steps[name], 'saved_mib'):,.0f}",
                f"{_best(steps[name], 'peak_rss_mib'):,.0f}",
                "",
            ]
        )
    body = "\n".join(
        [
            "## Packed attention on CPU (`bench/packed_attention.py`)",
            "",
            f"Command: `PYTHONPATH=src python bench/packed_attention.py --rows {a.rows} --step-rows {a.step_rows} "
            f"--max-length {a.max_length} "
            f"--repeats {a.repeats}` ({time.strftime('%Y-%m-%d')})",
            f"Machine: {machine()}; load average {os.getloadavg()[1]:.1f} over the last 5 min; best of {a.repeats} "
            f"alternating rounds, each candidate in its own process. torch threads: "
            f"{os.environ.get('OMP_NUM_THREADS', 'default')}.",
            f"One micro-batch of lorafit's packed rows: {len(rows)} rows of up to {a.max_length} tokens holding "
            f"{sum(map(len, rows))} Alpaca-like samples, {tokens:,} tokens.",
            "",
            "Attention op alone, forward + backward, SmolLM2-135M shapes (9/3 heads, head dim 64), fp32:",
            "",
            table(
                [
                    "candidate",
                    "ms",
                    "speed vs block mask sdpa",
                    "MiB saved for backward",
                    "peak RSS growth MiB",
                    "note",
                ],
                op_rows,
            ),
            "",
            f"One training micro-batch of the embedded SmolLM2-135M ({a.step_rows} packed row(s) of up to "
            f"{a.max_length} tokens; LoRA r=16 all-linear, dropout 0.05, lorafit's chunked loss), forward + backward, "
            "second step timed; former = lorafit before this change (4D block mask):",
            "",
            table(
                ["path", "s", "speed vs former", "MiB saved for backward (activations)", "peak RSS MiB", "note"],
                step_rows,
            ),
        ]
    )
    print("\n" + body)
    if not a.smoke:
        print(f"\nwrote {write_section('packed_attention', body)}")


if __name__ == "__main__":
    main()
