"""Hydra config groups shipped with the launcher (model, data, optimizer, trainer, checkpoint, mesh, cluster)."""
