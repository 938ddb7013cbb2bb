"""Run configuration: pydantic models (a typo is an error), YAML loading, and dotted CLI overrides.

Every field is documented where it is defined; `lorafit config-reference` prints them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorafit.config_yaml import MAX_CONFIG_BYTES, parse_yaml, resolve_paths
from lorafit.errors import ConfigError
from lorafit.redact import redact


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        "smollm2-135m-instruct", description="Local path, Hugging Face Hub id, or `smollm2-135m-instruct` (embedded)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights/compute dtype; auto = bf16 on GPUs that support it, fp32 on CPU."
    )
    frozen_dtype: Literal["auto", "bf16", "same"] = Field(
        "auto",
        description="The frozen base's linear layers (weights and their matmuls); LoRA weights, activations and the "
        "optimizer stay in `dtype`. auto = bf16 on a CPU with a bf16 matrix unit (Intel AMX: ~4x its fp32 matmul "
        "rate) when `dtype` is auto and it and `training.precision` resolve to fp32, else same; same = `dtype`.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the base in 4-bit NF4 (double quant) or 8-bit via bitsandbytes."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = flash_attention_2 when installed on CUDA, else sdpa."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repository. Off unless you trust its author."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer path or id if not the model's own (e.g. an `original/tokenizer.model` tiktoken file).",
    )
    adapter: str | None = Field(
        None,
        description="A finished lorafit run directory (or PEFT adapter folder) whose adapter is trained further "
        "instead of a new one; its base is the run's `model.name`, and with `training.method: dpo` the adapter "
        "as loaded is the frozen reference model.",
    )


class DataSource(Section):
    path: str = Field(
        ..., description="File (.jsonl .json .csv .tsv .parquet), glob, `save_to_disk` folder, or Hub dataset id."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference"] = Field(
        "auto", description="Row form; auto-detected from the first valid row (`preference`: chosen/rejected pairs)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns to the names the format expects, e.g. {question: prompt}."
    )
    weight: float = Field(
        1.0, gt=0, description="Mixing weight: the source is sampled to weight × its size (1.0 = as is)."
    )
    split: str = Field("train", description="Split name for Hub datasets.")


class DataSection(Section):
    train: list[DataSource] = Field(
        default_factory=list, description="Training sources (a path string is accepted for one source)."
    )
    validation: list[DataSource] = Field(
        default_factory=list, description="Validation sources; if empty, `val_fraction` of train is held out."
    )
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training rows held out for validation (seeded)."
    )
    template: Literal["auto", "model", "llama3"] = Field(
        "auto", description="Chat format: the tokenizer's own template (model), built-in Llama 3.1 (llama3), or auto."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    train_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description="Which tokens carry loss.")
    tools_in_user_message: bool = Field(
        True,
        description="Llama 3.1 tool rows: tool definitions in the first user "
        "message (the official default) or, if false, in the system message.",
    )
    max_length: int = Field(2048, ge=8, description="Longest sample (and packed row) in tokens.")
    truncation: Literal["drop", "right"] = Field(
        "drop", description="Over-long samples: drop them (counted) or cut on the right."
    )
    packing: bool = Field(
        True,
        description="Lay each micro-batch's samples out in as few rows of max_length as "
        "fit, with no attention across samples: less padding, the same samples "
        "per step.",
    )
    skip_invalid: bool = Field(
        False, description="Skip invalid rows (counted) instead of stopping with the list of problems."
    )
    num_proc: int | Literal["auto"] = Field(
        "auto", description="Processes for tokenization; auto = one per CPU core (at most 8) from 20,000 rows, else 1."
    )

    @field_validator("num_proc", mode="before")
    @classmethod
    def _procs(cls, value: Any) -> Any:  # one plain message instead of one per member of the union
        if value == "auto":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
            raise ValueError("must be a whole number of processes (1 or more) or auto")
        return number

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer but the LM head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    init: Literal["default", "gaussian", "pissa", "olora", "eva"] = Field(
        "default", description="LoRA weight initialisation (PEFT `init_lora_weights`)."
    )


class TrainingSection(Section):
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning on answers; dpo: preference tuning on chosen/rejected pairs "
        "(TRL's DPOTrainer; settings in `dpo`; `data.packing` and `data.train_on` do not apply; needs "
        "`pip install 'lorafit[dpo]'`).",
    )
    epochs: float = Field(
        3,
        gt=0,
        description="Passes over the training data (ignored when max_steps > 0; raised "
        "for small data to reach min_steps).",
    )
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 = derived from epochs and min_steps.")
    min_steps: int = Field(
        150,
        ge=0,
        description="Fewest optimizer steps when derived from epochs: small data gets "
        "more epochs so it still learns (0 = off; supervised runs only, DPO takes its epochs).",
    )
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Samples per device per forward pass, with or without "
        "packing (packing lays them out in fewer rows).",
    )
    gradient_accumulation: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step: a step trains on "
        "micro_batch_size × gradient_accumulation × devices "
        "samples.",
    )
    learning_rate: float | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate; auto = 2e-4 × 4096 / the model's hidden size, at most 2e-3 (2e-4 "
        "for Llama 3.1 8B, 1e-4 for 70B, 1.4e-3 for the embedded SmolLM2).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw_torch", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="adamw_torch: torch's AdamW, its fused kernel; paged_adamw_8bit needs bitsandbytes."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto = bf16 on GPUs that have it, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (non-reentrant) to save memory."
    )
    loss: Literal["chunked", "plain", "liger"] = Field(
        "chunked", description="chunked never materialises the full logits; liger uses Liger's fused kernel on CUDA."
    )
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only the final adapter).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    max_bad_steps: int = Field(
        3,
        ge=1,
        description="Stop after this many optimizer steps in a row with a NaN/inf loss or gradients (each is skipped).",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Extra experiment trackers."
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:  # one plain message instead of one per member of the union
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = 0.0
        if isinstance(value, bool) or not number > 0 or number == float("inf"):
            raise ValueError("must be a positive number (e.g. 2e-4) or auto")
        return number


class DpoSection(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="How far the tuned model may move from the reference (higher = closer); IPO's tau.",
    )
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="Preference loss: sigmoid (DPO), ipo (IPO, length-normalised) or hinge (SLiC)."
    )
    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probabilities of every pair once before training, instead of a "
        "reference forward pass at every step.",
    )


class EvalSection(Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts answered by the base model before and the tuned model after training.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")


class OutputSection(Section):
    dir: str = Field("runs", description="Parent folder of run directories.")
    name: str | None = Field(None, description="Run directory name; default: config file stem.")
    overwrite: bool = Field(False, description="Replace an existing run directory of the same name.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        """The run directory is `dir/name`: a name with `/`, `..` or an absolute path would write outside `dir`."""
        if value is not None and (value.strip() in ("", ".", "..") or any(c in value for c in "/\\\0")):
            raise ValueError(
                "must be a plain folder name (no `/`, `\\`, `..` or absolute path): the run directory is "
                "created inside `output.dir`; set `output.dir` to choose where"
            )
        return value


class RunConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        problems = []
        if self.lora.use_dora and self.model.quantization == "8bit":
            problems.append(
                "`lora.use_dora` with `model.quantization: 8bit` is not supported by PEFT; use 4bit or no quantization."
            )
        if self.training.method == "sft" and self.dpo != DpoSection():
            problems.append("`dpo` settings are only used with `training.method: dpo`; set it, or remove them.")
        if self.model.adapter and self.lora != LoraSection():
            problems.append(
                "`lora` settings cannot change an existing adapter (`model.adapter`): it keeps its own rank, "
                "targets and scaling; remove the `lora` section."
            )
        if problems:
            raise ValueError(" ".join(problems))
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  - `{loc}`: unknown field (got {got!r}); check the spelling — `lorafit config-reference` lists every field."
            )
        else:
            lines.append(f"  - `{loc}`: {e['msg']} (got {_short(got)}).")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings; values are parsed as YAML scalars/lists (`lora.r=8`, `data.packing=false`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form key.sub=value (e.g. training.learning_rate=1e-4).")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{item}`: `{part}` is not a section.")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {key}") if value.strip() else ""
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; every problem is reported at once."""
    raw: Any = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist.", "Pass a YAML file, e.g. `lorafit train configs/demo.yaml`."
            )
        if p.stat().st_size > MAX_CONFIG_BYTES:  # before reading it: a multi-GB file must not be loaded to be refused
            raise ConfigError(f"{source}: the config is larger than {MAX_CONFIG_BYTES:,} bytes; refused.")
        raw = parse_yaml(p.read_text(encoding="utf-8", errors="replace"), source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: the config must be a mapping of sections (model, data, lora, training, dpo, eval, output), got {type(raw).__name__}."
            )
        resolve_paths(raw, p.parent)
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        error = ConfigError(_format_errors(err, source))
        error.fields = {".".join(str(p) for p in e["loc"]) or "": e["msg"] for e in err.errors()}  # for `lorafit ui`
        raise error from None
    if path is not None and cfg.output.name is None:
        try:
            cfg.output.name = Path(path).stem
        except ValidationError:  # a config file named `..yaml`
            raise ConfigError(
                f"{source}: the file name `{Path(path).stem}` cannot be the run name (`output.name`).",
                "Set `output.name` in the config, or rename the file.",
            ) from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return redact(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))  # config.yaml never holds a token
