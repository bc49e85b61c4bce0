"""The `ndbench` command line (typer). Every user error ends as one line on stderr, exit 2."""

from __future__ import annotations

import errno
import inspect
import signal
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from datasets_builders.errors import NdbenchError
from datasets_builders.sources import DATASETS
from datasets_builders.splits import protocol_classes

from .console import stderr_console, stdout_console
from .interrupts import Interrupted, signals_raise_interrupted
from .reporting import class_names_under, print_tables, report_results, show_tables
from .validate import check_output_file, check_output_folder, parse_ids


class _OneParagraphGroup(TyperGroup):
    """Lists each command with the first paragraph of its docstring as flowing text (typer's
    rich help keeps the docstring's line breaks there, cutting the list into ragged lines)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None and command.short_help is None and command.help:
            command.short_help = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        return command


app = typer.Typer(
    name="ndbench",
    cls=_OneParagraphGroup,
    help="Multi-object novelty detection benchmark (DEFEND+MKD and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """ndbench: splits, runs, tables and benchmarks for multi-object novelty detection."""


def _classes(text: str | None, option: str) -> tuple[int, ...] | None:
    ids = parse_ids(text, option)
    return None if ids is None else tuple(ids)


@app.command("build-splits")
def build_splits_command(
    dataset: Annotated[
        str,
        typer.Argument(
            help=f"Dataset to read: {', '.join(DATASETS)}, or coco-format for your own COCO-format "
            "data (with --name, --train-annotations and --test-annotations)."
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding the dataset's files (layouts in the README). "
            "Default: $NDBENCH_DATA/<dataset>, else data/<dataset>. For 'embedded' the "
            "scenes are generated into the cache ($NDBENCH_CACHE or ~/.cache/ndbench).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where index.csv and the manifests go.")] = Path(
        "results/splits"
    ),
    setting: Annotated[
        str, typer.Option(help="uni-class (one-vs-all), multi-class (all-vs-one) or all.")
    ] = "all",
    normal: Annotated[
        str | None,
        typer.Option(help="Build one multi-class split with this normal set, e.g. 1,3,5."),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Only these classes (normal class for uni-class, abnormal class for "
            "all-vs-one), e.g. 0,3. Default: every class, as the paper's protocol."
        ),
    ] = None,
    year: Annotated[
        int | None,
        typer.Option(help="VOC: 2012 (default) or 2007. COCO: 2014 (default, as the paper) or 2017."),
    ] = None,
    class_order: Annotated[
        str,
        typer.Option(
            help="VOC class ids: 'paper' (the authors' released order, used by the paper's "
            "per-class tables) or 'alphabetical'."
        ),
    ] = "paper",
    name: Annotated[
        str | None,
        typer.Option(help="coco-format: the dataset's name; splits go to <out>/NAME/ and `ndbench run "
                     "--dataset NAME` runs on them."),
    ] = None,
    train_annotations: Annotated[
        Path | None, typer.Option(help="coco-format: COCO instances JSON of the training images.")
    ] = None,
    test_annotations: Annotated[
        Path | None, typer.Option(help="coco-format: COCO instances JSON of the test images.")
    ] = None,
    train_images: Annotated[
        Path | None,
        typer.Option(help="coco-format: folder the train file_name entries are relative to (sub-folders "
                     "allowed). Default: the folder holding --train-annotations."),
    ] = None,
    test_images: Annotated[
        Path | None,
        typer.Option(help="coco-format: folder the test file_name entries are relative to. Default: the "
                     "folder holding --test-annotations."),
    ] = None,
    min_train_images: Annotated[
        int,
        typer.Option(help="coco-format: give no split to classes held by fewer training images than this "
                     "(they stay in the other classes' normal sets)."),
    ] = 0,
) -> None:
    """Read a dataset's annotations and write its split manifests (the paper's protocol by default).

    A protocol build (no --classes, no --normal) replaces the protocol splits of its settings
    under --out: their manifests it no longer forms are removed. --classes and --normal only
    add or replace the splits they name. A build that would replace the index under --out with
    another while manifests built from the old one stay there is refused."""
    from .build import BuildRequest, build_splits, check_request, summary_table

    custom = (name, train_annotations, test_annotations, train_images, test_images)
    if dataset == "coco-format":
        if root is not None or year is not None or class_order != "paper":
            raise NdbenchError("coco-format takes no --root, --year or --class-order (class ids follow the file's "
                               "category ids)",
                               "give --train-annotations, --test-annotations (and --train-images, --test-images)")
        _build_coco_format(custom, out=out, setting=setting, normal=normal, classes=classes,
                           min_train_images=min_train_images)
        return
    if any(value is not None for value in custom) or min_train_images:
        raise NdbenchError(f"--name, --train/test-annotations, --train/test-images and --min-train-images "
                           f"are coco-format options, not {dataset}'s", "drop them, or build coco-format")
    request = BuildRequest(
        dataset=dataset,
        root=root,
        out=out,
        setting=setting,
        normal=_classes(normal, "--normal"),
        classes=_classes(classes, "--classes"),
        year=year,
        class_order=class_order,
    )
    check_request(request)
    built = build_splits(request, console=stderr_console())
    index = built.index
    stdout_console().print(summary_table(index, built.manifests))
    skipped = sorted(set(index.class_ids()) - set(protocol_classes(index)))
    if skipped and request.classes is None and request.normal is None:
        names = ", ".join(f"{c} {index.class_names[c]}" for c in skipped)
        stderr_console().print(f"note: no split for classes missing from the train or test images: {names}")
    _note_degenerate(built.skipped)
    _note_removed(built.removed)
    stdout_console().print(f"wrote {_manifests(len(built.manifests))} and index.csv under {out / index.dataset}")


def _manifests(count: int) -> str:
    """`count` manifests, in words ("1 manifest", "3 manifests")."""
    return f"{count} manifest{'' if count == 1 else 's'}"


def _note_degenerate(skipped: list) -> None:
    """One note line per protocol split that could not be formed (and was not written)."""
    for exc in skipped:
        stderr_console().print(f"note: {exc.problem}; not written", soft_wrap=True)


def _note_removed(removed: list[Path]) -> None:
    """One note line naming the manifests of an earlier build that a protocol build removed."""
    if removed:
        names = ", ".join(f"{path.parent.name}/{path.stem}" for path in removed)
        stderr_console().print(f"note: removed {len(removed)} manifests of an earlier build that this build no "
                               f"longer forms: {names}", soft_wrap=True, markup=False)


def _build_coco_format(
    custom: tuple, *, out: Path, setting: str, normal: str | None, classes: str | None, min_train_images: int
) -> None:
    """build-splits for a user's COCO-format dataset: validate, index, write, summarise."""
    from datasets_builders.coco_format import CocoFormatSource, check_name

    from .build import BuildRequest, summary_table
    from .build_coco_format import build_coco_format_splits

    name, train_annotations, test_annotations, train_images, test_images = custom
    check_name(name)
    for option, value in (("--train-annotations", train_annotations), ("--test-annotations", test_annotations)):
        if value is None:
            raise NdbenchError(f"coco-format needs {option}", f"pass {option} FILE.json (a COCO instances file)")
    source = CocoFormatSource(name, train_annotations, test_annotations, train_images, test_images)
    request = BuildRequest(dataset=name, out=out, setting=setting, normal=_classes(normal, "--normal"),
                           classes=_classes(classes, "--classes"))
    built = build_coco_format_splits(source, request, min_train_images=min_train_images,
                                     console=stderr_console())
    index = built.index
    stdout_console().print(summary_table(index, built.manifests))
    if built.missing:
        names = ", ".join(f"{c} {index.class_names[c]}" for c in built.missing)
        stderr_console().print(f"note: no split for classes missing from the train or test images: {names}")
    if built.rare:
        names = ", ".join(f"{c} {index.class_names[c]}" for c in built.rare)
        stderr_console().print(f"note: no split for classes in fewer than {min_train_images} training images: {names}")
    _note_degenerate(built.skipped)
    _note_removed(built.removed)
    stdout_console().print(f"wrote {_manifests(len(built.manifests))} and index.csv under {out / index.dataset}; "
                           f"{_run_hint(out, index.dataset)}", soft_wrap=True, markup=False)


