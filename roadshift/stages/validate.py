"""validate stage: a Great Expectations suite over each domain's manifest, plus cross-domain checks.

Every check runs, failed or not, and the reports under reports/validation/ are written before
DataValidationError is raised, so a failed run can be read in full. Great Expectations is
imported inside ``run_validate``: it costs seconds and no other stage needs it.

Two tables are validated per domain, each with its own suite: ``<domain>.images`` (one row per
manifest row, plus derived columns for leakage and missing files) and ``<domain>.classes`` (one
row per class with its train-split count), because GX binds a suite to one batch and the
per-class rules need a per-class row to name the class that breaks them.

The unlabelled target pool (``data.target.unlabeled_path``) gets one suite,
``target_unlabeled.images``: the labelled trees' per-image rules (sides, pixel mode, file format,
files present, one row per path) and none about labels, classes or splits. An empty pool passes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from roadshift.config import DOMAINS, SPLITS, UNLABELED_POOL, Params, ValidateSection
from roadshift.data.images import ACCEPTED_MODES, formats_for_extensions
from roadshift.data.manifest import (
    MANIFEST_COLUMNS,
    UNLABELED_SPLIT,
    DatasetLayoutError,
    build_manifest_with_problems,
    read_manifest,
    scan_image_folder,
)
from roadshift.errors import RoadshiftError
from roadshift.jsonio import write_json, write_metrics
from roadshift.layout import Layout
from roadshift.stages.validation_report import write_html_report

EXAMPLES_SHOWN = 5
EXAMPLES_KEPT = 20
LEAKAGE_COLUMN = "splits_sharing_content"
EXISTS_COLUMN = "file_exists"
TRAIN_COUNT_COLUMN = "train_images"
RATIO_COLUMN = "ratio_to_smallest"
SHARE_COLUMN = "share_of_images"
WITHIN_BOUNDS_COLUMN = "share_within_bounds"


class DataValidationError(RoadshiftError, ValueError):
    """The data failed validation; the message has one line per failed check."""

    def __init__(self, failures: Sequence[str], report_dir: Path) -> None:
        self.failures = tuple(failures)
        self.report_dir = report_dir
        lines = [
            f"data validation failed ({len(failures)} problem(s); full report in {report_dir}):"
        ]
        lines += [f"  - {line}" for line in failures]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ValidationSummary:
    success: bool
    images: dict[str, dict[str, int]]
    """domain -> split -> image count (and "total"); the unlabelled pool, ``target_unlabeled``,
    has only "total"."""
    classes: dict[str, dict[str, dict[str, int]]]
    """domain -> split -> class -> image count."""
    artifacts: list[Path] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            f"{domain}_{split}_images": float(count)
            for domain, splits in self.images.items()
            for split, count in splits.items()
        }


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome, flattened for summary.json and the error message."""

    domain: str
    suite: str
    expectation: str
    column: str | None
    success: bool
    check: str
    hint: str
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list[str] = field(default_factory=list)
    observed: Any = None
    error: str | None = None

    def failure_line(self) -> str:
        where = f"{self.domain} {self.expectation}" + (f" on {self.column}" if self.column else "")
        return f"{where}: {self.describe()}; fix: {self.hint}"

    def describe(self) -> str:
        if self.error:
            return f"could not be checked ({self.error})"
        shown = ", ".join(self.examples[:EXAMPLES_SHOWN])
        if self.unexpected_count is not None:
            rows = {"classes": "classes", "splits": "splits"}.get(
                self.suite.rsplit(".", 1)[-1], "images"
            )
            failed = f"{self.unexpected_count} of {self.element_count} {rows} fail"
            more = " …" if self.unexpected_count > EXAMPLES_SHOWN else ""
            return f"{failed}, e.g. {shown}{more}" if shown else failed
        return f"failed ({shown})" if shown else "failed"


# --- derived tables --------------------------------------------------------------------------


