"""The training engine: loop, loaders, checkpoints, models, runtime settings."""
