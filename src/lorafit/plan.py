"""`lorafit plan`: exact parameter counts and a memory estimate for a run config, without loading weights.

The model is built on PyTorch's `meta` device (shapes, no storage) and wrapped by PEFT exactly as training
wraps it, so the counts are PEFT's own. Memory is the sum of named terms, each a formula of the architecture
and the config (see `memory_terms`); the activation formula lists, per token and layer, the tensors autograd
keeps for the backward pass of a LoRA-wrapped Llama layer (tests/test_plan.py checks it against the tensors
PyTorch actually saves).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafit.errors import ConfigError, ModelError
from lorafit.paths import user_path

GiB = 1024**3
KNOWN_DIR = Path(__file__).with_name("architectures")
KNOWN = {  # Hub ids (gated, maybe unreachable) -> the architecture shipped in architectures/
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b", "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b", "meta-llama/Meta-Llama-3.1-70B": "llama-3.1-70b",
}
# (size class, cards, GiB usable by PyTorch: nvidia-smi's total minus ECC/driver reservations)
GPUS = [("24 GB", "RTX 3090/4090, A10G, L4", 22.0), ("40 GB", "A100 40GB", 39.4), ("48 GB", "L40S, RTX 6000 Ada, A6000", 44.5),
        ("80 GB", "A100 80GB, H100 80GB", 79.1), ("141 GB", "H200", 139.8)]
GPU_NAMES = {"3090": 0, "4090": 0, "a10": 0, "a10g": 0, "l4": 0, "24": 0, "24gb": 0, "a100-40gb": 1, "a100-40": 1,
             "40": 1, "40gb": 1, "l40s": 2, "l40": 2, "a6000": 2, "6000": 2, "48": 2, "48gb": 2, "a100": 3, "a100-80gb": 3,
             "a100-80": 3, "h100": 3, "80": 3, "80gb": 3, "h200": 4, "141": 4, "141gb": 4}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 absmax per 256 blocks (double quant)
INT8_BYTES = 1.0  # LLM.int8 weights (+ a negligible fp32 scale per row)
CONTEXT_BYTES = 1.0 * GiB  # CUDA context, cuBLAS workspaces: outside PyTorch's allocator
FRAGMENTATION = 0.05  # caching-allocator slack on top of the peak PyTorch allocates
GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
          "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}  # modules reading the same tensor


@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def load_architecture(model_cfg):
    """The model's transformers config, from architectures/*.json, a local folder, the embedded model, or the Hub."""
    from transformers import AutoConfig, LlamaConfig

    from lorafit.models.sources import EMBEDDED
    from lorafit.paths import cache_dir

    name = model_cfg.name
    if name in KNOWN:
        return LlamaConfig.from_dict(json.loads((KNOWN_DIR / f"{KNOWN[name]}.json").read_text()))
    if name in EMBEDDED:
        cached = cache_dir() / "models" / name / "config.json"
        if cached.exists():
            return AutoConfig.from_pretrained(cached.parent)
        return _embedded_gguf_config(name)
    path = user_path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json.", "Point `model.name` at a folder written by save_pretrained.")
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"no architecture for `{name}`: not a known model, not a local folder, and the Hub did not answer "
                         f"({type(err).__name__}).", f"Known without network: {', '.join(sorted(KNOWN))}, "
                         f"{', '.join(EMBEDDED)}; or a local folder with config.json.") from None


def _embedded_gguf_config(name: str):
    """The embedded GGUF's header, read without its tensors (the converted copy is not cached yet)."""
    import importlib.util
    import os

    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from lorafit.models.sources import EMBEDDED

    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model `{name}` needs the package `{package}`.")
    raw = load_gguf_checkpoint(os.path.join(os.path.dirname(spec.origin), filename), return_tensors=False)["config"]
    return LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "_model_name_or_path")})


