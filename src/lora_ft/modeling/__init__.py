"""The model: where its weights come from (Hub, folder, GGUF, example), loading and quantizing it, its LoRA
adapters (targets, peft config, the fused dropout) and how its blocks are numbered."""
