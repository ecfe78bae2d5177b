"""How a model is scored and compared: metrics, the TF-IDF baseline, the blend with it, reports."""