def meta_model(cfg):
    """The PEFT-wrapped model on the meta device (no memory), as `attach_lora` builds it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.models.lora import lora_config

    config = load_architecture(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=cfg.model.trust_remote_code)
    lora = lora_config(cfg.lora)
    lora.init_lora_weights = True  # data-dependent inits (PiSSA, EVA) need real weights; counts do not depend on init
    return get_peft_model(model, lora), config


def architecture(config) -> Arch:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Arch(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


def lora_table(peft_model, r: int, dora: bool) -> list[dict]:
    """Per targeted module type: W's shape, A and B shapes, trainable vs frozen parameters, the reduction."""
    rows: dict[str, dict] = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        kind = name.rsplit(".", 1)[-1]
        base = module.base_layer
        d_in, d_out = base.in_features, base.out_features
        row = rows.setdefault(kind, {"module": kind, "count": 0, "W": [d_out, d_in], "A": [r, d_in], "B": [d_out, r],
                                     "trainable_each": r * (d_in + d_out) + (d_out if dora else 0), "frozen_each": d_in * d_out})
        row["count"] += 1
    out = []
    for row in rows.values():
        row["trainable"] = row["trainable_each"] * row["count"]
        row["frozen"] = row["frozen_each"] * row["count"]
        row["reduction"] = 1 - row["trainable_each"] / row["frozen_each"]
        out.append(row)
    return out


def linear_layer_params(peft_model) -> int:
    """Weights bitsandbytes would quantize: every Linear inside the decoder layers (not the LM head)."""
    import torch

    total = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
            total += module.weight.numel()
    return total


def activation_bytes_per_token_layer(a: Arch, targets: list[str], r: int, dropout: float, act: int, residual: int,
                                     kv_expanded: bool, eager_seq: int = 0) -> int:
    """Bytes autograd keeps per token in one LoRA-wrapped Llama decoder layer until the backward pass.

    act: bytes of the compute dtype (2 under bf16/fp16 autocast, 4 in fp32); residual: bytes of the residual
    stream (4 when the embeddings are fp32, as prepare_model_for_kbit_training leaves them for QLoRA).
    Frozen base matmuls save nothing (no weight gradient is needed); what is saved is listed below.
    """
    h, hq, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    total = 2 * (4 * h + 4)  # two RMSNorms: the fp32 input and the fp32 rsqrt
    kv_saved = hq if kv_expanded else kv  # sdpa with a mask (packing, padding) repeats k/v to every query head
    total += act * (2 * hq + 2 * kv_saved) + 4 * a.heads  # q, k, v after RoPE, the output, fp32 log-sum-exp
    if eager_seq:
        total += a.heads * eager_seq * (4 + act)  # eager attention keeps the fp32 softmax and its cast
    total += 3 * a.intermediate * residual  # gate output (SiLU input), SiLU output and up output (their product)
    d_in = {"attn_in": h, "attn_out": hq, "mlp_in": h, "mlp_mid": a.intermediate}
    if act == 4 and dropout == 0:
        # fp32 end to end: modules reading the same tensor share the one saved copy of it, and o_proj reads
        # the attention output that attention already saved (a transposed view of the same storage)
        total += sum(4 * d_in[g] for g in {GROUPS[t] for t in targets} - {"attn_out"})
    else:
        # mixed precision: each LoRA A casts its input separately; dropout keeps its own output and a bool mask
        total += sum((act + (1 if dropout > 0 else 0)) * d_in[GROUPS[t]] for t in targets)
    total += len(targets) * act * r  # LoRA B's input (A's output)
    return total


