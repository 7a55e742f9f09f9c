"""Data: synthetic domains, manifests, decoding, transforms, DVC access and versions."""