def _run_hint(splits: Path, dataset: str) -> str:
    """How to run the splits built under `splits`: `run --out DIR` reads DIR/splits."""
    import shlex

    command = f"ndbench run --dataset {shlex.quote(dataset)} --method knn"
    if splits.name != "splits":
        return (f"run --out DIR reads the splits under DIR/splits, so to run them build with "
                f"`--out {shlex.quote(str(splits / 'splits'))}` and run `{command} --out {shlex.quote(str(splits))}`")
    if splits.parent != Path("results"):
        command += f" --out {shlex.quote(str(splits.parent))}"
    return f"run them with `{command}`"


@app.command("download")
def download_command(
    dataset: Annotated[str, typer.Argument(help="voc, coco, cifar10, cifar100, mnist or fmnist.")],
    root: Annotated[
        Path | None,
        typer.Option(help="Where the files go, laid out as `build-splits` reads them. Default: "
                     "$NDBENCH_DATA/<dataset>, else data/<dataset> (the build-splits default)."),
    ] = None,
    year: Annotated[
        int | None,
        typer.Option(help="VOC: 2012 (default: trainval, SegmentationClassAug masks and the trainaug list) "
                     "or 2007 (trainval + test). COCO: 2014 (default, as the paper) or 2017."),
    ] = None,
    mirror: Annotated[
        str | None,
        typer.Option(envvar="NDBENCH_MIRROR",
                     help="Fetch every file from this host instead of the official ones: a file is read from "
                     "<mirror>/<dataset>/<file name>, e.g. <mirror>/voc/VOCtrainval_11-May-2012.tar "
                     "(`--list` shows the names). http(s):// or file://. Checksums are still checked."),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="'annotations': COCO's instance annotations without the images.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download and extract again what is already in place.")] = False,
    keep_archives: Annotated[
        bool, typer.Option(help="Keep the archives (in <root>/.ndbench-download/) after extracting them.")
    ] = False,
    list_files: Annotated[
        bool, typer.Option("--list", help="Only show each file's name, size, checksum, URL and destination.")
    ] = False,
) -> None:
    """Download a dataset's published files, check their checksums and lay them out exactly as
    `ndbench build-splits DATASET` reads them. Interrupted downloads resume; what is in place is
    skipped, so a re-run is instant."""
    from datasets_builders.download import DownloadRequest, build_splits_hint, download_dataset, plan_download

    request = DownloadRequest(dataset=dataset, root=root, year=year, mirror=mirror, only=only, force=force,
                              keep_archives=keep_archives)
    if list_files:
        given = [name for name, on in (("--force", force), ("--keep-archives", keep_archives)) if on]
        if given:
            raise NdbenchError(f"--list downloads nothing, so {' and '.join(given)} would do nothing",
                               f"drop {' and '.join(given)} to list the files, or --list to download")
        stdout_console().print(_download_listing(plan_download(request)), soft_wrap=True, markup=False)
        return
    try:
        result = download_dataset(request, console=stderr_console())
    except Interrupted as exc:
        raise exc.keeping("an unfinished download stays as <file>.part beside where the file goes (an archive's "
                          "under .ndbench-download/ in the root), and the same command resumes it; nothing else "
                          "half-written was kept") from None
    plan = result.plan
    if plan.files != tuple(f for f in plan.files if f.annotations):
        stdout_console().print(f"{plan.dataset} is ready under {plan.root}; next: {build_splits_hint(plan)}",
                               soft_wrap=True)
    else:
        stdout_console().print(f"{plan.dataset} annotations are under {plan.root}; build-splits also needs the "
                               "images: run again without --only", soft_wrap=True)


