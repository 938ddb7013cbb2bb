"""Training memory as a sum of named terms, each a formula of the architecture and the config.

The activation formula lists, per token and layer, the tensors autograd keeps for the backward pass of a
LoRA-wrapped Llama layer (tests/test_plan.py checks it against the tensors PyTorch actually saves).
"""

from __future__ import annotations

from lorafit.errors import ConfigError
from lorafit.plan.architecture import Arch
from lorafit.runtime import pick_frozen_dtype

# (size class, cards, GiB usable by PyTorch: nvidia-smi's total minus ECC/driver reservations)
GiB = 1024**3


GPUS = [
    ("24 GB", "RTX 3090/4090, A10G, L4", 22.0),
    ("40 GB", "A100 40GB", 39.4),
    ("48 GB", "L40S, RTX 6000 Ada, A6000", 44.5),
    ("80 GB", "A100 80GB, H100 80GB", 79.1),
    ("141 GB", "H200", 139.8),
]


GPU_NAMES = {
    "3090": 0,
    "4090": 0,
    "a10": 0,
    "a10g": 0,
    "l4": 0,
    "24": 0,
    "24gb": 0,
    "a100-40gb": 1,
    "a100-40": 1,
    "40": 1,
    "40gb": 1,
    "l40s": 2,
    "l40": 2,
    "a6000": 2,
    "6000": 2,
    "48": 2,
    "48gb": 2,
    "a100": 3,
    "a100-80gb": 3,
    "a100-80": 3,
    "h100": 3,
    "80": 3,
    "80gb": 3,
    "h200": 4,
    "141": 4,
    "141gb": 4,
}


NF4_BYTES = (
    0.5 + 1 / 64 + 4 / (64 * 256)
)  # 4-bit weights + 8-bit absmax per 64 + fp32 absmax per 256 blocks (double quant)


INT8_BYTES = 1.0  # LLM.int8 weights (+ a negligible fp32 scale per row)


CONTEXT_BYTES = 1.0 * GiB  # CUDA context, cuBLAS workspaces: outside PyTorch's allocator


FRAGMENTATION = 0.05  # caching-allocator slack on top of the peak PyTorch allocates


# CPU training (`lorafit train` on a machine without CUDA): resident memory of the process. The runtime is Python,
# torch, transformers, PEFT, datasets and the tokenizer before any weight is loaded (484 MiB measured). PyTorch's CPU
# tensors come from glibc malloc, which keeps the holes that a step's short-lived tensors leave between the saved
# activations instead of returning them: resident memory peaks 0.40-0.45x the activations above the live tensors
# with lorafit's fused LoRA layer (models/lora_linear.py, fewer short-lived full-width tensors) and 0.5-0.8x with
# PEFT's forward, which DoRA keeps (measured with the embedded model at 512 and 1024 tokens per micro-batch;
# tests/test_plan_cpu.py holds the total).
CPU_RUNTIME_BYTES = 0.47 * GiB
CPU_HEAP_RETENTION = {"fused": 0.43, "peft": 0.65}


GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}  # modules reading the same tensor


def activation_bytes_per_token_layer(
    a: Arch,
    targets: list[str],
    r: int,
    dropout: float,
    act: int,
    residual: int,
    kv_expanded: bool,
    eager_seq: int = 0,
    mask_bytes: int = 1,
    attn_out_shared: bool = True,
    fused_dropout: bool = True,
) -> int:
    """Bytes autograd keeps per token in one LoRA-wrapped Llama decoder layer until the backward pass.

    act: bytes of the compute dtype (2 under bf16/fp16 autocast, 4 in fp32); residual: bytes of the residual
    stream (4 when the embeddings are fp32, as prepare_model_for_kbit_training leaves them for QLoRA).
    kv_expanded: k/v repeated to every query head before attention (eager; lorafit's per-sample sdpa on CPU).
    eager_seq: the longest span one query attends over (eager keeps its scores); mask_bytes: bytes per element of
    a LoRA dropout mask (CUDA's fused dropout keeps a bool; on CPU PyTorch keeps the float scale mask, `act` bytes).
    attn_out_shared: the tensor o_proj reads is the one attention saved (one sample per row); per-sample attention
    over packed samples concatenates the outputs into a new tensor instead.
    fused_dropout: lorafit's LoRA dropout (models/lora_dropout.py: lora_A keeps its input and a one-byte mask, not a
    dropped copy); False: PEFT's own (DoRA), a dropped copy and a `mask_bytes` mask per LoRA layer.
    Frozen base matmuls save nothing (no weight gradient is needed); what is saved is listed below.
    """
    h, hq, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    total = 2 * (4 * h + 4)  # two RMSNorms: the fp32 input and the fp32 rsqrt
    kv_saved = hq if kv_expanded else kv
    total += act * (2 * hq + 2 * kv_saved) + 4 * a.heads  # q, k, v after RoPE, the output, fp32 log-sum-exp
    if eager_seq:
        total += a.heads * eager_seq * (4 + act)  # eager attention keeps the fp32 softmax and its cast
    total += 3 * a.intermediate * residual  # gate output (SiLU input), SiLU output and up output (their product)
    d_in = {"attn_in": h, "attn_out": hq, "mlp_in": h, "mlp_mid": a.intermediate}
    if act == 4 and (dropout == 0 or fused_dropout):
        # fp32 end to end: modules reading the same tensor share the one saved copy of it, and o_proj reads
        # the attention output that attention already saved (a transposed view of the same storage)
        total += sum(4 * d_in[g] for g in {GROUPS[t] for t in targets} - ({"attn_out"} if attn_out_shared else set()))
    else:
        # mixed precision: each LoRA A casts its input separately; PEFT's dropout keeps its own output
        total += sum(act * d_in[GROUPS[t]] for t in targets)
    if dropout > 0:  # each LoRA layer's dropout mask
        total += sum((1 if fused_dropout else mask_bytes) * d_in[GROUPS[t]] for t in targets)
    total += len(targets) * act * r  # LoRA B's input (A's output)
    return total


