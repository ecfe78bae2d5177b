"""The model a run trains: tokenizer, classifier and LoRA, its losses, the head's warm start."""