def memory_terms(cfg, arch: Arch, counts: dict) -> dict:
    """Every memory term in bytes for this config (one GPU, one micro-batch in flight)."""
    from lorafit.train.loss import CHUNK_ELEMENTS

    m, t, lora = cfg.model, cfg.training, cfg.lora
    mixed = t.precision != "fp32" and m.dtype != "fp32"
    act = 2 if mixed else 4
    weight_bytes = 4 if m.dtype == "fp32" else 2
    quantized = m.quantization != "none"
    residual = 4 if quantized or not mixed else 2  # QLoRA: prepare_model_for_kbit_training upcasts embeddings to fp32
    tokens = t.micro_batch_size * cfg.data.max_length
    kv_expanded = m.attn_implementation in ("auto", "sdpa", "eager") and (cfg.data.packing or t.micro_batch_size > 1)
    eager_seq = cfg.data.max_length if m.attn_implementation == "eager" else 0

    base = counts["base"]
    if quantized:  # quantized decoder linears; embeddings, LM head and norms upcast to fp32 by PEFT
        per = NF4_BYTES if m.quantization == "4bit" else INT8_BYTES
        base_weights = counts["linear"] * per + (base - counts["linear"]) * 4
    else:
        base_weights = base * weight_bytes
    states = {"adamw_torch": 8, "paged_adamw_8bit": 2}[t.optimizer]
    lora_bytes = counts["trainable_bytes"] * 2 + counts["trainable"] * states  # weights + grads (same dtype) + optimizer
    if mixed:
        lora_bytes += counts["trainable"] * 2  # autocast's cached bf16 copies of the fp32 adapter weights

    layer = activation_bytes_per_token_layer(arch, counts["targets"], lora.r, lora.dropout, act, residual, kv_expanded, eager_seq)
    final_norm = 4 * arch.hidden + 4
    full = tokens * (arch.layers * layer + final_norm)
    # checkpointing keeps each layer's input, then recomputes one layer at a time in the backward pass
    checkpointed = tokens * (arch.layers * residual * arch.hidden + layer + final_norm)
    activations = checkpointed if t.gradient_checkpointing else full
    backward_working = tokens * layer  # gradients flowing through the layer being differentiated

    head_copy = arch.vocab * arch.hidden * 2 if quantized and mixed else 0  # the fp32 LM head cast for the matmul
    if t.loss == "plain":
        # bf16 logits, their fp32 copy and log-softmax in the forward; at the start of backward the saved
        # fp32 log-softmax, its gradient and the logits' gradient: 12 bytes per vocabulary entry
        loss = tokens * arch.vocab * 12 + head_copy
    else:
        chunk = CHUNK_ELEMENTS  # logits per chunk
        buffers = min(chunk, tokens * arch.vocab) * (act + 4 if act != 4 else 4)  # one chunk of logits: matmul dtype + fp32
        grad_h = tokens * arch.hidden * residual  # d loss / d hidden, computed in the forward, kept for backward
        hidden_list = tokens * (arch.layers + 1) * arch.hidden * residual  # output_hidden_states at the end of forward
        loss = max(buffers + grad_h + head_copy, hidden_list)
    allocated = base_weights + lora_bytes + activations + backward_working + loss
    overhead = CONTEXT_BYTES + FRAGMENTATION * allocated
    return {
        "tokens_per_micro_batch": tokens, "base_weights": base_weights, "lora_weights_grads_optimizer": lora_bytes,
        "activations": activations, "activations_without_checkpointing": full, "activations_with_checkpointing": checkpointed,
        "activation_bytes_per_token_layer": layer, "backward_working": backward_working, "logits_and_loss": loss,
        "framework_overhead": overhead, "total": allocated + overhead,
    }


def verdicts(total: float) -> list[dict]:
    out = []
    for size, cards, usable in GPUS:
        used = total / (usable * GiB)
        out.append({"gpu": size, "cards": cards, "usable_gib": usable, "fraction": used,
                    "verdict": "fits" if used <= 0.9 else "tight" if used <= 1.0 else "does not fit"})
    return out


def changes_to_fit(cfg, arch: Arch, counts: dict, usable_gib: float) -> tuple[list[str], float] | None:
    """The first cumulative set of the usual changes that brings the estimate under 90% of the GPU."""
    steps = []
    if not cfg.training.gradient_checkpointing:
        steps.append(("training.gradient_checkpointing=true", {"training": {"gradient_checkpointing": True}}))
    if cfg.training.loss == "plain":
        steps.append(("training.loss=chunked", {"training": {"loss": "chunked"}}))
    if cfg.model.quantization == "none":
        steps.append(("model.quantization=4bit", {"model": {"quantization": "4bit"}}))
    mb, accum = cfg.training.micro_batch_size, cfg.training.gradient_accumulation
    while mb > 1:
        factor = mb // max(1, mb // 2)
        mb, accum = mb // 2, accum * factor
        steps.append((f"training.micro_batch_size={mb} training.gradient_accumulation={accum}",
                      {"training": {"micro_batch_size": mb, "gradient_accumulation": accum}}))
    length = cfg.data.max_length
    while length > 512:
        length //= 2
        steps.append((f"data.max_length={length}", {"data": {"max_length": length}}))
    current, applied = cfg, []
    for label, change in steps:
        current = _updated(current, change)
        applied.append(label)
        total = memory_terms(current, arch, counts)["total"]  # parameter counts do not change with these settings
        if total <= 0.9 * usable_gib * GiB:
            return _collapse(applied), total
    return None


def _updated(cfg, change: dict):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields) for section, fields in change.items()})


