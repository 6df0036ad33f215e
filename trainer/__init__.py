"""Training-side code that runs on each TPU host (model, data, training loop)."""
