"""Peak memory and time of the LM-head loss, forward + backward: lorafit's chunked loss vs transformers' default.

    PYTHONPATH=src python bench/loss_memory.py            # GPU if present (bf16, 8 x 2048 tokens, hidden 4096)
    PYTHONPATH=src python bench/loss_memory.py --cpu      # CPU, fp32, scaled down (see below)

What is measured is only the part that differs: from the final hidden states (B, T, H) and the LM-head
weight (V, H) to the loss and d loss / d hidden. transformers' default: logits = hidden @ W^T (B, T, V),
then its own `ForCausalLMLoss` (upcast to fp32, shift, F.cross_entropy), backward. lorafit: `causal_lm_loss`'s
kernel (`linear_cross_entropy`, chunks of tokens, gradient computed in the forward). Every position is
trained (the worst case for lorafit: on real SFT data it also skips the prompt tokens). Vocabulary 128,256.

GPU: bf16, 8 x 2048 tokens, hidden 4096: peak `torch.cuda.max_memory_allocated` above the inputs.
CPU: fp32 (no fast bf16 on most CPUs); 1 x 2048 tokens and hidden 1024 so it fits a small machine next to
other work (the logits' share of memory is the same per token: V x 4 bytes); each variant runs in its own
process and its peak is its own peak RSS (VmHWM) minus the RSS just before the loss (inputs already allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
VOCAB = 128_256
SHAPES = {"cuda": dict(batch=8, seq=2048, hidden=4096), "cpu": dict(batch=1, seq=2048, hidden=1024)}
VARIANTS = ("transformers", "lorafit")


def inputs(device: str, batch: int, seq: int, hidden: int, dtype):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    # scaled in place: a temporary copy of the weight would inflate the CPU baseline's peak RSS
    h = torch.randn(batch, seq, hidden, device=device, dtype=dtype, generator=g).mul_(0.5).requires_grad_()
    w = torch.randn(VOCAB, hidden, device=device, dtype=dtype, generator=g).mul_(
        hidden**-0.5
    )  # frozen, like LoRA's head
    labels = torch.randint(0, VOCAB, (batch, seq), device=device, generator=g)
    return h, w, labels


def transformers_default(h, w, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = h @ w.t()  # (B, T, V), what LlamaForCausalLM returns
    return ForCausalLMLoss(logits, labels, vocab_size=w.shape[0])


def lorafit_chunked(h, w, labels):
    from lorafit.train.loss import linear_cross_entropy, shifted_targets

    targets = shifted_targets(labels)
    keep = targets != -100
    return linear_cross_entropy(h[keep], w, targets[keep]) / keep.sum()


FUNCS = {"transformers": transformers_default, "lorafit": lorafit_chunked}


def run_once(variant: str, h, w, labels) -> tuple[float, float]:
    import torch

    sync = torch.cuda.synchronize if h.is_cuda else (lambda: None)
    h.grad = None
    sync()
    t0 = time.perf_counter()
    loss = FUNCS[variant](h, w, labels)
    loss.backward()
    sync()
    return time.perf_counter() - t0, float(loss)


def gpu(repeats: int) -> dict:
    import torch

    shape = SHAPES["cuda"]
    h, w, labels = inputs("cuda", **shape, dtype=torch.bfloat16)
    out = {v: {"seconds": [], "peak_bytes": 0} for v in VARIANTS}
    grads = {}
    for rep in range(repeats + 1):  # the first round warms up kernels and is not timed
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            seconds, loss = run_once(variant, h, w, labels)
            peak = torch.cuda.max_memory_allocated() - base
            out[variant]["peak_bytes"] = max(out[variant]["peak_bytes"], peak)
            out[variant]["loss"] = loss
            if rep:
                out[variant]["seconds"].append(seconds)
            grads[variant] = h.grad.float()
    out["max_grad_diff"] = float((grads["lorafit"] - grads["transformers"]).abs().max())
    return out


def cpu_child(variant: str, repeats: int) -> None:
    import psutil
    import torch
    import transformers.loss.loss_utils  # noqa: F401 - imports are not the loss's memory

    import lorafit.train.loss  # noqa: F401
    from lorafit.runtime import peak_rss_bytes

    h, w, labels = inputs("cpu", **SHAPES["cpu"], dtype=torch.float32)
    before = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        seconds, loss = run_once(variant, h, w, labels)
        times.append(seconds)
    peak = peak_rss_bytes() - before
    torch.save(h.grad, os.environ["LOSS_BENCH_GRAD"])
    print("RESULT " + json.dumps({"seconds": times, "peak_bytes": peak, "loss": loss}), flush=True)


def cpu(repeats: int, tmp: Path) -> dict:
    import torch

    out = {v: {"seconds": [], "peak_bytes": 0} for v in VARIANTS}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for rep in range(repeats):  # alternate, one process per run
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            env["LOSS_BENCH_GRAD"] = str(tmp / f"grad-{variant}.pt")
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant], capture_output=True, text=True, env=env
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            r = json.loads(lines[-1][7:])
            out[variant]["seconds"] += r["seconds"][1:] or r["seconds"]  # the first call in a process warms up
            out[variant]["peak_bytes"] = max(out[variant]["peak_bytes"], r["peak_bytes"])
            out[variant]["loss"] = r["loss"]
    g = {v: torch.load(tmp / f"grad-{v}.pt") for v in VARIANTS}
    out["max_grad_diff"] = float((g["lorafit"] - g["transformers"]).abs().max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="Measure on the CPU even when a GPU is present.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="Print only; leave BENCHMARKS.md alone.")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return cpu_child(a.child, 2)
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    if device == "cuda":
        res = gpu(a.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = cpu(a.repeats, Path(tmp))
    report(res, device, a)


def report(res: dict, device: str, a) -> None:
    from _report import machine, table, write_section

    shape = SHAPES[device]
    tokens = shape["batch"] * shape["seq"]
    rows = []
    for v in VARIANTS:
        r = res[v]
        rows.append(
            [
                {"transformers": "transformers default (full logits, fp32 upcast)", "lorafit": "lorafit chunked"}[v],
                f"{r['peak_bytes'] / 2**30:.2f}",
                f"{statistics.median(r['seconds']) * 1e3:.0f}",
                f"{r['loss']:.4f}",
            ]
        )
    t, lf = res["transformers"], res["lorafit"]
    mem_ratio = t["peak_bytes"] / max(lf["peak_bytes"], 1)
    speed_ratio = statistics.median(t["seconds"]) / statistics.median(lf["seconds"])
    dtype = "bf16" if device == "cuda" else "fp32"
    flag = "" if device == "cuda" else " --cpu"
    body = "\n".join(
        [
            f"## LM-head loss memory ({'GPU' if device == 'cuda' else 'CPU'})",
            "",
            f"`PYTHONPATH=src python bench/loss_memory.py{flag} --repeats {a.repeats}` ({time.strftime('%Y-%m-%d')})",
            "",
            f"Machine: {machine()}. Forward + backward from hidden states to d loss / d hidden, {shape['batch']} x "
            f"{shape['seq']} = {tokens:,} tokens, hidden {shape['hidden']}, vocab {VOCAB:,}, {dtype}, every position trained."
            + (
                ""
                if device == "cuda"
                else " CPU shape scaled down from 8 x 2048 x 4096 (logit memory per token is "
                "unchanged); peak = peak RSS (VmHWM) minus RSS before the loss, one process per run."
            ),
            "",
            table(["loss", "peak extra memory GiB", "time ms (median)", "loss value"], rows),
            "",
            f"**{mem_ratio:.1f}x less peak memory, {speed_ratio:.2f}x the speed** of transformers' default; "
            f"largest difference in d loss / d hidden: {res['max_grad_diff']:.2e}.",
        ]
    )
    print(body)
    if not a.no_write:
        print(f"\nwrote {write_section('loss_memory_' + device, body)}")


if __name__ == "__main__":
    main()
