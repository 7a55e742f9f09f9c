"""``roadshift`` command line: it only assembles config, stage functions and tracking.

Heavy libraries (torch, MLflow, Great Expectations, Prefect) are imported inside
the command that needs them, so ``roadshift --help`` and config errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from roadshift.config import ConfigError, Params, load_params
from roadshift.console import (
    VERBOSE_ENV,
    quiet_flow_console,
    set_library_verbosity,
    verbose_requested,
)
from roadshift.errors import RoadshiftError

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # with no PREFECT_API_URL, flows run on Prefect's own local temporary server
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
}

# the stage names `roadshift stage` accepts (roadshift.stages.runner.STAGES; kept here so
# parsing the command line imports no stage code)
STAGES = ("prepare", "validate", "pretrain", "finetune", "scratch", "evaluate", "register")


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, shown as one clear message instead of a traceback."""
    return (RoadshiftError, FileNotFoundError)


# stages whose work is torch's: how their OpenMP threads wait is chosen before torch loads
TORCH_STAGES = ("pretrain", "finetune", "scratch", "evaluate")


def command_stage(args: argparse.Namespace) -> int:
    if args.name in TORCH_STAGES:
        from roadshift.train.runtime import choose_openmp_wait_policy

        choose_openmp_wait_policy()
    from roadshift.stages.failures import clear_stage_failure, record_stage_failure
    from roadshift.stages.runner import run_stage_command
    from roadshift.tracking import PARENT_RUN_ENV

    root = Path(args.root).resolve()
    clear_stage_failure(root, args.name)
    try:
        params = load_params(root / args.params, args.set)
        return run_stage_command(args.name, params, root, args.argv)
    except RoadshiftError as error:
        record_stage_failure(root, args.name, error)
        if not os.environ.get(PARENT_RUN_ENV):  # run by `dvc repro` or by hand
            raise
        if verbose_requested(args.verbose):
            traceback.print_exc()
        return 2  # the pipeline shows the message, once, as its final one


def command_run(args: argparse.Namespace) -> int:
    """Take the project's run lock and supervise the pipeline in a child process (which is
    this command again, with the supervisor's pipe to watch): roadshift.supervise."""
    from roadshift import supervise
    from roadshift.data.dvc_repo import domain_folders
    from roadshift.layout import Layout

    root = Path(args.root).resolve()
    # a bad config or unusable data folders fail before Prefect is even imported
    params = load_params(root / "params.yaml")
    domain_folders(params, root)
    if supervise.watch_supervisor():
        return _run_pipeline(params, root)
    with supervise.project_lock(Layout(root).run_lock) as lock_fd:
        worker = [sys.executable, "-P", "-m", "roadshift", "--root", str(root), "run"]
        return supervise.supervise(worker, lock_fd)


def _run_pipeline(params: Params, root: Path) -> int:
    from prefect import tags

    from flows.pipeline import training_pipeline
    from flows.recovery import end_abandoned_runs, prefect_run_tags
    from roadshift.supervise import owner_tag
    from roadshift.tracking import check_store

    check_store(params, root, must_exist=False, writes=True)
    end_abandoned_runs(params, root)
    if not verbose_requested():  # the supervisor passed --verbose on as ROADSHIFT_VERBOSE
        quiet_flow_console()
    with tags(*prefect_run_tags(owner_tag())):
        training_pipeline(root=str(root))
    return 0