def attention_facts(cfg, device: str) -> dict:
    """What the attention kernel that training really runs keeps (train/setup.py: models/attention.py's per-sample
    kernels for sdpa and eager, flash attention's varlen path): never an L x L mask."""
    kernel = cfg.model.attn_implementation
    if kernel == "auto" or (device == "cpu" and kernel.startswith("flash")):
        kernel = "sdpa"  # on CUDA auto may be flash_attention_2: it keeps the same as per-sample sdpa, GQA included
    return {
        "kernel": {"sdpa": "lorafit_sdpa", "eager": "lorafit_eager"}.get(kernel, kernel),
        # sdpa's own GQA is used on CUDA; on CPU it is slower than repeating k/v, so they are repeated; eager repeats
        "kv_expanded": kernel == "eager" or device == "cpu",
        "eager_seq": cfg.data.max_length if kernel == "eager" else 0,  # scores of one sample: at most max_length wide
        "mask_bytes": 1 if device == "cuda" else None,  # None: the compute dtype's bytes
        "attn_out_shared": not cfg.data.packing or kernel.startswith("flash"),
    }


def memory_terms(cfg, arch: Arch, counts: dict, device: str = "cuda") -> dict:
    """Every memory term in bytes for this config: on one GPU (one micro-batch in flight), or with device "cpu" the
    resident memory of `lorafit train` on this machine's CPU (auto dtype and precision are fp32 there)."""
    from lorafit.train.loss import CHUNK_ELEMENTS

    m, t, lora = cfg.model, cfg.training, cfg.lora
    fp32 = ("fp32", "auto") if device == "cpu" else ("fp32",)
    mixed = t.precision not in fp32 and m.dtype not in fp32
    act = 2 if mixed else 4
    weight_bytes = 4 if m.dtype in fp32 else 2
    quantized = m.quantization != "none"
    residual = 4 if quantized or not mixed else 2  # QLoRA: prepare_model_for_kbit_training upcasts embeddings to fp32
    tokens = t.micro_batch_size * cfg.data.max_length
    attention = attention_facts(cfg, device)
    fused = not lora.use_dora  # models/lora_dropout.py and lora_linear.py leave DoRA layers to PEFT
    frozen_bf16 = _frozen_bf16(cfg, device)
    base_weights, lora_bytes = _weight_bytes(cfg, counts, weight_bytes, mixed)
    base_weights -= _bf16_savings(counts, arch, fused) if frozen_bf16 else 0

    layer = activation_bytes_per_token_layer(
        arch,
        counts["targets"],
        lora.r,
        lora.dropout,
        act,
        residual,
        attention["kv_expanded"],
        attention["eager_seq"],
        attention["mask_bytes"] or act,
        attention["attn_out_shared"],
        fused_dropout=fused,
    )
    final_norm = 4 * arch.hidden + 4
    full = tokens * (arch.layers * layer + final_norm)
    # checkpointing keeps each layer's input, then recomputes one layer at a time in the backward pass
    checkpointed = tokens * (arch.layers * residual * arch.hidden + layer + final_norm)
    activations = checkpointed if t.gradient_checkpointing else full
    backward_working = tokens * layer  # gradients flowing through the layer being differentiated
    loss = _loss_bytes(cfg, arch, tokens, 2 if frozen_bf16 else act, residual, quantized and mixed, CHUNK_ELEMENTS)
    allocated = base_weights + lora_bytes + activations + backward_working + loss
    if device == "cpu":
        overhead = CPU_RUNTIME_BYTES + CPU_HEAP_RETENTION["fused" if fused else "peft"] * activations
    else:
        overhead = CONTEXT_BYTES + FRAGMENTATION * allocated
    return {
        "device": device,
        "attention": attention["kernel"],
        "frozen_linears": "bf16" if frozen_bf16 else None,
        "tokens_per_micro_batch": tokens,
        "base_weights": base_weights,
        "lora_weights_grads_optimizer": lora_bytes,
        "activations": activations,
        "activations_without_checkpointing": full,
        "activations_with_checkpointing": checkpointed,
        "activation_bytes_per_token_layer": layer,
        "backward_working": backward_working,
        "logits_and_loss": loss,
        "framework_overhead": overhead,
        "total": allocated + overhead,
    }


