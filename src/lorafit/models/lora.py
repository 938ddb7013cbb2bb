"""LoRA on the base model through PEFT, and the parameter counts users see."""

from __future__ import annotations

from lorafit.runtime import sharded_launch


def lora_config(lora_cfg):
    from peft import LoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva"}[lora_cfg.init]
    targets = lora_cfg.target_modules
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        use_rslora=lora_cfg.use_rslora,
        use_dora=lora_cfg.use_dora,
        init_lora_weights=init,
        modules_to_save=lora_cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model, lora_cfg, gradient_checkpointing: bool = False):
    """Wrap the base in a PEFT model; k-bit bases are prepared the way PEFT intends."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    kbit = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # Under FSDP / ZeRO-3 the k-bit preparation (all other weights up-cast to fp32) would break the one dtype
    # they shard by; the 4-bit weights are stored in the model's dtype instead (load_base_model).
    if kbit and not sharded_launch():
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_checkpointing(model)
    return get_peft_model(model, lora_config(lora_cfg))


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, under the name this transformers has (newer releases renamed
    `gradient_checkpointing_enable`, and the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) as PEFT counts them (4-bit weights count their unpacked size)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def describe_parameters(trainable: int, total: int) -> str:
    return f"trainable {trainable:,} / {total:,} params ({100 * trainable / total:.2f}%)"