def images_table(manifest: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The manifest plus a column per derived rule, so GX can name the offending files."""
    table = manifest.copy()
    if {"sha256", "split"} <= set(table.columns):
        table[LEAKAGE_COLUMN] = table.groupby("sha256", dropna=False)["split"].transform("nunique")
    else:
        table[LEAKAGE_COLUMN] = 1  # the missing column is reported by its own expectation
    if "path" in table.columns:
        table[EXISTS_COLUMN] = [isinstance(p, str) and (root / p).is_file() for p in table["path"]]
    else:
        table[EXISTS_COLUMN] = True
    return table


def classes_table(manifest: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Train-split image count per expected class (0 where a class has none)."""
    if {"label", "split"} <= set(manifest.columns):
        train = manifest.loc[manifest["split"] == "train", "label"].value_counts()
    else:
        train = pd.Series(dtype="int64")
    counts = pd.Series([int(train.get(label, 0)) for label in labels], dtype="int64")
    positive = counts[counts > 0]
    smallest = int(positive.min()) if len(positive) else 1
    return pd.DataFrame(
        {"label": list(labels), TRAIN_COUNT_COLUMN: counts, RATIO_COLUMN: counts / smallest}
    )


def splits_table(manifest: pd.DataFrame, cfg: ValidateSection) -> pd.DataFrame:
    """Each split's share of the domain's images next to its allowed range."""
    if "split" in manifest.columns and len(manifest):
        shares = manifest["split"].value_counts(normalize=True)
    else:
        shares = pd.Series(dtype="float64")
    rows = []
    for split in SPLITS:
        bounds = getattr(cfg.split_fractions, split)
        share = float(shares.get(split, 0.0))
        rows.append(
            {
                "split": split,
                SHARE_COLUMN: round(share, 4),
                WITHIN_BOUNDS_COLUMN: bool(bounds.min - 1e-9 <= share <= bounds.max + 1e-9),
            }
        )
    return pd.DataFrame(rows)


def _splits_expectations(gx: Any, cfg: ValidateSection) -> list[Any]:
    ranges = ", ".join(
        f"{split} {getattr(cfg.split_fractions, split).min:g}-"
        f"{getattr(cfg.split_fractions, split).max:g}"
        for split in SPLITS
    )
    return [
        gx.expectations.ExpectColumnValuesToBeInSet(
            column=WITHIN_BOUNDS_COLUMN,
            value_set=[True],
            meta={
                "check": "split_proportions",
                "hint": f"these splits hold a share of the images outside {ranges} "
                "(validate.split_fractions); move images between split folders or adjust "
                "the bounds",
            },
        )
    ]


# --- suites ----------------------------------------------------------------------------------


def _images_expectations(
    gx: Any,
    domain: str,
    labels: Sequence[str],
    cfg: ValidateSection,
    data_path: Path,
    accepted_formats: Sequence[str],
) -> list[Any]:
    e = gx.expectations
    required_splits = sorted(set(cfg.require_splits) | ({"test"} if domain == "target" else set()))
    return [
        *_manifest_shape_expectations(gx, ("path", "label", "split", "sha256", "width", "height")),
        e.ExpectColumnValuesToBeInSet(
            column="domain",
            value_set=[domain],
            meta={"check": "domain", "hint": f"the {domain} manifest must only list {domain} rows"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="label",
            value_set=list(labels),
            meta={"check": "labels", "hint": "class folders must use the shared label set"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="split",
            value_set=list(SPLITS),
            meta={"check": "splits", "hint": f"split folders must be named {', '.join(SPLITS)}"},
        ),
        e.ExpectColumnDistinctValuesToContainSet(
            column="split",
            value_set=required_splits,
            meta={
                "check": "required_splits",
                "hint": f"add images under {data_path.as_posix()}/<split>/<class>/ "
                "for each missing split (validate.require_splits; the target test split is "
                "always required), or use the flat <class>/<image> layout so splits are "
                "assigned by content hash",
            },
        ),
        *_image_file_expectations(gx, cfg, accepted_formats),
        e.ExpectColumnValuesToBeInSet(
            column=LEAKAGE_COLUMN,
            value_set=[1],
            meta={
                "check": "leakage",
                "hint": "identical image bytes sit in more than one split (train/val/test "
                "leakage); keep each duplicate in one split only, or delete the copies",
            },
        ),
        _files_exist_expectation(gx),
    ]


def _manifest_shape_expectations(gx: Any, required: Sequence[str]) -> list[Any]:
    """What any manifest prepare wrote has: every column, no gaps in ``required``, each path
    once. A failure here means the manifest, not the images, is at fault."""
    e = gx.expectations
    hint = "re-run the prepare stage to rebuild the manifest"
    return [
        *(
            e.ExpectColumnToExist(column=column, meta={"check": "columns", "hint": hint})
            for column in MANIFEST_COLUMNS
        ),
        *(
            e.ExpectColumnValuesToNotBeNull(column=column, meta={"check": "nulls", "hint": hint})
            for column in required
        ),
        e.ExpectColumnValuesToBeUnique(
            column="path",
            meta={"check": "unique_paths", "hint": "re-run the prepare stage"},
        ),
    ]


def _image_file_expectations(
    gx: Any, cfg: ValidateSection, accepted_formats: Sequence[str]
) -> list[Any]:
    """What each image file must be, labelled or not: sides in range, a pixel mode and a file
    format the loader converts by a documented rule, and not empty."""
    e = gx.expectations
    side = f"between {cfg.min_image_side} and {cfg.max_image_side} px"
    side_hint = (
        f"every side must be {side} (validate.min_image_side / validate.max_image_side); "
        "resize or remove these images"
    )
    return [
        *(
            e.ExpectColumnValuesToBeBetween(
                column=column,
                min_value=cfg.min_image_side,
                max_value=cfg.max_image_side,
                meta={"check": "image_side", "hint": side_hint},
            )
            for column in ("width", "height")
        ),
        e.ExpectColumnValuesToBeInSet(
            column="mode",
            value_set=list(ACCEPTED_MODES),
            meta={
                "check": "mode",
                "hint": f"convert these images to one of {', '.join(ACCEPTED_MODES)} "
                "(e.g. 8-bit RGB PNG/JPEG)",
            },
        ),
        e.ExpectColumnValuesToBeInSet(
            column="format",
            value_set=list(accepted_formats),
            meta={
                "check": "format",
                "hint": f"the file contents must be one of {', '.join(accepted_formats)} "
                "(the formats of prepare.extensions); convert these images to PNG or JPEG",
            },
        ),
        e.ExpectColumnValuesToBeBetween(
            column="bytes",
            min_value=1,
            meta={"check": "bytes", "hint": "re-run the prepare stage"},
        ),
    ]


def _files_exist_expectation(gx: Any) -> Any:
    return gx.expectations.ExpectColumnValuesToBeInSet(
        column=EXISTS_COLUMN,
        value_set=[True],
        meta={
            "check": "files_exist",
            "hint": "the manifest lists files that no longer exist; re-run the prepare stage",
        },
    )


def _unlabeled_expectations(
    gx: Any, cfg: ValidateSection, pool_path: Path | None, accepted_formats: Sequence[str]
) -> list[Any]:
    """The unlabelled pool: the per-image rules of the labelled trees, nothing about labels,
    classes or split shares (it has none), and no minimum size (the pool is optional)."""
    e = gx.expectations
    where = pool_path.as_posix() if pool_path is not None else "data.target.unlabeled_path"
    return [
        *_manifest_shape_expectations(gx, ("path", "split", "sha256", "width", "height")),
        e.ExpectColumnValuesToBeInSet(
            column="domain",
            value_set=["target"],
            meta={
                "check": "domain",
                "hint": f"the unlabelled pool ({where}) holds target images only",
            },
        ),
        e.ExpectColumnValuesToBeInSet(
            column="split",
            value_set=[UNLABELED_SPLIT],
            meta={
                "check": "splits",
                "hint": f"every row of the unlabelled manifest has the split {UNLABELED_SPLIT!r}; "
                "re-run the prepare stage",
            },
        ),
        *_image_file_expectations(gx, cfg, accepted_formats),
        _files_exist_expectation(gx),
    ]


def _classes_expectations(gx: Any, cfg: ValidateSection) -> list[Any]:
    e = gx.expectations
    return [
        e.ExpectColumnValuesToBeBetween(
            column=TRAIN_COUNT_COLUMN,
            min_value=cfg.min_images_per_class,
            meta={
                "check": "min_per_class",
                "hint": f"each class needs at least {cfg.min_images_per_class} train images "
                "(validate.min_images_per_class); add images to these classes",
            },
        ),
        e.ExpectColumnValuesToBeBetween(
            column=RATIO_COLUMN,
            max_value=cfg.max_imbalance_ratio,
            meta={
                "check": "imbalance",
                "hint": f"these classes have more than {cfg.max_imbalance_ratio:g}x the train "
                "images of the smallest class (validate.max_imbalance_ratio); add images to the "
                "small classes or subsample the large ones",
            },
        ),
    ]


class _GxRunner:
    """One ephemeral GX context with a pandas datasource; one validation definition per suite."""

    def __init__(self, examples_kept: int = EXAMPLES_KEPT) -> None:
        self.examples_kept = examples_kept
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(
            globally=False, metric_calculations=False
        )
        self.datasource = self.context.data_sources.add_pandas("roadshift_manifests")
        self.batches: dict[str, Any] = {}

    def _batch_definition(self, table: str) -> Any:
        if table not in self.batches:
            asset = self.datasource.add_dataframe_asset(table)
            self.batches[table] = asset.add_batch_definition_whole_dataframe(f"{table}_whole")
        return self.batches[table]

    def validate(
        self, suite_name: str, table: str, frame: pd.DataFrame, expectations: list[Any], index: str
    ) -> Any:
        suite = self.context.suites.add(self.gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = self.context.validation_definitions.add(
            self.gx.ValidationDefinition(
                name=suite_name, data=self._batch_definition(table), suite=suite
            )
        )
        result_format = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": self.examples_kept,
            "unexpected_index_column_names": [index] if index in frame.columns else [],
        }
        return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)


# --- results ---------------------------------------------------------------------------------


def _example(entry: Any, column: str | None, index: str, check: str) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    name = entry.get(index, "?")
    if check in {"leakage", "files_exist"} or column is None:
        return str(name)
    return f"{name} ({column}={_plain(entry.get(column))})"


def _check_result(domain: str, suite: str, result: Any, index: str) -> CheckResult:
    config = result.expectation_config
    meta = config.meta or {}
    column = config.kwargs.get("column")
    check = meta.get("check", config.type)
    details = result.result or {}
    info = result.exception_info or {}
    error = None
    if info.get("raised_exception"):
        error = info.get("exception_message")
    elif "raised_exception" not in info:  # GX keys errors by metric when several metrics fail
        messages = [v.get("exception_message") for v in info.values() if isinstance(v, dict)]
        error = "; ".join(dict.fromkeys(m for m in messages if m)) or None
    examples = [
        _example(e, column, index, check)
        for e in details.get("partial_unexpected_index_list") or []
    ]
    if not examples and details.get("partial_missing_list"):
        examples = [f"missing {value!r}" for value in details["partial_missing_list"]]
    if config.type == "expect_column_to_exist" and not result.success:
        examples = ["column missing"]
    return CheckResult(
        domain=domain,
        suite=suite,
        expectation=config.type,
        column=column,
        success=bool(result.success),
        check=check,
        hint=meta.get("hint", ""),
        unexpected_count=details.get("unexpected_count"),
        element_count=details.get("element_count"),
        examples=examples,
        observed=_plain(details.get("observed_value")),
        error=error,
    )


def _plain(value: Any) -> Any:
    """numpy scalars and containers to JSON types."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    return value


# --- cross-domain ----------------------------------------------------------------------------


def _labels(manifest: pd.DataFrame) -> set[str]:
    return set(manifest["label"].dropna()) if "label" in manifest else set()


def cross_domain_failures(source: pd.DataFrame, target: pd.DataFrame) -> tuple[list[str], dict]:
    """Label sets must match; target test images must not also be source images."""
    failures, report = [], {}
    only_source = sorted(_labels(source) - _labels(target))
    only_target = sorted(_labels(target) - _labels(source))
    report["label_sets_match"] = not (only_source or only_target)
    report["only_in_source"], report["only_in_target"] = only_source, only_target
    if only_source or only_target:
        in_source, in_target = ", ".join(only_source), ", ".join(only_target)
        failures.append(
            f"cross-domain label sets differ: only in source: {in_source or '(none)'}; "
            f"only in target: {in_target or '(none)'}; "
            "fix: both domains need a folder for every class (same names), "
            "or remove the extra classes"
        )
    leaked: list[str] = []
    if {"sha256", "split", "path"} <= set(target.columns) and "sha256" in source:
        test = target[target["split"] == "test"]
        leaked = sorted(test.loc[test["sha256"].isin(set(source["sha256"])), "path"])
    report["target_test_images_also_in_source"] = leaked
    if leaked:
        shown = ", ".join(leaked[:EXAMPLES_SHOWN]) + (" …" if len(leaked) > EXAMPLES_SHOWN else "")
        failures.append(
            f"cross-domain leakage: {len(leaked)} target test image(s) are byte-identical to "
            f"source images, e.g. {shown}; fix: remove them from one of the domains"
        )
    return failures, report


# --- counts, reports -------------------------------------------------------------------------


def _counts(manifest: pd.DataFrame) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    if not {"split", "label"} <= set(manifest.columns):
        return {"total": len(manifest)}, {}
    per_split = {split: int((manifest["split"] == split).sum()) for split in SPLITS}
    per_split["total"] = len(manifest)
    per_class = {
        split: {str(k): int(v) for k, v in group["label"].value_counts().sort_index().items()}
        for split, group in manifest.groupby("split")
    }
    return per_split, per_class


def _domain_report(checks: list[CheckResult], images: dict, classes: dict) -> dict:
    return {
        "success": all(c.success for c in checks),
        "images": images,
        "classes": classes,
        "expectations": [
            {
                "suite": c.suite,
                "expectation": c.expectation,
                "column": c.column,
                "check": c.check,
                "success": c.success,
                "unexpected_count": c.unexpected_count,
                "element_count": c.element_count,
                "unexpected_examples": c.examples,
                "observed_value": c.observed,
                "error": c.error,
            }
            for c in checks
        ],
    }


# --- stage -----------------------------------------------------------------------------------


def validate_domain(
    runner: _GxRunner,
    domain: str,
    manifest: pd.DataFrame,
    labels: Sequence[str],
    params: Params,
    root: Path,
    data_path: Path | None = None,
) -> tuple[list[CheckResult], dict[str, Any]]:
    """Run both suites of one domain; returns flattened checks and GX's own results."""
    gx = runner.gx
    expectations = _images_expectations(
        gx,
        domain,
        labels,
        params.validate,
        data_path or params.data.domain(domain).path,
        formats_for_extensions(params.prepare.extensions),
    )
    images_result = runner.validate(
        f"{domain}.images", "images", images_table(manifest, root), expectations, index="path"
    )
    classes_result = runner.validate(
        f"{domain}.classes",
        "classes",
        classes_table(manifest, labels),
        _classes_expectations(gx, params.validate),
        index="label",
    )
    splits_result = runner.validate(
        f"{domain}.splits",
        "splits",
        splits_table(manifest, params.validate),
        _splits_expectations(gx, params.validate),
        index="split",
    )
    checks = [_check_result(domain, f"{domain}.images", r, "path") for r in images_result.results]
    checks += [
        _check_result(domain, f"{domain}.classes", r, "label") for r in classes_result.results
    ]
    checks += [_check_result(domain, f"{domain}.splits", r, "split") for r in splits_result.results]
    gx_json = {
        "images": _stable(images_result.to_json_dict()),
        "classes": _stable(classes_result.to_json_dict()),
        "splits": _stable(splits_result.to_json_dict()),
    }
    return checks, gx_json


def validate_unlabeled(
    runner: _GxRunner, manifest: pd.DataFrame, params: Params, root: Path
) -> tuple[list[CheckResult], dict[str, Any]]:
    """Run the unlabelled pool's one suite; flattened checks and GX's own result."""
    expectations = _unlabeled_expectations(
        runner.gx,
        params.validate,
        params.data.target.unlabeled_path,
        formats_for_extensions(params.prepare.extensions),
    )
    suite = f"{UNLABELED_POOL}.images"
    result = runner.validate(
        suite, "images", images_table(manifest, root), expectations, index="path"
    )
    checks = [_check_result(UNLABELED_POOL, suite, r, "path") for r in result.results]
    return checks, {"images": _stable(result.to_json_dict())}


# GX stamps each result with fresh ids and clock times; without them the report is a pure
# function of the data and thresholds, so `dvc repro` reproduces the stage's outputs exactly.
_VOLATILE_GX_KEYS = frozenset(
    {
        "id",
        "run_id",
        "run_time",
        "validation_time",
        "ge_load_time",
        "validation_id",
        "checkpoint_id",
    }
)


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE_GX_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def run_validate(params: Params, root: Path) -> ValidationSummary:
    """Check both manifests and the unlabelled pool's; only data that passed reaches training
    (``data/validated/``)."""
    layout = Layout(root)
    for domain in (*DOMAINS, UNLABELED_POOL):
        layout.validated_manifest(domain).unlink(missing_ok=True)
    manifests = {d: read_manifest(layout.manifest(d), strict=False) for d in DOMAINS}
    pool = read_manifest(layout.unlabeled_manifest, strict=False)
    labels = sorted(set().union(*(_labels(m) for m in manifests.values())))
    runner = _GxRunner()
    failures: list[str] = []
    domain_reports, images, classes = {}, {}, {}
    artifacts = []
    for domain, manifest in manifests.items():
        checks, gx_json = validate_domain(runner, domain, manifest, labels, params, root)
        images[domain], classes[domain] = _counts(manifest)
        domain_reports[domain] = _domain_report(checks, images[domain], classes[domain])
        failures += [c.failure_line() for c in checks if not c.success]
        artifacts.append(write_json(layout.validation_dir / f"{domain}.json", gx_json))
    checks, gx_json = validate_unlabeled(runner, pool, params, root)
    images[UNLABELED_POOL], classes[UNLABELED_POOL] = {"total": len(pool)}, {}
    domain_reports[UNLABELED_POOL] = _domain_report(checks, images[UNLABELED_POOL], {})
    failures += [c.failure_line() for c in checks if not c.success]
    artifacts.append(write_json(layout.validation_dir / f"{UNLABELED_POOL}.json", gx_json))
    cross_failures, cross_report = cross_domain_failures(manifests["source"], manifests["target"])
    failures += cross_failures
    success = not failures
    summary = {
        "success": success,
        "labels": labels,
        "domains": domain_reports,
        "cross_domain": {"success": not cross_failures, **cross_report},
        "failures": failures,
    }
    artifacts.append(write_json(layout.validation_dir / "summary.json", _plain(summary)))
    artifacts.append(write_html_report(layout.validation_dir / "index.html", _plain(summary)))
    metrics = {"images": images, "classes": len(labels), "success": int(success)}
    artifacts.append(write_metrics(layout.metrics("validate"), metrics))
    if failures:
        raise DataValidationError(failures, layout.validation_dir)
    for domain in (*DOMAINS, UNLABELED_POOL):
        destination = layout.validated_manifest(domain)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.manifest(domain), destination)
    return ValidationSummary(success, images, classes, artifacts)


# --- any folder (``roadshift data validate``) -------------------------------------------------

FOLDER_EXAMPLES_KEPT = 1000


@dataclass(frozen=True)
class FolderCheck:
    """The outcome of checking one ImageFolder tree outside the pipeline."""

    folder: Path
    problems: list[str]
    images: dict[str, int]
    labels: list[str]
    checks_passed: int

    @property
    def success(self) -> bool:
        return not self.problems


def problem_lines(check: CheckResult) -> list[str]:
    """One line per offending file or class where GX named them, else one line for the check."""
    if check.success:
        return []
    if check.unexpected_count is None or check.error or not check.examples:
        return [check.failure_line()]
    what = check.expectation + (f" on {check.column}" if check.column else "")
    lines = [f"{example}: fails {what}; fix: {check.hint}" for example in check.examples]
    unnamed = check.unexpected_count - len(check.examples)
    if unnamed > 0:
        lines.append(f"{check.domain} {what}: {unnamed} more not listed")
    return lines


def _labels_of_tree(folder: Path, params: Params) -> tuple[set[str], list[str]]:
    try:
        files = scan_image_folder(folder, params.prepare.extensions)
    except DatasetLayoutError as error:
        return set(), [str(error)]
    return {f.label for f in files}, []


def check_folder(
    folder: Path,
    params: Params,
    *,
    domain: str = "target",
    against: Path | None = None,
    root: Path | None = None,
) -> FolderCheck:
    """The pipeline's checks on one tree: integrity, the domain's GX suites, class sets."""
    root = root or Path.cwd()
    try:
        manifest, bad_files = build_manifest_with_problems(folder, domain, params.prepare, root)
    except DatasetLayoutError as error:
        return FolderCheck(folder, [str(error)], {"total": 0}, [], 0)
    problems = [f"{p.path}: {p.reason}" for p in bad_files]
    labels = _labels(manifest)
    if against is not None:
        other_labels, layout_problems = _labels_of_tree(against, params)
        problems += layout_problems
        other = pd.DataFrame({"label": sorted(other_labels)})
        pair = (other, manifest) if domain == "target" else (manifest, other)
        problems += cross_domain_failures(*pair)[0] if not layout_problems else []
        labels |= other_labels
    checks, _ = validate_domain(
        _GxRunner(FOLDER_EXAMPLES_KEPT), domain, manifest, sorted(labels), params, root, folder
    )
    for check in checks:
        problems += problem_lines(check)
    images, _ = _counts(manifest)
    passed = sum(c.success for c in checks)
    return FolderCheck(folder, problems, images, sorted(_labels(manifest)), passed)
