"""The MLflow model registry: gates, promotion, pyfunc model, lineage, reproduction."""
