"""prepare stage: scan each domain's ImageFolder tree into a manifest under data/prepared/."""

from __future__ import annotations

from pathlib import Path

from roadshift.config import DOMAINS, Params
from roadshift.data.manifest import build_manifest, write_manifest
from roadshift.layout import Layout


def domain_dir(params: Params, domain: str, root: Path) -> Path:
    """The domain's data folder; relative paths in params.yaml are relative to the project root."""
    path = params.data.domain(domain).path
    folder = path if path.is_absolute() else root / path
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: {domain} data folder not found (params key data.{domain}.path = {path}); "
            "point the key at an ImageFolder tree, "
            "or create the embedded data with `roadshift synth`"
        )
    return folder


def run_prepare(params: Params, root: Path) -> dict[str, Path]:
    layout = Layout(root)
    folders = {domain: domain_dir(params, domain, root) for domain in DOMAINS}
    written = {}
    for domain, folder in folders.items():
        manifest = build_manifest(folder, domain, params.prepare, root)
        written[domain] = write_manifest(manifest, layout.manifest(domain))
    return written