def command_synth(args: argparse.Namespace) -> int:
    from roadshift.data.synth import (
        add_target_batch,
        synthesize_dataset,
        synthesize_production_batch,
        synthesize_unlabeled_pool,
        write_contact_sheet,
    )

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    source_dir = root / params.data.source.path
    target_dir = root / params.data.target.path
    pool = params.data.target.unlabeled_path
    pool_dir = root / pool if pool is not None else None
    if args.production_batch:
        if not args.out:
            raise ConfigError("data synth --production-batch needs --out FOLDER")
        classes = synthesize_production_batch(
            Path(args.out),
            args.production_batch,
            params.synth.image_size,
            params.base.seed,
            args.condition,
            args.batch_id,
        )
        print(f"wrote {len(classes)} unlabelled {args.condition} target photos to {args.out}")
        return 0
    if args.add_target_batch:
        count = add_target_batch(
            target_dir,
            per_class=args.add_target_batch,
            image_size=params.synth.image_size,
            seed=params.base.seed,
            batch_id=args.batch_id,
        )
        print(f"added {count} labelled target images (batch {args.batch_id}) under {target_dir}")
        return 0
    if args.if_absent and source_dir.is_dir() and target_dir.is_dir():
        if pool_dir is not None and not pool_dir.is_dir():  # data from before the pool existed
            count = synthesize_unlabeled_pool(
                pool_dir,
                params.synth.target_unlabeled_per_class,
                params.synth.image_size,
                params.base.seed,
            )
            print(f"synthesised {count} unlabelled target images under {pool_dir}")
        print(
            f"data present under {source_dir.parent}; not synthesising (drop --if-absent to redo)"
        )
        return 0
    if source_dir.parent != target_dir.parent:
        raise ConfigError("data.source.path and data.target.path must share a parent to synthesise")
    counts = synthesize_dataset(
        source_dir.parent, params.synth, seed=params.base.seed, unlabeled_dir=pool_dir
    )
    sheet = write_contact_sheet(
        {"source": source_dir, "target": target_dir}, root / "reports" / "contact_sheet.png"
    )
    print(f"synthesised {counts} images under {source_dir.parent}; contact sheet: {sheet}")
    return 0


def command_data_add(args: argparse.Namespace) -> int:
    from roadshift.data.versioning import add_domain_data

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    # refusals (unknown class, name clash, a bad or linked file) are RoadshiftErrors: main()
    # prints them as one message and exits 2
    result = add_domain_data(params, root, args.domain, Path(args.path))
    print(f"added {len(result.copied)} image(s) under {result.domain_dir}")
    print(f"{args.domain} data version: {result.old_version or 'none'} -> {result.new_version}")
    if result.pool_versions is not None:
        old, new = result.pool_versions
        print(
            f"removed {len(result.removed_from_pool)} now-labelled image(s) from the unlabelled "
            f"pool; target_unlabeled data version: {old or 'none'} -> {new}"
        )
    return 0


def command_data_pull(args: argparse.Namespace) -> int:
    from roadshift.data.dvc_repo import DVC_REMOTE_ENV, chosen_remote, pull_domain_data

    root = Path(args.root).resolve()
    versions = pull_domain_data(load_params(root / args.params), root)
    remote = chosen_remote() or "the default remote"
    print(
        f"pulled from {remote} ({DVC_REMOTE_ENV}): "
        + ", ".join(f"{domain} {version}" for domain, version in versions.items())
    )
    return 0


def command_data_validate(args: argparse.Namespace) -> int:
    from roadshift.config import Params
    from roadshift.stages.validate import check_folder

    params_path = Path(args.root) / args.params
    params = load_params(params_path) if params_path.is_file() else Params()
    against = Path(args.against) if args.against else None
    result = check_folder(Path(args.folder), params, domain=args.domain, against=against)
    if not result.success:
        print(f"roadshift: data validate: {args.folder}: {len(result.problems)} problem(s)")
        print("\n".join(result.problems))
        return 1
    splits = ", ".join(f"{k} {v}" for k, v in result.images.items() if k != "total")
    print(
        f"OK {args.folder}: {result.images['total']} images in {len(result.labels)} classes "
        f"({splits}); {result.checks_passed} checks passed"
    )
    return 0