def _collapse(applied: list[str]) -> list[str]:
    """Keep only the last value of each field (micro-batch halvings collapse to the final one)."""
    latest: dict[str, str] = {}
    for label in applied:
        for item in label.split():
            latest[item.split("=")[0]] = item
    return list(latest.values())


def count_parameters(cfg) -> tuple[dict, list[dict], Arch, object]:
    """(counts, LoRA table, architecture, transformers config) from the meta-device model."""
    peft_model, config = meta_model(cfg)
    base = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    trainable, total = peft_model.get_nb_trainable_parameters()
    table = lora_table(peft_model, cfg.lora.r, cfg.lora.use_dora)
    counts = {"base": base, "trainable": trainable, "total": total, "linear": linear_layer_params(peft_model),
              "trainable_bytes": sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad),
              "targets": [row["module"] for row in table]}
    return counts, table, architecture(config), config


def resolve_gpu(name: str | None) -> int | None:
    if name is None:
        return None
    key = name.lower().replace(" ", "").replace("nvidia", "").replace("rtx", "").replace("geforce", "")
    if key not in GPU_NAMES:
        raise ConfigError(f"`--gpu {name}` is not a GPU lorafit knows.",
                          f"Use a card ({', '.join(sorted(k for k in GPU_NAMES if not k[0].isdigit()))}) or a size (24, 40, 48, 80, 141).")
    return GPU_NAMES[key]


def build_plan(cfg, gpu: str | None = None) -> dict:
    """Everything `lorafit plan` prints, as one dict."""
    chosen = resolve_gpu(gpu)
    counts, table, arch, config = count_parameters(cfg)
    terms = memory_terms(cfg, arch, counts)
    nf4 = counts["linear"] * NF4_BYTES + (counts["base"] - counts["linear"]) * 4
    fits = verdicts(terms["total"])
    for k, row in enumerate(fits):
        if row["verdict"] != "fits" and (chosen is None or k == chosen):
            found = changes_to_fit(cfg, arch, counts, row["usable_gib"])
            row["changes"], row["total_after_changes"] = found if found else (None, None)
    return {"model": cfg.model.name, "architecture": asdict(arch), "parameters": {k: v for k, v in counts.items() if k != "targets"},
            "lora": table, "memory": terms, "base_weights_bf16": counts["base"] * 2, "base_weights_nf4": nf4,
            "gpus": fits, "chosen_gpu": None if chosen is None else GPUS[chosen][0],
            "settings": {"dtype": cfg.model.dtype, "quantization": cfg.model.quantization, "micro_batch_size": cfg.training.micro_batch_size,
                         "max_length": cfg.data.max_length, "gradient_checkpointing": cfg.training.gradient_checkpointing,
                         "loss": cfg.training.loss, "optimizer": cfg.training.optimizer, "attention": cfg.model.attn_implementation}}


