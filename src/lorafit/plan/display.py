"""`lorafit plan`'s tables on the terminal."""

from __future__ import annotations

from lorafit.plan.memory import GiB


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def print_plan(p: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # piped to a file or a log: don't squeeze the tables to 80 columns
    a, c = p["architecture"], p["parameters"]
    console.print(
        f"{p['model']}: {a['layers']} layers, hidden {a['hidden']:,}, intermediate {a['intermediate']:,}, "
        f"{a['heads']} heads ({a['kv_heads']} kv), vocab {a['vocab']:,} (meta device: no weights loaded)",
        markup=False,
    )
    console.print(
        f"parameters: base {c['base']:,}; trainable {c['trainable']:,} / {c['total']:,} "
        f"({100 * c['trainable'] / c['total']:.2f}%) as PEFT counts them",
        markup=False,
    )

    console.print(
        "\nLoRA arithmetic. One matrix, as in the tutorial: W 1000×1000, r=16 trains B 1000×16 + A 16×1000 = "
        "32,000 parameters instead of 1,000,000 (96.8% fewer). Per module of this model:",
        markup=False,
    )
    t = Table(show_edge=False)
    for col in ("module", "n", "W out×in", "A r×in", "B out×r", "trainable", "frozen", "fewer"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for row in p["lora"]:
        t.add_row(
            row["module"],
            str(row["count"]),
            "×".join(map(str, row["W"])),
            "×".join(map(str, row["A"])),
            "×".join(map(str, row["B"])),
            f"{row['trainable_each']:,}",
            f"{row['frozen_each']:,}",
            f"{100 * row['reduction']:.1f}%",
        )
    lora_total = sum(r["trainable"] for r in p["lora"])
    frozen_total = sum(r["frozen"] for r in p["lora"])
    if frozen_total:
        t.add_row(
            "all",
            str(sum(r["count"] for r in p["lora"])),
            "",
            "",
            "",
            f"{lora_total:,}",
            f"{frozen_total:,}",
            f"{100 * (1 - lora_total / frozen_total):.1f}%",
        )
    console.print(t)
    _print_memory(p, console)
    _print_gpus(p, console)
    _print_cpu(p, console)


def _print_memory(p: dict, console) -> None:
    from rich.table import Table

    mem, s = p["memory"], p["settings"]
    tokens = mem["tokens_per_micro_batch"]
    console.print(
        f"\nMemory on one GPU: micro-batch {s['micro_batch_size']} × {s['max_length']:,} tokens = {tokens:,} tokens, "
        f"{s['dtype']} weights, quantization {s['quantization']}, {_kernel(s['attention'], mem)}, {s['loss']} loss, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        markup=False,
    )
    m = Table(show_edge=False)
    m.add_column("term")
    m.add_column("GiB", justify="right")
    m.add_column("how")
    m.add_row(
        "base weights",
        _gib(mem["base_weights"]),
        f"bf16 {_gib(p['base_weights_bf16'])} / NF4 {_gib(p['base_weights_nf4'])} "
        "(NF4 keeps embeddings, head and norms in fp32)",
    )
    m.add_row(
        "LoRA weights+grads+optimizer",
        _gib(mem["lora_weights_grads_optimizer"]),
        f"fp32 weights and grads, {s['optimizer']} state" + (", bf16 autocast copies" if s["dtype"] != "fp32" else ""),
    )
    m.add_row(
        "activations",
        _gib(mem["activations"]),
        f"{mem['activation_bytes_per_token_layer']:,} B/token/layer; "
        f"checkpointing off {_gib(mem['activations_without_checkpointing'])}, on {_gib(mem['activations_with_checkpointing'])}",
    )
    m.add_row("backward working memory", _gib(mem["backward_working"]), "gradients of the layer being differentiated")
    m.add_row(
        "logits + loss",
        _gib(mem["logits_and_loss"]),
        "full fp32 logits and their gradient" if s["loss"] == "plain" else "one chunk of logits at a time",
    )
    m.add_row("framework overhead", _gib(mem["framework_overhead"]), "CUDA context 1 GiB + 5% allocator slack")
    m.add_row("total", _gib(mem["total"]), "")
    console.print(m)


KERNELS = {
    "lorafit_sdpa": "per-sample sdpa attention",
    "lorafit_eager": "per-sample eager attention",
    "flash_attention_2": "flash-attention (varlen)",
}


def _kernel(setting: str, mem: dict) -> str:
    """The attention kernel training runs, as the memory terms assume it (none of them builds an L x L mask)."""
    if setting == "auto" and mem["device"] == "cuda":
        return "flash-attention (varlen) where installed, else per-sample sdpa attention"
    return KERNELS.get(mem["attention"], f"{mem['attention']} attention")


def _print_cpu(p: dict, console) -> None:
    """The same run trained on a CPU: peak resident memory of `lorafit train` (fp32 unless the config says bf16)."""
    c = p["memory_cpu"]
    console.print(
        f"\nOn a CPU (`lorafit train` without a GPU): {_gib(c['total'])} GiB peak resident memory: weights "
        f"{_gib(c['base_weights'] + c['lora_weights_grads_optimizer'])}"
        + (" (frozen linear layers in bf16)" if c.get("frozen_linears") else "")
        + f", activations {_gib(c['activations'])} "
        f"({c['activation_bytes_per_token_layer']:,} B/token/layer, {_kernel(p['settings']['attention'], c)}), "
        f"backward {_gib(c['backward_working'])}, loss {_gib(c['logits_and_loss'])}, Python/torch runtime and "
        f"allocator {_gib(c['framework_overhead'])}.",
        markup=False,
    )


def _print_gpus(p: dict, console) -> None:
    from rich.table import Table

    g = Table(show_edge=False)
    for col in ("GPU", "cards", "usable GiB", "estimate", "verdict"):
        g.add_column(col)
    for row in p["gpus"]:
        g.add_row(
            row["gpu"],
            row["cards"],
            f"{row['usable_gib']}",
            f"{100 * row['fraction']:.0f}%",
            row["verdict"],
            style="bold" if p["chosen_gpu"] == row["gpu"] else "",
        )
    console.print(g)
    for row in p["gpus"]:
        if row.get("changes"):
            console.print(
                f"  {row['gpu']}: fits ({_gib(row['total_after_changes'])} GiB) with " + " ".join(row["changes"]),
                markup=False,
            )
        elif "changes" in row:
            console.print(
                f"  {row['gpu']}: does not fit even with checkpointing, 4-bit, micro-batch 1 and 512 tokens",
                markup=False,
            )
    console.print("Changes are overrides for `lorafit train CONFIG key=value ...`.", markup=False)
    if p.get("schedule"):
        console.print("\n" + p["schedule"]["line"], markup=False)
        for warning in p["schedule"]["warnings"]:
            console.print(f"warning: {warning}", markup=False)
