"""Using a registered model: batch prediction from the registry."""
