"""lorafit: LoRA and QLoRA fine-tuning of Llama-architecture models on your own data."""

__version__ = "0.1.0"
