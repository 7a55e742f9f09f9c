"""prepare stage: scan each domain's ImageFolder tree into a manifest under data/prepared/,
and the unlabelled target pool (``data.target.unlabeled_path``) into its own."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from roadshift.config import DOMAINS, UNLABELED_POOL, Params
from roadshift.data.manifest import (
    build_manifest,
    build_unlabeled_manifest,
    drop_labelled_copies,
    empty_manifest,
    write_manifest,
)
from roadshift.layout import Layout

DROPPED_SHOWN = 5


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


def unlabeled_dir(params: Params, root: Path) -> Path | None:
    """The unlabelled target folder, or None when ``data.target.unlabeled_path`` is not set."""
    path = params.data.target.unlabeled_path
    if path is None:
        return None
    folder = path if path.is_absolute() else root / path
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: unlabelled target folder not found (params key "
            f"data.target.unlabeled_path = {path}); point the key at a folder of target images, "
            "set it to null for none, or create the embedded data with `roadshift data synth`"
        )
    return folder


def unlabeled_pool(
    params: Params, root: Path, labelled_target: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pool, dropped)``: the unlabelled manifest without the images that are labelled target
    images already (``drop_labelled_copies``), and those dropped; empty without a pool."""
    folder = unlabeled_dir(params, root)
    if folder is None:
        return empty_manifest(), empty_manifest()
    pool = build_unlabeled_manifest(folder, params.prepare, root)
    return drop_labelled_copies(pool, labelled_target)


def _report_pool(pool: pd.DataFrame, dropped: pd.DataFrame) -> None:
    line = f"prepare: {UNLABELED_POOL}: {len(pool)} unlabelled image(s)"
    if len(dropped):
        shown = ", ".join(dropped["path"].head(DROPPED_SHOWN))
        more = " …" if len(dropped) > DROPPED_SHOWN else ""
        line += (
            f"; {len(dropped)} dropped as byte-identical to labelled target images "
            f"(e.g. {shown}{more})"
        )
    print(line)


def run_prepare(params: Params, root: Path) -> dict[str, Path]:
    layout = Layout(root)
    folders = {domain: domain_dir(params, domain, root) for domain in DOMAINS}
    unlabeled_dir(params, root)  # a missing pool folder fails before any image is decoded
    written, manifests = {}, {}
    for domain, folder in folders.items():
        manifests[domain] = build_manifest(folder, domain, params.prepare, root)
        written[domain] = write_manifest(manifests[domain], layout.manifest(domain))
    pool, dropped = unlabeled_pool(params, root, manifests["target"])
    if params.data.target.unlabeled_path is not None:
        _report_pool(pool, dropped)
    written[UNLABELED_POOL] = write_manifest(pool, layout.unlabeled_manifest)
    return written