def _download_listing(plan) -> str:
    """Each file of a download plan: name, size, checksum, where it goes, then its URL (on a
    line of its own, so that it can be copied whole)."""
    lines = [f"{plan.dataset}{f' {plan.year}' if plan.year else ''} -> {plan.root}"]
    for file in plan.files:
        size = f"{file.size:,} bytes" if file.size else "size not published"
        checksum = f"{file.checksum[0]} {file.checksum[1]}" if file.checksum else "no checksum published"
        goes_to = f"extracted into {file.target or '.'}/" if file.archive else f"saved as {file.target}"
        lines += [f"{file.name} ({size}, {checksum}): {goes_to}", f"    {plan.url(file)}"]
    return "\n".join(lines)


OUT_HELP = "Results root: records go to <out>/runs, tables to <out>/tables, splits to <out>/splits."
DATASET_HELP = (f"One of {', '.join(DATASETS)}, or the --name of a dataset built with "
                "`build-splits coco-format`.")
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, or cuda:N for the CUDA device numbered N."
NO_RECORDS_FIX = "run `ndbench run --method knn` first, or pass the --out your runs used"


@app.command("run")
def run_command(
    method: Annotated[str, typer.Option(help="Method name(s), comma-separated (see `ndbench methods`).")],
    dataset: Annotated[
        str,
        typer.Option(help=DATASET_HELP),
    ] = "embedded",
    setting: Annotated[
        str, typer.Option(help="uni-class (one-vs-all), multi-class (all-vs-one) or all.")
    ] = "uni-class",
    classes: Annotated[
        str | None,
        typer.Option(help="Class ids to run (normal class / abnormal class), e.g. 0,3. Default: all."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated; tables give mean ± std.")] = "0",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="Backbone weights: a local timm/torch state dict or .safetensors file, "
                     "'hub' (timm's hub), 'embedded' (the shipped small backbones; the embedded dataset's "
                     "default), or 'none' (random init, only on request). Default: each method's, by dataset."),
    ] = None,
    executor: Annotated[str, typer.Option(help="local (in-process) or ray (a Ray cluster).")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster (default: start one locally).")
    ] = None,
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    force: Annotated[bool, typer.Option(help="Re-run jobs whose record exists.")] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a method option, NAME=VALUE (repeatable), e.g. --set epochs=1: "
                     "it goes to every method of the run with that option (a note names the others); "
                     "METHOD.NAME=VALUE sets it for one method, e.g. --set defend.dense_epochs=3."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="A named preset of the methods (see `ndbench methods`), applied before --set. "
                     "'paper' picks, for each method, the recipe behind the paper's numbers "
                     "(docs/FIDELITY.md); on the embedded dataset it goes on top of the embedded preset."),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(help="Try a crashed job again up to this many times (with --executor ray, also a job "
                     "whose worker process died)."),
    ] = 0,
    save_models: Annotated[
        bool,
        typer.Option(help="Keep each job's fitted detector beside its record (<record>.model.pt), with its "
                     "config, weights, split and a decision threshold, for ndbench score. Jobs skipped "
                     "because their record exists get no model: add --force to fit them again. A job run "
                     "without it removes the model an earlier run saved beside its record."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="DataLoader worker processes that decode image files (and, on a GPU, cut "
                     "defend's crops); 0: in the main process, at most 64. Default: one per CPU but one, "
                     "at most 8."),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(help="Keep decoded images and frozen-network outputs in the on-disk store under "
                     "$NDBENCH_CACHE/store, shared by every job and later runs (see `ndbench cache info`)."),
    ] = True,
    cache_budget_gb: Annotated[
        float | None,
        typer.Option(help="Most gigabytes the store may take; past it, images and features are "
                     "recomputed instead of stored. Default: half of (the free disk space plus what the "
                     "store holds), at most 50."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="List the jobs and, per method, the images to decode and the frozen and trained "
                     "forward passes with and without the caches; run nothing."),
    ] = False,
    parallel: Annotated[
        str,
        typer.Option(help="--executor local: jobs run at once, each in its own worker process on CPUs / N "
                     "torch threads. 'auto': one per CPU (as many as the free memory holds) on CPU, 1 on "
                     "CUDA. Small models run faster side by side than on more threads each."),
    ] = "1",
    ray_cpus_per_job: Annotated[
        float | None,
        typer.Option(help="--executor ray: CPUs each job reserves (its torch threads). Default: with GPUs, "
                     "the cluster's CPUs per GPU; without, 1."),
    ] = None,
    ray_gpus_per_job: Annotated[
        float | None,
        typer.Option(help="--executor ray: GPUs each job reserves; fractions (0.25) pack small jobs on a "
                     "big GPU. Default: 1 when the cluster has GPUs, else 0."),
    ] = None,
) -> None:
    """Run methods on splits (fit on the normal train images, score the test images), one
    record per (method, split, seed); existing records are skipped, so a re-run resumes.
    A job another run is working on (its .lock file beside the record) is left to that run."""
    from methods.base import resolve_device
    from methods.runtime import CacheSettings

    from .build import requested_settings
    from .executors import RayResources, execute
    from .overrides import parse_overrides
    from .parallel import jobs_at_once
    from .records import load_records_at
    from .runner import RunOptions, SplitReader, expand_jobs
    from .validate import check_executor, check_parallel, check_run_configs, check_weights, parse_methods, parse_seeds

    methods = parse_methods(method)
    settings = list(requested_settings(setting))
    class_ids = parse_ids(classes, "--classes")
    seed_list = parse_seeds(seeds)
    resolve_device(device)
    check_weights(weights)
    check_executor(executor, ray_address, retries, ray_cpus_per_job, ray_gpus_per_job, device)
    parallel_jobs = check_parallel(parallel, executor)
    overrides = parse_overrides(option or [])
    notes = check_run_configs(methods, dataset=dataset, settings=settings, preset=preset, overrides=overrides,
                              weights=weights)
    caching = CacheSettings(enabled=cache, budget_gb=cache_budget_gb, workers=workers)
    resources = RayResources(ray_cpus_per_job, ray_gpus_per_job)
    options = RunOptions(out=out, device=device, weights=weights, force=force, retries=retries,
                         save_models=save_models, caching=caching)
    splits = SplitReader(options.splits)  # the run's reader: each index and manifest is read once
    jobs = expand_jobs(
        methods,
        dataset=dataset,
        settings=settings,
        classes=class_ids,
        seeds=seed_list,
        options=options,
        overrides=overrides,
        preset=preset or "",
        splits=splits,
    )
    for note in notes:
        stderr_console().print(f"note: {note}", soft_wrap=True, markup=False)
    at_once = jobs_at_once(parallel_jobs, device, len(jobs))
    if dry_run:
        from .plan import plan_run, print_plan

        print_plan(plan_run(jobs, options, splits), stdout_console())
        return
    results = execute(jobs, options, executor, ray_address, console=stderr_console(), resources=resources,
                      parallel=at_once, splits=splits)
    records = load_records_at([r.record for r in results if r.record is not None])
    print_tables(out, records, dataset, settings, paper=False, splits=splits)
    code = report_results(results, stderr_console())
    if save_models:
        _note_missing_models(results)
    if code:
        raise typer.Exit(code)