def command_predict(args: argparse.Namespace) -> int:
    """Wire ``roadshift.serve.predict``; its errors (bad file, no champion): one line, exit 2."""
    from roadshift.serve.predict import PredictError

    root = Path(args.root).resolve()
    params_path = root / args.params
    params = load_params(params_path) if params_path.is_file() else Params()
    try:
        return _run_predict(args, params, root)
    except PredictError as error:
        print(f"roadshift: predict: {error}", file=sys.stderr)
        return 2


def _run_predict(args: argparse.Namespace, params: Params, root: Path) -> int:
    from roadshift.data.images import ImageLimits
    from roadshift.serve import predict
    from roadshift.tracking import configure_existing_store
    from roadshift.train.progress import progress_enabled

    if args.out:
        predict.output_format(Path(args.out))  # a bad suffix fails before the model loads
    paths = predict.find_images([Path(p) for p in args.inputs], params.prepare.extensions)
    model_uri = args.model or predict.champion_uri(params.register.model_name)
    monitored = args.shift or args.keep_unlabelled  # logs a shift-report run to the store
    if monitored or model_uri.startswith(("models:", "runs:")):  # a path needs no store
        configure_existing_store(params, root, writes=monitored)
    model = predict.load_registry_model(model_uri)
    skipped: list[str] = []
    on_skip = (lambda path, reason: skipped.append(f"{path}: {reason}")) if args.skip_bad else None
    with predict.batch_progress(len(paths), progress_enabled("auto")) as on_batch:
        frame = predict.predict_paths(
            model,
            paths,
            args.batch_size,
            on_skip=on_skip,
            on_batch=on_batch,
            limits=ImageLimits.for_prediction(params),
        )
    if skipped:
        print(f"roadshift: predict: skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        print("\n".join(f"  {line}" for line in skipped), file=sys.stderr)
    if frame.empty:
        raise predict.PredictError("none of the files could be read; nothing predicted")
    if args.out:
        written = predict.write_predictions(frame, Path(args.out))
        print(f"{len(frame)} prediction(s) written to {written}", file=sys.stderr)
    else:
        print(predict.format_table(frame))
    if args.keep_unlabelled or args.shift:
        _monitor_batch(args, params, root, [Path(p) for p in frame[predict.PATH_COLUMN]])
    return 0


def _monitor_batch(args: argparse.Namespace, params: Params, root: Path, paths: list) -> None:
    """Shift report of the predicted batch (console on stderr, JSON, MLflow run; the webhook
    if shifted), and with --keep-unlabelled the images kept in the pool as a new data version."""
    import contextlib
    from dataclasses import replace

    from roadshift.serve import monitor
    from roadshift.serve.features import registered_model

    name = monitor.batch_name()
    with registered_model(params.register.model_name, _model_version(args.model)) as loaded:
        report = monitor.measure_batch(loaded, paths, params, root, name, args.inputs)
    if args.keep_unlabelled:
        from roadshift.data.versioning import keep_unlabeled_images

        with contextlib.redirect_stdout(sys.stderr):  # DVC's hints: stdout holds predictions
            kept = keep_unlabeled_images(params, root, paths, name)
        report = replace(report, kept_in_pool=len(kept.copied), pool_version=kept.new_version)
        print(
            f"kept {len(kept.copied)} image(s) in the unlabelled pool {kept.pool_dir} "
            f"({len(kept.already_in_pool)} already there, {len(kept.already_labelled)} already "
            f"labelled); target_unlabeled data version: {kept.old_version or 'none'} -> "
            f"{kept.new_version}",
            file=sys.stderr,
        )
    path = monitor.write_report(report, root)
    run_id = monitor.log_report(report, path, loaded.registered.model_id)
    print(monitor.format_report(report), file=sys.stderr)
    print(f"  report: {path}; MLflow run {run_id}", file=sys.stderr)
    block = params.retrain.notify_webhook_block
    if report.verdict.shifted and block:
        from tasks.notify import notify_quietly

        sent = notify_quietly(block, monitor.webhook_payload(report, path, run_id))
        print(f"  webhook {block!r}: {'notified' if sent else 'FAILED (see log)'}", file=sys.stderr)


def _model_version(model_uri: str | None) -> str | None:
    """The version named by ``models:/<name>/<N>`` (None: the champion) for the shift report."""
    if not model_uri:
        return None
    tail = model_uri.rstrip("/").rsplit("/", 1)[-1]
    return tail if tail.isdigit() else None


def command_label_suggest(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from roadshift.serve.features import registered_model
    from roadshift.serve.suggest import suggest_for_labelling
    from roadshift.tracking import configure_existing_store

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    configure_existing_store(params, root)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else root / "labelling" / f"suggested-{stamp}"
    with registered_model(params.register.model_name, args.model_version) as loaded:
        result = suggest_for_labelling(loaded, params, root, args.n, out)
    label = loaded.registered.label
    skipped = ", ".join(f"{count} {why}" for why, count in result.excluded.items()) or "none"
    print(
        f"{len(result.chosen)} of {result.pool_images} unlabelled image(s) suggested by {label} "
        f"(never suggested: {skipped})"
    )
    for suggestion, file in zip(result.chosen, result.files, strict=True):
        print(
            f"  #{suggestion.rank:<3} {file.name}  {suggestion.label} "
            f"p={suggestion.confidence:.2f}  uncertainty {suggestion.uncertainty:.2f}  "
            f"distance {suggestion.distance:.2f}"
        )
    print(f"images: {result.out_dir}  (sort each into its <class>/ folder there)")
    print(f"why each was chosen: {result.csv}; contact sheet: {result.sheet}")
    print(f"then: roadshift data add target {result.out_dir}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _registry_serialised(model_name: str, store_uri: str):
    """A local store's promotion file lock is taken inside the move itself; against a remote
    tracking server also hold the flow's Prefect concurrency slot, so the CLI waits for a
    registering flow run (and degrades, with a warning, where that limit does not exist)."""
    from contextlib import nullcontext

    from roadshift.registry.lock import lock_path

    if lock_path(store_uri, model_name) is not None:
        return nullcontext("file lock")
    from tasks.registry import registry_slot

    return registry_slot(model_name, store_uri)


def command_promote(args: argparse.Namespace) -> int:
    """Exit 0 promoted (or already champion), 1 refused by the gates, 2 bad request."""
    from mlflow import MlflowClient

    from roadshift.registry.aliases import current_user, promote_version
    from roadshift.stages.register import current_test_split
    from roadshift.tracking import configure_existing_store

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    store_uri = configure_existing_store(params, root)
    name = params.register.model_name
    with _registry_serialised(name, store_uri):
        outcome = promote_version(
            MlflowClient(),
            name,
            args.version,
            params.register,
            store_uri=store_uri,
            user=current_user(),
            why=args.reason,
            force=args.force,
            evaluation=current_test_split(root),
        )
    if outcome.already_champion:
        print(f"{name} v{outcome.version} is already champion; nothing changed")
        return 0
    before = f"v{outcome.champion_before}" if outcome.champion_before else "none"
    print(f"{name} v{outcome.version}: {outcome.decision.label} (champion before: {before})")
    for gate in outcome.decision.gates:
        print(f"  {gate.name}: {gate.status}: {gate.reason}")
    if outcome.champion_scores is not None:
        print(f"  champion scores: {outcome.champion_scores.source}")
    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(outcome.aliases.items()))
    print(f"  aliases now: {aliases or 'none'}")
    if not outcome.decision.promote:
        print(
            "roadshift: promote: refused by the gates (override: --force --reason TEXT)",
            file=sys.stderr,
        )
        return 1
    return 0


def command_rollback(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from roadshift.registry.aliases import current_user, rollback
    from roadshift.tracking import configure_existing_store

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    store_uri = configure_existing_store(params, root)
    name = params.register.model_name
    with _registry_serialised(name, store_uri):
        outcome = rollback(
            MlflowClient(),
            name,
            store_uri=store_uri,
            user=current_user(),
            why=args.reason,
            to=args.to,
        )
    previous = f"v{outcome.previous_champion}" if outcome.previous_champion else "none"
    print(
        f"{name}: champion is v{outcome.restored} again (rolled back from "
        f"v{outcome.rolled_back_from}); previous-champion: {previous}"
    )
    return 0


def command_serve_schedule(args: argparse.Namespace) -> int:
    from flows.retrain import serve_schedule

    root = Path(args.root).resolve()
    load_params(root / "params.yaml")  # a bad config fails before any server starts
    serve_schedule(root, port=args.port)
    return 0


def command_reproduce(args: argparse.Namespace) -> int:
    """Exit 0 when metrics and weights come out identical, 1 when they differ."""
    from roadshift.registry.reproduce import comparison_table, reproduce_registered

    root = Path(args.root).resolve()
    params = load_params(root / args.params)
    reproduction = reproduce_registered(
        root,
        params,
        version=args.model_version,
        run_id=args.run_id,
        keep_worktree=args.keep_worktree,
    )
    lineage = reproduction.lineage
    print(
        f"{lineage.model_name} v{lineage.version}: commit {lineage.git_commit[:12]}, data "
        + ", ".join(f"{d} {v}" for d, v in lineage.data_versions.items())
    )
    print(comparison_table(reproduction))
    for note in reproduction.notes:
        print(f"note: {note}")
    if reproduction.worktree is not None:
        print(f"worktree kept at {reproduction.worktree}")
    print("identical" if reproduction.identical else "DIFFERENT from the registered version")
    return 0 if reproduction.identical else 1


class _CommandParser(argparse.ArgumentParser):
    """Every subcommand takes ``--verbose`` too, so it may come after the command's name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roadshift", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root (holds params.yaml, dvc.yaml)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show library logs and the tracebacks of expected errors (also {VERBOSE_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    run = sub.add_parser("run", help="run the whole training pipeline as a Prefect flow")
    run.set_defaults(handler=command_run)

    stage = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--params", default="params.yaml")
    stage.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param"
    )
    stage.set_defaults(handler=command_stage)

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command")
    synth = data.add_parser("synth", help="write the embedded synthetic US -> India dataset")
    synth.add_argument("--params", default="params.yaml")
    synth.add_argument("--if-absent", action="store_true", help="do nothing if data exists")
    synth.add_argument(
        "--add-target-batch", type=int, metavar="PER_CLASS", help="add new labelled target images"
    )
    synth.add_argument("--batch-id", default="batch1", help="name of the new target batch")
    synth.add_argument(
        "--production-batch",
        type=int,
        metavar="PER_CLASS",
        help="write unlabelled target photos, as production would send them, to --out",
    )
    synth.add_argument(
        "--condition", default="day", choices=("day", "night"), help="light of --production-batch"
    )
    synth.add_argument("--out", help="folder for --production-batch")
    synth.set_defaults(handler=command_synth)
    add = data.add_parser("add", help="add labelled images to a domain as a new DVC data version")
    add.add_argument("domain", choices=("source", "target"))
    add.add_argument("path", help="folder of <class>/<image> files (copied; never overwrites)")
    add.add_argument("--params", default="params.yaml")
    add.set_defaults(handler=command_data_add)
    pull = data.add_parser(
        "pull", help="fetch the committed data versions from the DVC remote ($ROADSHIFT_DVC_REMOTE)"
    )
    pull.add_argument("--params", default="params.yaml")
    pull.set_defaults(handler=command_data_pull)
    check = data.add_parser("validate", help="run the data checks on any ImageFolder tree")
    check.add_argument("folder", help="<class>/<image> or <split>/<class>/<image> tree")
    check.add_argument("--against", help="other domain's tree: the class sets must match")
    check.add_argument("--domain", choices=("source", "target"), default="target")
    check.add_argument("--params", default="params.yaml", help="thresholds; defaults if absent")
    check.set_defaults(handler=command_data_validate)

    predict = sub.add_parser("predict", help="predict image files with a registered model")
    predict.add_argument("inputs", nargs="+", help="image files or folders (scanned recursively)")
    predict.add_argument(
        "--model", help="MLflow model URI (default: models:/<register.model_name>@champion)"
    )
    predict.add_argument("--out", help="write predictions to a .csv or .json file (else a table)")
    predict.add_argument("--batch-size", type=_positive_int, default=64, help="images per call")
    predict.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images and list them at the end"
    )
    predict.add_argument(
        "--keep-unlabelled",
        action="store_true",
        help="keep the scored images in the unlabelled target pool (a new DVC data version, "
        "no image twice) and report the batch's shift (implies --shift)",
    )
    predict.add_argument(
        "--shift",
        action="store_true",
        help="report how far the batch is from the champion's target data (console, "
        "reports/shift/, MLflow; the webhook when shifted past params' monitor limits)",
    )
    predict.add_argument("--params", default="params.yaml", help="defaults if absent")
    predict.set_defaults(handler=command_predict)

    label = sub.add_parser("label", help="labelling commands").add_subparsers(dest="label_command")
    suggest = label.add_parser(
        "suggest", help="rank the unlabelled pool with the champion: which images to label next"
    )
    suggest.add_argument("--n", type=_positive_int, default=40, help="how many to suggest")
    suggest.add_argument(
        "--out",
        help="new folder for the images, CSV and contact sheet "
        "(default labelling/suggested-<UTC time>)",
    )
    suggest.add_argument(
        "--model-version", metavar="N", help="rank with this version, not the champion"
    )
    suggest.add_argument("--params", default="params.yaml")
    suggest.set_defaults(handler=command_label_suggest)

    promote = sub.add_parser(
        "promote", help="make a registered version champion if it passes the gates (or --force)"
    )
    promote.add_argument("--version", required=True, metavar="N", help="registered version")
    promote.add_argument("--force", action="store_true", help="bypass the gates (needs --reason)")
    promote.add_argument("--reason", help="why; recorded on the version with who did it")
    promote.add_argument("--params", default="params.yaml")
    promote.set_defaults(handler=command_promote)

    back = sub.add_parser("rollback", help="move champion back to previous-champion (or --to N)")
    back.add_argument("--to", metavar="N", help="version to restore (default: previous-champion)")
    back.add_argument("--reason", required=True, help="why; recorded with who did it")
    back.add_argument("--params", default="params.yaml")
    back.set_defaults(handler=command_rollback)

    schedule = sub.add_parser(
        "serve-schedule",
        help="serve the scheduled-retraining deployment on params.yaml's cron (Ctrl-C stops)",
    )
    schedule.add_argument(
        "--port", type=_positive_int, default=4200, help="local Prefect server port"
    )
    schedule.set_defaults(handler=command_serve_schedule)

    again = sub.add_parser(
        "reproduce", help="rebuild a registered version from its git commit, data and params"
    )
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-version", metavar="N", help="registered version to rebuild")
    which.add_argument("--run-id", help="MLflow run the version was registered from")
    again.add_argument("--keep-worktree", action="store_true", help="keep the checkout to inspect")
    again.add_argument("--params", default="params.yaml", help="tracking and model name")
    again.set_defaults(handler=command_reproduce)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        build_parser().print_help()
        return 2
    try:
        return handler(args)
    except _expected_errors() as error:
        if verbose_requested(args.verbose):
            traceback.print_exc()
        print(f"roadshift: {error}", file=sys.stderr)  # one line where the error is one
        return 2


def main(argv: list[str] | None = None) -> int:
    """The ``roadshift`` command; ``argv`` None reads the process's arguments."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    set_library_verbosity(verbose_requested(args.verbose))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch under torchrun
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