def plan(config_path: str, gpu: str | None = None, as_json: bool = False, overrides: list[str] | None = None) -> dict:
    from lorafit.config import load_config

    from lorafit.train.schedule import schedule_for_config

    cfg = load_config(config_path, overrides or [])
    result = build_plan(cfg, gpu)
    result["schedule"] = schedule_for_config(cfg, result["architecture"]["hidden"])  # samples, steps, epochs, rate
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return result


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def print_plan(p: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # piped to a file or a log: don't squeeze the tables to 80 columns
    a, c, mem, s = p["architecture"], p["parameters"], p["memory"], p["settings"]
    console.print(f"{p['model']}: {a['layers']} layers, hidden {a['hidden']:,}, intermediate {a['intermediate']:,}, "
                  f"{a['heads']} heads ({a['kv_heads']} kv), vocab {a['vocab']:,} (meta device: no weights loaded)", markup=False)
    console.print(f"parameters: base {c['base']:,}; trainable {c['trainable']:,} / {c['total']:,} "
                  f"({100 * c['trainable'] / c['total']:.2f}%) as PEFT counts them", markup=False)

    console.print("\nLoRA arithmetic. One matrix, as in the tutorial: W 1000×1000, r=16 trains B 1000×16 + A 16×1000 = "
                  "32,000 parameters instead of 1,000,000 (96.8% fewer). Per module of this model:", markup=False)
    t = Table(show_edge=False)
    for col in ("module", "n", "W out×in", "A r×in", "B out×r", "trainable", "frozen", "fewer"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for row in p["lora"]:
        t.add_row(row["module"], str(row["count"]), "×".join(map(str, row["W"])), "×".join(map(str, row["A"])),
                  "×".join(map(str, row["B"])), f"{row['trainable_each']:,}", f"{row['frozen_each']:,}", f"{100 * row['reduction']:.1f}%")
    lora_total = sum(r["trainable"] for r in p["lora"])
    frozen_total = sum(r["frozen"] for r in p["lora"])
    if frozen_total:
        t.add_row("all", str(sum(r["count"] for r in p["lora"])), "", "", "", f"{lora_total:,}", f"{frozen_total:,}",
                  f"{100 * (1 - lora_total / frozen_total):.1f}%")
    console.print(t)

    tokens = mem["tokens_per_micro_batch"]
    console.print(f"\nMemory on one GPU: micro-batch {s['micro_batch_size']} × {s['max_length']:,} tokens = {tokens:,} tokens, "
                  f"{s['dtype']} weights, quantization {s['quantization']}, {s['attention']} attention, {s['loss']} loss, "
                  f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}", markup=False)
    m = Table(show_edge=False)
    m.add_column("term")
    m.add_column("GiB", justify="right")
    m.add_column("how")
    m.add_row("base weights", _gib(mem["base_weights"]), f"bf16 {_gib(p['base_weights_bf16'])} / NF4 {_gib(p['base_weights_nf4'])} "
              "(NF4 keeps embeddings, head and norms in fp32)")
    m.add_row("LoRA weights+grads+optimizer", _gib(mem["lora_weights_grads_optimizer"]),
              f"fp32 weights and grads, {s['optimizer']} state" + (", bf16 autocast copies" if s["dtype"] != "fp32" else ""))
    m.add_row("activations", _gib(mem["activations"]), f"{mem['activation_bytes_per_token_layer']:,} B/token/layer; "
              f"checkpointing off {_gib(mem['activations_without_checkpointing'])}, on {_gib(mem['activations_with_checkpointing'])}")
    m.add_row("backward working memory", _gib(mem["backward_working"]), "gradients of the layer being differentiated")
    m.add_row("logits + loss", _gib(mem["logits_and_loss"]),
              "full fp32 logits and their gradient" if s["loss"] == "plain" else "one chunk of logits at a time")
    m.add_row("framework overhead", _gib(mem["framework_overhead"]), "CUDA context 1 GiB + 5% allocator slack")
    m.add_row("total", _gib(mem["total"]), "")
    console.print(m)

    g = Table(show_edge=False)
    for col in ("GPU", "cards", "usable GiB", "estimate", "verdict"):
        g.add_column(col)
    for row in p["gpus"]:
        g.add_row(row["gpu"], row["cards"], f"{row['usable_gib']}", f"{100 * row['fraction']:.0f}%", row["verdict"],
                  style="bold" if p["chosen_gpu"] == row["gpu"] else "")
    console.print(g)
    for row in p["gpus"]:
        if row.get("changes"):
            console.print(f"  {row['gpu']}: fits ({_gib(row['total_after_changes'])} GiB) with " + " ".join(row["changes"]), markup=False)
        elif "changes" in row:
            console.print(f"  {row['gpu']}: does not fit even with checkpointing, 4-bit, micro-batch 1 and 512 tokens", markup=False)
    console.print("Changes are overrides for `lorafit train CONFIG key=value ...`.", markup=False)
    if p.get("schedule"):
        console.print("\n" + p["schedule"]["line"], markup=False)
        for warning in p["schedule"]["warnings"]:
            console.print(f"warning: {warning}", markup=False)


def suggest_for_oom(cfg, device_gib: float | None = None) -> str | None:
    """What `lorafit train` prints on out-of-memory: the estimate and the changes that fit this GPU's memory."""
    if device_gib is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    counts, _, arch, _ = count_parameters(cfg)
    total = memory_terms(cfg, arch, counts)["total"]
    found = changes_to_fit(cfg, arch, counts, device_gib)
    head = f"  the planner estimates {total / GiB:.1f} GiB for this config on a {device_gib:.0f} GiB device"
    if found is None:
        return head + "; none of the usual changes fits it: use a larger GPU or several (FSDP, see configs/)."
    changes, after = found
    return f"{head}; this fits ({after / GiB:.1f} GiB):\n    lorafit train CONFIG " + " ".join(changes)