def _note_missing_models(results) -> None:
    """Say which skipped jobs have no saved model (their records were made without one)."""
    from .models import model_path

    missing = [r for r in results if r.status == "skipped" and r.record is not None
               and not model_path(r.record).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(r.job.describe() for r in missing[:5]) + more
        stderr_console().print(f"note: {len(missing)} skipped job(s) have no saved model (their records were made "
                               f"without --save-models): {shown}; add --force to fit them again and save their models",
                               soft_wrap=True, markup=False)


@app.command("table")
def table_command(
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    paper: Annotated[bool, typer.Option(help="Add the paper's own numbers beside each measured column.")] = False,
) -> None:
    """Write per-class, summary and leaderboard tables (Markdown + CSV) from the records."""
    from .records import load_records
    from .tables import manifest_splits, write_tables

    records = load_records(out)
    if not records:
        raise NdbenchError(f"no readable records under {out / 'runs'}", NO_RECORDS_FIX)
    pairs = sorted({(r.dataset, r.setting) for r in records})
    if paper:
        from .paper import PAPER_DATASETS

        without = sorted({d for d, _ in pairs} - set(PAPER_DATASETS))
        if without:
            stderr_console().print(f"note: the paper reports no numbers for {', '.join(without)}; "
                                   "their tables have measured columns only", soft_wrap=True)
    names, splits = class_names_under(out), manifest_splits(out / "splits")
    for dataset in sorted({d for d, _ in pairs}):
        show_tables(records, dataset, [s for d, s in pairs if d == dataset], paper, names, splits)
    paths = write_tables(records, out / "tables", paper=paper, class_names=names, splits=splits)
    stdout_console().print(f"wrote {len(paths)} files under {out / 'tables'}")


@app.command("leaderboard")
def leaderboard_command(
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
) -> None:
    """Print the mean AUROC of every method on every dataset and setting, best first (writes
    nothing: `ndbench table` writes the table files)."""
    from .records import load_records
    from .tables import leaderboard, manifest_splits, to_markdown

    records = load_records(out)
    if not records:
        raise NdbenchError(f"no readable records under {out / 'runs'}", NO_RECORDS_FIX)
    stdout_console().print(to_markdown(leaderboard(records, splits=manifest_splits(out / "splits"))), markup=False)


@app.command("methods")
def methods_command() -> None:
    """List the registered methods with a one-line description and their paper."""
    from rich.table import Table

    from methods.registry import available, get_class

    table = Table(title="ndbench methods")
    for column in ("name", "what", "paper", "presets (--preset)"):
        table.add_column(column)
    for name in available():
        cls = get_class(name)
        presets = ", ".join(cls.preset_labels())
        table.add_row(name, cls.description, cls.paper, presets)
    stdout_console().print(table)


@app.command("pretrain")
def pretrain_command(
    arch: Annotated[
        str, typer.Option(help="timm model name to pre-train on the object-centric pool.")
    ] = "ndbench_vit_embedded",
    out: Annotated[
        Path | None, typer.Option(help="Weights file (.safetensors). Default: the cache, where runs find it.")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="Train again even when cached weights exist.")] = False,
    ship: Annotated[
        bool,
        typer.Option(help="Make the weights the package ships: train the embedded CNN and ViT with their "
                     "default recipes (reusing cached ones unless --force), measure them and write them in "
                     "float16 with their manifest to methods/weights/ (ignores --arch and --out). About "
                     "30 min on one CPU thread."),
    ] = False,
) -> None:
    """Pre-train a small backbone on the embedded dataset's object-centric pool (offline
    stand-in for the paper's ImageNet-21k pre-training); the embedded default uses it. The
    package ships such weights; this trains them again or for other settings."""
    from methods.base import resolve_device
    from methods.pretrain import pretrain

    if out is not None and not ship:  # --ship ignores --out
        if out.suffix != ".safetensors":
            raise NdbenchError(f"--out {out} does not end in .safetensors", "name the weights file *.safetensors")
        check_output_file(out, "--out")
    if ship:
        from methods.shipped_weights import WEIGHTS_DIR
        from methods.shipped_weights import ship as ship_weights

        manifest = ship_weights(device=resolve_device(device), console=stderr_console(), force=force)
        for name, entry in manifest["weights"].items():
            stdout_console().print(
                f"{name}: test-instance accuracy {100 * entry['scene_test_instance_accuracy']:.1f} %, "
                f"pool held-out {100 * entry['pool_heldout_accuracy']:.1f} % -> {WEIGHTS_DIR / entry['file']}")
        return
    result = pretrain(arch, out=out, device=resolve_device(device), console=stderr_console(), force=force)
    state = "cached" if result.cached else f"trained in {result.train_seconds:.0f} s"
    stdout_console().print(
        f"{arch}: held-out accuracy {100 * result.heldout_accuracy:.1f} % ({state}) -> {result.weights}"
    )


