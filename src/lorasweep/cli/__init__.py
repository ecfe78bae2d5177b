"""What the entry points share: the user-error harness, and the Hydra callbacks of every command."""
