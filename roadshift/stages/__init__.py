"""One module per dvc.yaml stage; ``runner`` runs one as ``roadshift stage <name>`` does."""
