"""MLflow from rank 0: one run per training, a sweep's parent run, and the multirun callback."""