@app.command("oracle")
def oracle_command(
    splits: Annotated[Path, typer.Option(help="Splits root holding embedded/ (from `ndbench build-splits "
                                         "embedded --out ...`).")] = Path("results/splits"),
    weights: Annotated[str, typer.Option(help="The ViT's weights: 'embedded' (shipped or cached) or a file "
                                         "written by `ndbench pretrain`.")] = "embedded",
    arch: Annotated[str, typer.Option(help="The ViT architecture the weights belong to.")] = "ndbench_vit_embedded",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """The embedded benchmark's oracle ceilings: AUROC per split when each test scene is scored
    with the teacher's own patch-token class predictions, by two rules. 'boxes': 1 - the
    normal mass of the most normal ground-truth object (is a normal object present?).
    'patch-mean': the distillers' rule, the mean over all patches of 1 - the patch's normal mass."""
    import pandas as pd

    from methods.base import resolve_device

    from .oracle import oracle_aurocs

    rows = pd.DataFrame(oracle_aurocs(splits, weights, arch=arch, device=resolve_device(device)))
    rows["class"] = rows["split"].str.removeprefix("except-").astype(int)  # multi-class: the novel class
    table = rows.pivot(index=["setting", "rule"], columns="class", values="auroc") * 100
    table["AVG"] = table.mean(axis=1)
    stdout_console().print(table.round(1).reset_index().to_markdown(index=False), soft_wrap=True, markup=False)


@app.command("demo")
def demo_command(
    full: Annotated[
        bool, typer.Option(help="Every registered method on both settings (53 min measured on 2 CPU cores; the "
                           "default demo takes 3.5-7.5 min there).")
    ] = False,
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="Re-run jobs whose record exists.")] = False,
    parallel: Annotated[
        str,
        typer.Option(help="Jobs run at once, each in its own worker process (as ndbench run --parallel). "
                     "'auto': one per CPU on CPU, each on one torch thread, so the table does not depend "
                     "on the number of cores; 1 on CUDA."),
    ] = "auto",
) -> None:
    """Offline demo on the embedded dataset: build splits, load the shipped pre-trained backbones
    (pre-training them only for another embedded config), run the methods on all 10 uni-class
    splits and print a per-class table like paper Table 6."""
    from methods.base import resolve_device

    from .demo import run_demo
    from .parallel import parse_parallel

    resolve_device(device)
    check_output_folder(out, "--out")  # before the worker processes start
    code = run_demo(full=full, out=out, device=device, force=force, parallel=parse_parallel(parallel))
    if code:
        raise typer.Exit(code)


