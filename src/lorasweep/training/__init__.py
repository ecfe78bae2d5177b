"""One training run: the recipe (pipeline), the Trainer around it, its callbacks, DeepSpeed, and the
launcher that starts N ranks from one process."""
