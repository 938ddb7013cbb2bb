"""Training memory as a sum of named terms, each a formula of the architecture and the config.

The activation formula lists, per token and layer, the tensors autograd keeps for the backward pass of a
LoRA-wrapped Llama layer (tests/test_plan.py checks it against the tensors PyTorch actually saves).
"""

from __future__ import annotations

from lorafit.errors import ConfigError
from lorafit.plan.architecture import Arch

# (size class, cards, GiB usable by PyTorch: nvidia-smi's total minus ECC/driver reservations)
GiB = 1024**3


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


def resolve_gpu(name: str | None) -> int | None:
    if name is None:
        return None
    key = name.lower().replace(" ", "").replace("nvidia", "").replace("rtx", "").replace("geforce", "")
    if key not in GPU_NAMES:
        raise ConfigError(f"`--gpu {name}` is not a GPU lorafit knows.",
                          f"Use a card ({', '.join(sorted(k for k in GPU_NAMES if not k[0].isdigit()))}) or a size (24, 40, 48, 80, 141).")
    return GPU_NAMES[key]
