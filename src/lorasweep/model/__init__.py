"""The model a run trains: tokenizer, sequence classifier and LoRA, its losses, the head's warm start."""