@app.command("maps")
def maps_command(
    method: Annotated[str, typer.Option(help="A method with anomaly maps: defend, mkd or rdad.")] = "defend",
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "embedded",
    split: Annotated[str, typer.Option(help="SETTING/NAME, e.g. uni-class/3 or multi-class/except-3.")] = "uni-class/0",
    n: Annotated[int, typer.Option(help="Test images to show (1-128), half normal and half novel.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the fit and of the choice of images.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="Backbone weights: a local file, 'hub', 'embedded' or 'none' (as in ndbench run)."),
    ] = None,
    out: Annotated[Path, typer.Option(help=OUT_HELP + " Grids go to <out>/maps.")] = Path("results"),
    option: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a method option, NAME=VALUE (repeatable), as in ndbench run; "
                     "the grid's file name then carries the config hash."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="A named preset of the method (see `ndbench methods`), applied before --set, as in "
                     "ndbench run; the grid's file name then carries the config hash."),
    ] = None,
) -> None:
    """Fit a method on one split and draw its anomaly maps (paper Fig. 3): a PNG grid of test
    images beside their per-patch novelty heat-maps, each captioned normal/novel and its score."""
    from methods.base import resolve_device

    from .maps import MapsRequest, check_image_count, draw_maps, maps_path, parse_split
    from .overrides import parse_overrides, split_overrides
    from .runner import RunOptions, expand_jobs, freeze_overrides, job_progress
    from .validate import check_maps_method, check_run_configs, check_seed, check_weights

    check_image_count(n)
    check_maps_method(method)
    check_seed(seed)
    resolve_device(device)
    check_weights(weights)
    setting, name = parse_split(split)
    split = f"{setting}/{name}"  # as the builders name it: the manifest, the grid and the hints agree
    overrides = parse_overrides(option or [])
    for note in check_run_configs([method], dataset=dataset, settings=[setting], preset=preset, overrides=overrides,
                                  weights=weights):
        stderr_console().print(f"note: {note}", soft_wrap=True, markup=False)
    own = freeze_overrides(split_overrides([method], overrides)[0][method])
    request = MapsRequest(method=method, dataset=dataset, split=split, n=n, seed=seed, preset=preset or "",
                          overrides=own)
    options = RunOptions(out=out, device=device, weights=weights)
    target = maps_path(out, request, options)
    check_output_folder(target.parent, "--out")  # before the fit, not after it
    if target.is_dir():
        raise NdbenchError(f"{target} is a folder, where the grid goes", "move it away or choose another --out")
    # A split names its classes ("3", "except-3", "normal-1-3"): checked against the dataset's classes.
    classes = [int(part) for part in name.removeprefix("except-").removeprefix("normal-").split("-")]
    # Validates the method, dataset and classes, builds the splits when missing.
    expand_jobs([method], dataset=dataset, settings=[setting], classes=classes, seeds=[seed], options=options,
                overrides=overrides, preset=preset or "")
    if name.startswith("normal-"):
        from datasets_builders.splits import Manifest

        Manifest.read(options.splits / dataset / setting / f"{name}.json")  # a missing one names its build
    with job_progress(stderr_console()) as progress:
        path = draw_maps(request, options, progress)
    stdout_console().print(f"wrote {path}")


@app.command("report")
def report_command(
    out: Annotated[Path, typer.Option(help=OUT_HELP + " The report goes to <out>/report.")] = Path("results"),
    report_dir: Annotated[
        str | None,  # a str: typer would read "" as Path("."), the current folder
        typer.Option(help="Write the page (index.html) and its figures (img/) here instead of <out>/report; "
                     "figures an earlier report wrote in img/ that the new page does not show are "
                     "removed, nothing else."),
    ] = None,
) -> None:
    """Write one HTML page of everything under --out: the leaderboard, per-class tables beside
    the paper's numbers, AUROC heat maps, ROC curves and score histograms per split, what was
    not run, the anomaly-map grids and each run's metadata. Opens from disk, no network."""
    from .report import build_report, escape_undecoded
    from .report_html import ignored_records

    def warn(message: str) -> None:
        print(f"ndbench: warning: {message}", file=sys.stderr)

    from .runner import job_progress

    folder = None
    if report_dir is not None:
        if not report_dir.strip():
            raise NdbenchError("--report-dir is empty", "give the folder for the page, e.g. --report-dir my_report")
        folder = Path(report_dir)
        check_output_folder(folder, "--report-dir")
    with job_progress(stderr_console()) as progress:
        result = build_report(out, folder, warn=warn, progress=progress)
    stdout_console().print(
        f"wrote {escape_undecoded(str(result.path))} ({result.records} runs, {result.figures} figures, "
        f"{result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s); open {result.path.resolve().as_uri()}",
        soft_wrap=True,
    )
    if result.ignored:
        stdout_console().print(f"{ignored_records(result.ignored)}; see the notes under the page's leaderboard",
                               soft_wrap=True)