def _frozen_bf16(cfg, device: str) -> bool:
    """Whether training keeps the frozen linear layers in bf16 over fp32 weights (`model.frozen_dtype`): on the CPU
    as runtime decides it on this machine, on a GPU only where asked for over fp32 weights and precision."""
    m, t = cfg.model, cfg.training
    if device == "cpu":
        return pick_frozen_dtype(m, t.precision) is not None
    return m.frozen_dtype == "bf16" and m.dtype == t.precision == "fp32" and m.quantization == "none"


def _bf16_savings(counts: dict, arch: Arch, fused: bool) -> int:
    """Bytes models/frozen.py saves over fp32: decoder linears in bf16 (DoRA's stay fp32), the LM head in bf16, or a
    bf16 copy of it beside the fp32 embeddings it is tied to (a cost)."""
    head = arch.vocab * arch.hidden
    return (counts["linear"] if fused else 0) * 2 + (-head if counts.get("tied_head") else head) * 2


def _weight_bytes(cfg, counts: dict, weight_bytes: int, mixed: bool) -> tuple[float, float]:
    """(frozen base weights, LoRA weights + grads + optimizer state) in bytes."""
    m, base = cfg.model, counts["base"]
    if m.quantization != "none":  # quantized decoder linears; embeddings, LM head and norms upcast to fp32 by PEFT
        per = NF4_BYTES if m.quantization == "4bit" else INT8_BYTES
        base_weights = counts["linear"] * per + (base - counts["linear"]) * 4
    else:
        base_weights = base * weight_bytes
    states = {"adamw_torch": 8, "paged_adamw_8bit": 2}[cfg.training.optimizer]
    lora_bytes = (
        counts["trainable_bytes"] * 2 + counts["trainable"] * states
    )  # weights + grads (same dtype) + optimizer
    if mixed:
        lora_bytes += counts["trainable"] * 2  # autocast's cached bf16 copies of the fp32 adapter weights
    return base_weights, lora_bytes


def _loss_bytes(cfg, arch: Arch, tokens: int, act: int, residual: int, head_cast: bool, chunk: int) -> int:
    """act: bytes of the head's matmul dtype."""
    head_copy = arch.vocab * arch.hidden * 2 if head_cast else 0  # the fp32 LM head cast for the matmul (QLoRA)
    if cfg.training.loss == "plain":
        # bf16 logits, their fp32 copy and log-softmax in the forward; at the start of backward the saved
        # fp32 log-softmax, its gradient and the logits' gradient: 12 bytes per vocabulary entry
        return tokens * arch.vocab * 12 + head_copy
    buffers = min(chunk, tokens * arch.vocab) * (act + 4 if act != 4 else 4)  # one chunk of logits: matmul dtype + fp32
    grad_h = tokens * arch.hidden * residual  # d loss / d hidden, computed in the forward, kept for backward
    hidden_list = tokens * (arch.layers + 1) * arch.hidden * residual  # output_hidden_states at the end of forward
    return max(buffers + grad_h + head_copy, hidden_list)


def verdicts(total: float) -> list[dict]:
    out = []
    for size, cards, usable in GPUS:
        used = total / (usable * GiB)
        out.append(
            {
                "gpu": size,
                "cards": cards,
                "usable_gib": usable,
                "fraction": used,
                "verdict": "fits" if used <= 0.9 else "tight" if used <= 1.0 else "does not fit",
            }
        )
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
        steps.append(
            (
                f"training.micro_batch_size={mb} training.gradient_accumulation={accum}",
                {"training": {"micro_batch_size": mb, "gradient_accumulation": accum}},
            )
        )
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
    return cfg.model_copy(
        update={section: getattr(cfg, section).model_copy(update=fields) for section, fields in change.items()}
    )


def _collapse(applied: list[str]) -> list[str]:
    """Keep only the last value of each field (micro-batch halvings collapse to the final one)."""
    latest: dict[str, str] = {}
    for label in applied:
        for item in label.split():
            latest[item.split("=")[0]] = item
    return list(latest.values())


def resolve_gpu(name: str | None) -> int | None:
    if name is None:
        return None
    key = name.lower().replace(" ", "").replace("nvidia", "").replace("rtx", "").replace("geforce", "")
    if key not in GPU_NAMES:
        raise ConfigError(
            f"`--gpu {name}` is not a GPU lorafit knows.",
            f"Use a card ({', '.join(sorted(k for k in GPU_NAMES if not k[0].isdigit()))}) or a size (24, 40, 48, 80, 141).",
        )
    return GPU_NAMES[key]
