"""`lorafit demo --tools`: teach the embedded SmolLM2 to call invented tools, and score its calls before and after.

The data (examples/make_tool_data.py) describes three tools of an invented island nation that no model can
know. The held-out rows ask in phrasings training never used; an answer is right when it is a call to the
reference's tool with exactly the reference's arguments (inference/tool_calls.py reads the call).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.config import load_config
from lorafit.errors import DataError
from lorafit.inference.compare import conversations, question
from lorafit.inference.generate import generate_batch, load_for_inference
from lorafit.inference.tool_calls import ToolScore

TOOL_CONFIG = "configs/demo_tools.yaml"
TOOL_HELDOUT = "examples/tools/heldout.jsonl"


def _call_text(call: dict | None, problem: str | None, answer: str) -> str:
    if call is not None:
        return json.dumps(call, ensure_ascii=False)
    text = answer if len(answer) <= 120 else answer[:119] + "…"
    return f"(no call) {text}" if problem is None else f"(unreadable call: {problem}) {text}"


def run_tool_demo(config: str, heldout: str, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorafit.train.run import run_training

    console = Console()
    cfg = load_config(config, overrides)
    if not Path(heldout).is_file():
        raise DataError(
            f"held-out file {heldout} does not exist.",
            "Run `python examples/make_tool_data.py`, or pass --heldout FILE.",
        )
    rows = conversations(heldout, cfg.data)
    if not any(r["tools"] for r in rows):
        raise DataError(
            f"{heldout} has no rows with `tools`.", "The tool demo scores tool calls: give each row its `tools`."
        )
    console.print(
        f"[bold]lorafit demo --tools[/]: {cfg.model.name} + LoRA r={cfg.lora.r} on "
        f"{', '.join(s.path for s in cfg.data.train)}"
    )
    prompts, tools = [r["messages"] for r in rows], [r["tools"] for r in rows]
    max_new = cfg.eval.max_new_tokens
    base = load_for_inference(cfg.model.name)
    before = generate_batch(base, prompts, max_new, tools=tools)
    del base
    run_dir = run_training(cfg)
    after = generate_batch(load_for_inference(str(run_dir)), prompts, max_new, tools=tools)

    scores = {"base": ToolScore(), "tuned": ToolScore()}
    table = Table(title="Held-out requests (phrasings never seen in training)", show_lines=True)
    for name, ratio in (("request", 2), ("expected call", 3), ("base model", 3), ("fine-tuned", 3)):
        table.add_column(name, ratio=ratio, overflow="fold")
    for row, b, a in zip(rows, before, after):
        cells = []
        for who, answer in (("base", b), ("tuned", a)):
            got = scores[who].add(row["call"], answer)
            mark = "[green]✓[/]" if got["right"] else "[red]✗[/]"
            cells.append(f"{mark} {_call_text(got['call'], got['problem'], answer)}")
        table.add_row(question(row["messages"]), row["reference"], *cells)
    console.print(table)
    base_s, tuned_s = scores["base"].summary(), scores["tuned"].summary()
    n = base_s["expected_calls"]
    console.print(
        f"[bold]exact calls (right tool, exactly the right arguments): base {base_s['exact_calls']}/{n}   "
        f"fine-tuned {tuned_s['exact_calls']}/{n}[/]  (valid calls: base {base_s['valid_calls']}/{n}, "
        f"fine-tuned {tuned_s['valid_calls']}/{n})"
    )
    result = {
        "base": base_s,
        "tuned": tuned_s,
        "answers": [
            {"request": question(r["messages"]), "expected": r["call"], "base": b, "tuned": a}
            for r, b, a in zip(rows, before, after)
        ],
    }
    (Path(run_dir) / "demo_results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0