@app.command("score")
def score_command(
    images: Annotated[
        list[str],  # strs: typer would read "" as Path("."), every image in the current folder
        typer.Argument(help="Image files and/or folders (a folder: the image files directly in it, "
                       "sorted by name).", show_default=False, metavar="IMAGES"),
    ],
    model: Annotated[
        str,  # a str, as IMAGES: typer would read "" as Path("."), then refused as a missing model file
        typer.Option(help="A .model.pt written by ndbench run --save-models."),
    ],
    output: Annotated[
        str | None, typer.Option(help="Write the CSV (image, score[, label][, map]) here. Default (and with "
                                  "/dev/stdout): print it.")
    ] = None,
    maps: Annotated[
        str | None,  # strs, as IMAGES: "" is not the current folder
        typer.Option(help="Folder for one heat-map overlay PNG per image (methods with anomaly maps: defend, mkd, "
                     "rdad); one colour scale for all images of the call."),
    ] = None,
    threshold: Annotated[
        bool,
        typer.Option(help="Add a label column (normal/novel) from the model's stored threshold: the score at "
                     "95% TPR on its split's test set."),
    ] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Score your own images with a saved detector: one CSV row per image, in the order given,
    higher = more novel. Images go through the detector's own input transform, as in the run."""
    from datasets_builders.atomic import encode_text

    from .runner import job_progress
    from .score import ScoreRequest, is_stdout, prepare_scoring, run_scoring

    if "" in images:
        raise NdbenchError("an image argument is empty (an unset shell variable?)",
                           "name image files or folders; to score the current folder, pass .")
    if model == "":
        raise NdbenchError("--model is empty", "give the path of a .model.pt with --model")
    for option, value in (("--output", output), ("--maps", maps)):
        if value == "":
            raise NdbenchError(f"{option} is empty", f"give a path with {option}, or drop {option}")
    # /dev/stdout is where the CSV goes without --output: written there, not replaced by a file
    output_path = None if output is None or is_stdout(Path(output)) else Path(output)
    maps_path = None if maps is None else Path(maps)
    if output_path is not None:
        check_output_file(output_path, "--output")
    if maps_path is not None:
        check_output_folder(maps_path, "--maps")
    request = ScoreRequest(model=Path(model), images=tuple(map(Path, images)), output=output_path, maps=maps_path,
                           threshold=threshold, device=device)
    scoring = prepare_scoring(request)
    with job_progress(stderr_console()) as progress:
        result = run_scoring(scoring, progress)
    if output_path is None:  # as bytes: a name that is not UTF-8 is printed as it is, not refused by sys.stdout
        sys.stdout.flush()
        sys.stdout.buffer.write(encode_text(result.csv_text()))
        sys.stdout.buffer.flush()
    else:
        stderr_console().print(f"wrote {len(result.images)} scores to {output_path}")
    if maps_path is not None:
        stderr_console().print(f"wrote {len(result.images)} heat-map overlays under {maps_path}")


@app.command("bench")
def bench_command(
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    arch: Annotated[str, typer.Option(help="timm ViT to measure (random weights; only its shape matters).")] = (
        "vit_small_patch16_224"
    ),
    img_size: Annotated[int, typer.Option(help="Input size in pixels.")] = 224,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step. Default: 32 on CUDA or with --full, 16 on a CPU.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Timed steps per measurement (after one warm-up step). Default: 5 on CUDA or "
                     "with --full, 3 on a CPU."),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(help="The GPU-sized configuration (batch 32, 5 steps, every section) on any device; "
                     "on a 2-core CPU it takes over 20 minutes and ~11 GB."),
    ] = False,
    compare: Annotated[
        bool | None,
        typer.Option(help="Also time defend vs transformaly scoring on ViT-B/16 shapes (fair 224 px and "
                     "original 384 px presets; paper Table 10). Default: on with CUDA or --full, off on a "
                     "CPU (minutes and ~13 GB with --baselines)."),
    ] = None,
    baselines: Annotated[
        bool | None,
        typer.Option(help="Also time the training images/s of each baseline (transformaly, kdad, msad, "
                     "rdad, dsvdd) at its paper backbone and input size, at --batch-size. Default: on "
                     "with CUDA or --full, off on a CPU."),
    ] = None,
    runs: Annotated[
        bool,
        typer.Option(help="Also run the 10 embedded uni-class knn jobs and the 10 mkd jobs (on a CPU "
                     "without --full: mkd jobs 0 and 1, students trained 1 epoch) with the caches off, cold "
                     "and warm (random weights, a throw-away store): wall times, decodes and frozen passes "
                     "per distinct image."),
    ] = True,
    loader: Annotated[
        bool,
        typer.Option(help="Also time decoding 1,000 generated 500x375 JPEGs to --img-size with 0, 1 and "
                     "--workers DataLoader workers, and reading them back from the image store."),
    ] = True,
    workers: Annotated[
        int | None,
        typer.Option(help="DataLoader workers of the loader and run figures (default: CPUs - 1, at most 8)."),
    ] = None,
) -> None:
    """Speed figures measured back to back in one run on one device: MKD training images/s
    with 50 % of tokens dropped vs none (goal >= 1.7x), defend scoring images/s, teacher
    passes per training image in MKD (goal: 1 per job), defend vs transformaly scoring, each
    baseline's training images/s, knn and mkd runs with the caches off/cold/warm and image loading."""
    import tempfile

    from rich.table import Table

    from methods.backbones import ViTFeatures, create_backbone
    from methods.base import resolve_device
    from methods.runtime import check_workers

    from .bench import baseline_training, bench_config, paper_comparison, run_bench, section_enabled
    from .bench_data import knn_run_level, loader_speed, mkd_run_level
    from .runner import describe_device

    if min([img_size, *(v for v in (batch_size, steps) if v is not None)]) < 1:
        raise NdbenchError("--img-size, --batch-size and --steps must be positive", "give values of 1 or more")
    check_workers(workers)
    torch_device = resolve_device(device)
    try:  # --arch must name a timm ViT
        vit = ViTFeatures(create_backbone(arch, weights="none", num_classes=0))
    except NdbenchError as exc:
        raise NdbenchError(f"--arch {arch}: {exc.problem}", exc.fix) from exc
    patch = vit.patch_size[0]
    if img_size % patch or img_size < 2 * patch:  # whole patches, at least 2x2 of them
        raise NdbenchError(f"--img-size {img_size} does not cut into whole {patch}-pixel patches of {arch} "
                           "(2x2 at least)", f"use a multiple of {patch}, {2 * patch} or more")
    config = bench_config(torch_device, full, arch=arch, img_size=img_size, batch_size=batch_size, steps=steps)

    def report(what: str) -> None:
        stderr_console().print(f"measuring: {what}")

    skipped = [f"--{name}" for name, given in (("compare", compare), ("baselines", baselines))
               if not section_enabled(name, given, torch_device, full)]
    if skipped:
        report(f"not on a CPU by default: {' and '.join(skipped)} (pass them, or --full)")
    rows = run_bench(config, torch_device, report=report)
    if section_enabled("compare", compare, torch_device, full):
        rows += paper_comparison(config, torch_device, report=report)
    if section_enabled("baselines", baselines, torch_device, full):
        rows += baseline_training(config, torch_device, report=report)
    with tempfile.TemporaryDirectory(prefix="ndbench-bench-") as work:
        if runs:
            rows += knn_run_level(Path(work) / "runs", str(torch_device), report=report, workers=workers)
            rows += mkd_run_level(Path(work) / "mkd-runs", str(torch_device), report=report, workers=workers,
                                  splits_root=Path(work) / "runs" / "splits", full=full)
        if loader:
            rows += loader_speed(Path(work) / "loader", report=report, img_size=img_size, workers=workers)
    title = (f"ndbench bench: {arch} at {img_size} px, batch {config.batch_size}, {config.steps} steps, "
             f"{describe_device(torch_device)}")
    table = Table(title=title)
    for column in ("measure", "value", "unit", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.name, f"{row.value:.2f}", row.unit, row.target, met)
    stdout_console().print(table)


