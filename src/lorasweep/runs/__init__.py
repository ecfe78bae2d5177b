"""A finished run read back: its config, label map, serializer and model, and batched prediction."""
