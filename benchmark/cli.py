"""The `ndbench` command line (typer). Every user error ends as one line on stderr, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from datasets_builders.errors import NdbenchError
from datasets_builders.sources import DATASETS
from datasets_builders.splits import parse_class_list, protocol_classes

from .console import stderr_console, stdout_console
from .reporting import class_names_under, print_tables, report_results

app = typer.Typer(
    name="ndbench",
    help="Multi-object novelty detection benchmark (DEFEND+MKD and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """ndbench: splits, runs, tables and benchmarks for multi-object novelty detection."""


def _classes(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(parse_class_list(text))


@app.command("build-splits")
def build_splits_command(
    dataset: Annotated[str, typer.Argument(help=f"Dataset to read: {', '.join(DATASETS)}.")],
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
) -> None:
    """Read a dataset's annotations and write its split manifests (the paper's protocol by default)."""
    from .build import BuildRequest, build_splits, summary_table

    if class_order not in ("paper", "alphabetical"):
        raise NdbenchError(f"unknown class order {class_order!r}", "use paper or alphabetical")
    request = BuildRequest(
        dataset=dataset,
        root=root,
        out=out,
        setting=setting,
        normal=_classes(normal),
        classes=_classes(classes),
        year=year,
        class_order=class_order,
    )
    index, manifests = build_splits(request, console=stderr_console())
    stdout_console().print(summary_table(index, manifests))
    skipped = sorted(set(index.class_ids()) - set(protocol_classes(index)))
    if skipped and request.classes is None and request.normal is None:
        names = ", ".join(f"{c} {index.class_names[c]}" for c in skipped)
        stderr_console().print(f"note: no split for classes missing from the train or test images: {names}")
    stdout_console().print(f"wrote {len(manifests)} manifests and index.csv under {out / index.dataset}")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    return list(parse_class_list(text)) if text else [0]


OUT_HELP = "Results root: records go to <out>/runs, tables to <out>/tables, splits to <out>/splits."


@app.command("run")
def run_command(
    method: Annotated[str, typer.Option(help="Method name(s), comma-separated (see `ndbench methods`).")],
    dataset: Annotated[str, typer.Option(help=f"One of {', '.join(DATASETS)}.")] = "embedded",
    setting: Annotated[
        str, typer.Option(help="uni-class (one-vs-all), multi-class (all-vs-one) or all.")
    ] = "uni-class",
    classes: Annotated[
        str | None,
        typer.Option(help="Class ids to run (normal class / abnormal class), e.g. 0,3. Default: all."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated; tables give mean ± std.")] = "0",
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="Backbone weights: a local timm/torch state dict or .safetensors file, "
                     "'hub' (timm's hub), or 'none' (random init, only on request)."),
    ] = None,
    executor: Annotated[str, typer.Option(help="local (in-process) or ray (a Ray cluster).")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster (default: start one locally).")
    ] = None,
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    force: Annotated[bool, typer.Option(help="Re-run jobs whose record exists.")] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a method option, NAME=VALUE (repeatable), e.g. --set epochs=1."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="A named preset of the methods (see `ndbench methods`), applied before --set. "
                     "'paper' picks, for each method, the recipe behind the paper's numbers "
                     "(docs/FIDELITY.md); on the embedded dataset it goes on top of the embedded preset."),
    ] = None,
) -> None:
    """Run methods on splits (fit on the normal train images, score the test images), one
    record per (method, split, seed); existing records are skipped, so a re-run resumes."""
    from .build import requested_settings
    from .executors import execute
    from .records import load_records_at
    from .runner import RunOptions, expand_jobs

    options = RunOptions(out=out, device=device, weights=weights, force=force)
    settings = list(requested_settings(setting))
    jobs = expand_jobs(
        _list(method) or [],
        dataset=dataset,
        settings=settings,
        classes=list(parse_class_list(classes)) if classes else None,
        seeds=_seeds(seeds),
        options=options,
        overrides=_parse_overrides(option or []),
        preset=preset or "",
    )
    results = execute(jobs, options, executor, ray_address, console=stderr_console())
    records = load_records_at([r.record for r in results if r.record is not None])
    print_tables(out, records, dataset, settings, paper=False)
    code = report_results(results, stderr_console())
    if code:
        raise typer.Exit(code)


def _parse_overrides(items: list[str]) -> dict:
    """`NAME=VALUE` pairs; values parsed as JSON when they can be (numbers, booleans, lists)."""
    import json

    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise NdbenchError(f"cannot read --set {item!r}", "write it as NAME=VALUE, e.g. --set epochs=1")
        try:
            parsed[name] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name] = value
    return parsed


@app.command("table")
def table_command(
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    paper: Annotated[bool, typer.Option(help="Add the paper's own numbers beside each measured column.")] = False,
) -> None:
    """Write per-class, summary and leaderboard tables (Markdown + CSV) from the records."""
    from .records import load_records

    records = load_records(out)
    if not records:
        raise NdbenchError(f"no records under {out / 'runs'}", "run `ndbench run` first")
    pairs = sorted({(r.dataset, r.setting) for r in records})
    paths = []
    for dataset in sorted({d for d, _ in pairs}):
        paths = print_tables(out, records, dataset, [s for d, s in pairs if d == dataset], paper)
    stdout_console().print(f"wrote {len(paths)} files under {out / 'tables'}")


@app.command("leaderboard")
def leaderboard_command(
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
) -> None:
    """Mean AUROC of every method on every dataset and setting, best first."""
    from .records import load_records
    from .tables import leaderboard, to_markdown, write_tables

    records = load_records(out)
    if not records:
        raise NdbenchError(f"no records under {out / 'runs'}", "run `ndbench run` first")
    stdout_console().print(to_markdown(leaderboard(records)), markup=False)
    write_tables(records, Path(out) / "tables", class_names=class_names_under(out))


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
        presets = ", ".join(p + (f" (= {cls.paper_preset or 'defaults'})" if p == "paper" else "")
                            for p in cls.preset_names())
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
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Train again even when cached weights exist.")] = False,
    ship: Annotated[
        bool,
        typer.Option(help="Make the weights the package ships: train the embedded CNN and ViT with their "
                     "default recipes, measure them and write them with their manifest to methods/weights/ "
                     "(ignores --arch, --out and --force). Tens of minutes on a CPU."),
    ] = False,
) -> None:
    """Pre-train a small backbone on the embedded dataset's object-centric pool (offline
    stand-in for the paper's ImageNet-21k pre-training); the embedded default uses it. The
    package ships such weights; this trains them again or for other settings."""
    from methods.base import resolve_device
    from methods.pretrain import pretrain

    if ship:
        from methods.shipped_weights import WEIGHTS_DIR
        from methods.shipped_weights import ship as ship_weights

        manifest = ship_weights(device=resolve_device(device), console=stderr_console())
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
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """The embedded benchmark's oracle ceiling: AUROC per split when each test scene is scored
    from its ground-truth boxes with the teacher's own patch-token class predictions."""
    import pandas as pd

    from methods.base import resolve_device

    from .oracle import oracle_aurocs

    rows = pd.DataFrame(oracle_aurocs(splits, weights, arch=arch, device=resolve_device(device)))
    rows["class"] = rows["split"].str.removeprefix("except-").astype(int)  # multi-class: the novel class
    table = rows.pivot(index="setting", columns="class", values="auroc") * 100
    table["AVG"] = table.mean(axis=1)
    stdout_console().print(table.round(1).to_markdown())