cache_app = typer.Typer(help="The on-disk store of decoded images and frozen-network outputs.",
                        no_args_is_help=True, cls=_OneParagraphGroup)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info_command() -> None:
    """Where the store is and what each kind of entry (images, features) takes on disk."""
    from rich.table import Table

    from datasets_builders.array_store import ArrayStore, default_budget_bytes
    from methods.runtime import store_root

    root = _usable_store_root(store_root())
    table = Table(title=f"ndbench cache: {root} (default budget {default_budget_bytes(root) / 1e9:.1f} GB)")
    for column in ("kind", "entries", "shards", "allocated GB", "on disk GB"):
        table.add_column(column)
    for usage in ArrayStore(root).usage():
        table.add_row(usage.kind, str(usage.entries), str(usage.shards), f"{usage.allocated_bytes / 1e9:.3f}",
                      f"{usage.disk_bytes / 1e9:.3f}")
    stdout_console().print(table)


@cache_app.command("clear")
def cache_clear_command(
    kind: Annotated[
        str | None, typer.Option(help="Only this kind of entry: images or features. Default: everything.")
    ] = None,
) -> None:
    """Delete stored images and features (they are recomputed when next needed)."""
    from datasets_builders.array_store import ArrayStore
    from datasets_builders.image_store import IMAGES_KIND
    from methods.features import FEATURES_KIND
    from methods.runtime import store_root

    if kind is not None and kind not in (IMAGES_KIND, FEATURES_KIND):
        raise NdbenchError(f"unknown cache kind {kind!r}", f"use {IMAGES_KIND} or {FEATURES_KIND}")
    root = _usable_store_root(store_root())
    freed = ArrayStore(root).clear(kind)
    stdout_console().print(f"freed {freed / 1e9:.3f} GB under {root}")


def _usable_store_root(root: Path) -> Path:
    """`root`, unless it or a folder above it is a file (the store can then never be used)."""
    for place in (root, *root.parents):
        if place.exists():
            if not place.is_dir():
                raise NdbenchError(f"the cache store {root} cannot be used: {place} is a file, not a folder",
                                   "move that file away, or set NDBENCH_CACHE to a folder")
            break
    return root


def _usage_error_message(exc: BaseException) -> str | None:
    """The one-line message of a click/typer usage error, or None for other exceptions.

    Typer vendors click in recent releases, so the classes are matched by shape, not by import.
    """
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        return exc.format_message().strip().splitlines()[0]
    return None


# Write errors that a user fixes by freeing space or choosing another folder, wherever they arise.
USER_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
# Errors on a named path that a user fixes on the file system (another user's unpacked dataset,
# a name past the file system's limit, a symlink loop), wherever they arise.
USER_PATH_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP})


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; turn user errors into one line on stderr and exit code 2, an
    interrupt (Ctrl-C, SIGTERM) into one line and exit code 130 / 143."""
    try:
        with signals_raise_interrupted():
            result = app(args=argv, prog_name="ndbench", standalone_mode=False)
    except NdbenchError as exc:
        print(f"ndbench: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except Interrupted as exc:
        print(f"ndbench: {exc.message()}", file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("ndbench: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in USER_PATH_ERRORS and exc.filename:
            print(f"ndbench: error: cannot access {exc.filename}: {exc.strerror} (check the path and its "
                  "permissions for this user, then run the same command again)", file=sys.stderr)
            return 2
        if exc.errno not in USER_WRITE_ERRORS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"ndbench: error: cannot write{where}: {exc.strerror} (free disk space or choose another "
              "output folder, then run the same command again)", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer has already shown the help
            return 0
        message = _usage_error_message(exc)
        if message is None:
            raise
        print(f"ndbench: error: {message} (see --help)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def entry() -> int:
    """The `ndbench` console script: `main`; after an interrupt, further Ctrl-C or SIGTERM
    are ignored while the interpreter winds down (a press then would print a traceback)."""
    code = main()
    if code in (130, 143):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(entry())
