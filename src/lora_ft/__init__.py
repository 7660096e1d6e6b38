"""lora_ft: parameter-efficient fine-tuning (LoRA / QLoRA) of encoder and decoder models from one recipe."""

__version__ = "0.1.0"