@app.command("demo")
def demo_command(
    full: Annotated[
        bool, typer.Option(help="Every registered method on both settings (budget: 60 min on 2 cores).")
    ] = False,
    out: Annotated[Path, typer.Option(help=OUT_HELP)] = Path("results"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Re-run jobs whose record exists.")] = False,
) -> None:
    """Offline demo on the embedded dataset: build splits, pre-train (or reuse) backbones, run
    the methods on all 10 uni-class splits and print a per-class table like paper Table 6."""
    from .demo import run_demo

    code = run_demo(full=full, out=out, device=device, force=force)
    if code:
        raise typer.Exit(code)


@app.command("maps")
def maps_command(
    method: Annotated[str, typer.Option(help="A method with anomaly maps: defend, mkd or rdad.")] = "defend",
    dataset: Annotated[str, typer.Option(help=f"One of {', '.join(DATASETS)}.")] = "embedded",
    split: Annotated[str, typer.Option(help="SETTING/NAME, e.g. uni-class/3 or multi-class/except-3.")] = "uni-class/0",
    n: Annotated[int, typer.Option(help="Test images to show, half normal and half novel.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the fit and of the choice of images.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    weights: Annotated[
        str | None, typer.Option(help="Backbone weights: a local file, 'hub' or 'none' (as in `ndbench run`).")
    ] = None,
    out: Annotated[Path, typer.Option(help=OUT_HELP + " Grids go to <out>/maps.")] = Path("results"),
) -> None:
    """Fit a method on one split and draw its anomaly maps (paper Fig. 3): a PNG grid of test
    images beside their per-patch novelty heat-maps, each captioned normal/novel and its score."""
    from .maps import MapsRequest, draw_maps, parse_split
    from .runner import RunOptions, expand_jobs, job_progress

    if n < 1:
        raise NdbenchError(f"--n {n} is too small", "ask for at least one image")
    request = MapsRequest(method=method, dataset=dataset, split=split, n=n, seed=seed)
    options = RunOptions(out=out, device=device, weights=weights)
    setting, _ = parse_split(split)
    # Validates the method and dataset, builds the splits when missing.
    expand_jobs([method], dataset=dataset, settings=[setting], classes=[], seeds=[seed], options=options)
    with job_progress(stderr_console()) as progress:
        path = draw_maps(request, options, progress)
    stdout_console().print(f"wrote {path}")


@app.command("bench")
def bench_command(
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    arch: Annotated[str, typer.Option(help="timm ViT to measure (random weights; only its shape matters).")] = (
        "vit_small_patch16_224"
    ),
    img_size: Annotated[int, typer.Option(help="Input size in pixels.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement (after one warm-up step).")] = 5,
    compare: Annotated[
        bool,
        typer.Option(help="Also time defend vs transformaly scoring on ViT-B/16 shapes (fair 224 px and "
                     "original 384 px presets; paper Table 10). Minutes on a CPU."),
    ] = True,
    baselines: Annotated[
        bool,
        typer.Option(help="Also time the training images/s of each baseline (transformaly, kdad, msad, "
                     "rdad, dsvdd) at its paper backbone and input size, at --batch-size. Minutes on a CPU."),
    ] = True,
) -> None:
    """Speed figures measured back to back in one run on one device: MKD training images/s
    with 50 % of tokens dropped vs none (goal >= 1.7x), defend scoring images/s, teacher
    passes per training image in MKD (goal: 1 per job), defend vs transformaly scoring, and
    each baseline's training images/s."""
    from rich.table import Table

    from methods.base import resolve_device

    from .bench import BenchConfig, baseline_training, paper_comparison, run_bench
    from .runner import describe_device

    if min(img_size, batch_size, steps) < 1:
        raise NdbenchError("--img-size, --batch-size and --steps must be positive", "give values of 1 or more")
    torch_device = resolve_device(device)
    config = BenchConfig(arch=arch, img_size=img_size, batch_size=batch_size, steps=steps)
    def report(what: str) -> None:
        stderr_console().print(f"measuring: {what}")

    rows = run_bench(config, torch_device, report=report)
    if compare:
        rows += paper_comparison(config, torch_device, report=report)
    if baselines:
        rows += baseline_training(config, torch_device, report=report)
    table = Table(title=f"ndbench bench: {arch} at {img_size} px, batch {batch_size}, {describe_device(torch_device)}")
    for column in ("measure", "value", "unit", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.name, f"{row.value:.2f}", row.unit, row.target, met)
    stdout_console().print(table)


def _usage_error_message(exc: BaseException) -> str | None:
    """The one-line message of a click/typer usage error, or None for other exceptions.

    Typer vendors click in recent releases, so the classes are matched by shape, not by import.
    """
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        return exc.format_message().strip().splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; turn user errors into one line on stderr and exit code 2."""
    try:
        result = app(args=argv, prog_name="ndbench", standalone_mode=False)
    except NdbenchError as exc:
        print(f"ndbench: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("ndbench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer has already shown the help
            return 0
        message = _usage_error_message(exc)
        if message is None:
            raise
        print(f"ndbench: error: {message} (see --help)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
