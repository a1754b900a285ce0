"""The subcommands: parse the flags, build the config, call one function of the experiments
layer, and turn its errors into exit codes (the package docstring says which)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from adasap.cli.options import (
    EVAL_KEYS,
    RUN_OPTIONS,
    RUN_SWITCHES,
    TRAIN_KEYS,
    add_options,
    integer,
)
from adasap.deploy.runtimes import RUNTIMES
from adasap.distributed import close, init_from_env, is_main, launched
from adasap.errors import UserError
from adasap.experiments import commands
from adasap.experiments.config import ExperimentConfig, from_flat, load_yaml
from adasap.experiments.job import JOBS
from adasap.experiments.pareto import write_pareto
from adasap.experiments.run import run_experiment
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.io import read_json_mapping
from adasap.method.pruner_settings import EFFORT_SETTINGS
from adasap.training.checkpoint import RunInterrupted, TrainingDiverged


class _Parser(argparse.ArgumentParser):
    """Bad flags print one line, like every other user error (argparse prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}: see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adasap",
        description="Adaptive Sharpness-Aware Pruning: make vision models small and robust.",
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser(
        "run",
        help="train (or reuse) a dense model, prune it with each method, compare (default job)",
        description="Options come from the defaults, then CONFIG (YAML), then flags.",
    )
    run.add_argument("config", nargs="?", help="YAML file with any of the options below")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its directory")  # fmt: skip
    add_options(run, RUN_OPTIONS, RUN_SWITCHES)
    train = commands.add_parser(
        "train", help="train (or reuse the cached) dense model and save it in a run directory"
    )
    train.add_argument("config", nargs="?", help="YAML file with any of the options below")
    add_options(
        train,
        [o for o in RUN_OPTIONS if o[1] in TRAIN_KEYS],
        [o for o in RUN_SWITCHES if o[1] in TRAIN_KEYS],
    )
    evaluate = commands.add_parser(
        "eval",
        help="clean and corruption accuracy of a saved model or of every model in a run",
    )
    evaluate.add_argument("path", help="a run directory or a model directory")
    evaluate.add_argument(
        "--official-dir",
        help="root of official pre-rendered files (CIFAR-10-C, ImageNet-C, ...) to use instead "
        "of rendering",
    )
    evaluate.add_argument(
        "--official",
        choices=("cifar10-c", "cifar100-c", "tinyimagenet-c", "imagenet-c"),
        help="which official set --official-dir holds",
    )
    evaluate.add_argument(
        "--imagenet-v2",
        metavar="DIR",
        help="also report the accuracy on an ImageNet-V2 folder (<DIR>/<class index>/<image>)",
    )
    evaluate.add_argument(
        "--runtime",
        dest="eval_runtime",
        metavar="NAME",
        default="torch",
        help="compute the scores with the model deployed to this runtime (default: torch; "
        f"{', '.join(RUNTIMES.names())}): a quantized model's robustness on itself",
    )
    add_options(
        evaluate,
        [o for o in RUN_OPTIONS if o[1] in EVAL_KEYS],
        [o for o in RUN_SWITCHES if o[1] in EVAL_KEYS],
    )
    export = commands.add_parser("export", help="export a saved model to ONNX, checked")
    export.add_argument("path", help="a run directory or a model directory")
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.add_argument("--method", help="which model of the run (when it holds several)")
    export.add_argument("--opset", type=integer, default=17, help="ONNX opset, >= 17")
    export.add_argument(
        "--int8",
        action="store_true",
        help="quantize to INT8 (ONNX Runtime, static; calibrated on the run's training images)",
    )
    pareto = commands.add_parser(
        "pareto",
        help="clean vs corrupted validation accuracy per method over sweeps' settings, with "
        "each method's Pareto front (a PNG and a markdown table beside it)",
    )
    pareto.add_argument("folders", nargs="+", metavar="SWEEP_DIR",
                        help="sweep folders swept from the same base")  # fmt: skip
    pareto.add_argument("--out", required=True, help="the .png file to write")
    latency = commands.add_parser(
        "latency", help="latency and throughput of a run's models beside the dense one"
    )
    latency.add_argument("path", help="a run directory (or a model directory)")
    latency.add_argument("--batch-sizes", type=integer, nargs="+", default=[1, 64])
    latency.add_argument("--device", default="cpu", help="cpu or cuda")
    latency.add_argument(
        "--runtime",
        dest="runtimes",
        metavar="NAME",
        nargs="+",
        help=f"one or more of {', '.join(RUNTIMES.names())} (default: the run's runtime and "
        "torch; a detector's: torch)",
    )
    latency.add_argument("--repeats", type=integer, default=20)
    bench_presets = [n for task in JOBS for n in JOBS.get(task).bench_presets]
    for name, what, presets in (
        ("bench", "the benchmark grid (methods x criteria x keeps x seeds)", bench_presets),
        ("sweep", "the tuning sweep (validation data, held-out cbar + 4 extra corruptions)",
         list(SWEEP_PRESETS)),
    ):  # fmt: skip
        command = commands.add_parser(name, help=f"run {what}; resumable: rerun to continue")
        command.add_argument("--preset", choices=list(dict.fromkeys(presets)),
                             help=f"default: {presets[0]}")  # fmt: skip
        if name == "bench":
            command.add_argument("--task", choices=JOBS.names(), default=JOBS.names()[0],
                                 help="detection: tiny_ssd, P/mPC/rPC")  # fmt: skip
        command.add_argument("--out", help=f"output folder (default: runs/{name}-<preset>)")
        command.add_argument("--report-only", action="store_true",
                             help="rewrite the report from the results so far")  # fmt: skip
        command.add_argument(
            "--jobs", type=integer, metavar="N",
            help="run N cells at once, each in its own process with 1/N of the cores (with "
            "--ray: each with 1/N of the cluster's CPUs; default there: 1 CPU per cell, as many "
            "cells as the cluster fits)",
        )  # fmt: skip
        command.add_argument(
            "--ray", metavar="ADDRESS",
            help="run the cells as tasks on a Ray cluster: auto, ray://HOST:PORT, or local "
            "(needs adasap[ray]; --out and the cache on storage every machine shares)",
        )  # fmt: skip
        if name == "sweep":
            command.add_argument(
                "--check", action="store_true",
                help="after the sweep has chosen: evaluate its runs on the test set under the "
                "15 benchmark corruptions and write the rank correlations of the sweep's ranking "
                "with clean and with corrupted test accuracy (<out>/check/check.md; never used "
                "for the choice)",
            )  # fmt: skip
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[ExperimentConfig, bool]:
    """Defaults, then the YAML file or the resumed run's own config, then the flags.

    Keys and types are checked here, naming the file (flags are typed by the parser); ranges
    are checked once, when the job starts.
    """
    own = (
        "command",
        "config",
        "resume",
        "path",
        "official",
        "official_dir",
        "imagenet_v2",
        "eval_runtime",
    )
    flags = {k: v for k, v in vars(args).items() if k not in own}
    values: dict[str, Any] = {}
    source = None
    run_config = Path(getattr(args, "path", "") or "") / "config.json"
    if args.command == "eval" and run_config.is_file():
        values, source = _read_run_config(run_config), str(run_config)
    if getattr(args, "resume", None):
        run_dir = Path(os.path.abspath(args.resume))  # "." and ".." name their folder
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise UserError(f"{run_dir} holds no config.json: pass the directory of an adasap run")
        values, source = _read_run_config(saved), str(saved)
        values.update(out_dir=str(run_dir.parent), name=run_dir.name)
        free = ("progress", *EFFORT_SETTINGS)  # they change no result: a resume may change them
        changed = sorted(k for k in flags if k not in free and flags[k] != values.get(k))
        if changed:
            raise UserError(
                f"--resume continues the run as configured; drop {', '.join(changed)} "
                "(or start a new run)"
            )
    elif getattr(args, "config", None):
        values, source = load_yaml(args.config), f"config file {args.config}"
        if not values:
            raise UserError(
                f"config file {args.config} sets no options (it is empty): add some, e.g. "
                "'keep: 0.5', or leave the file out to use the defaults"
            )
    return from_flat({**values, **flags}, source=source), bool(getattr(args, "resume", None))


def _read_run_config(path: Path) -> dict[str, Any]:
    """A run directory's ``config.json``."""
    return read_json_mapping(path, "restore it, or start a new run with the same options")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # the built-in default job
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, one line printed by _Parser)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("bench", "sweep", "export", "latency") and launched():
        message = f"error: adasap {args.command} runs in one process: start it without torchrun"
        print(message, file=sys.stderr)
        return 2
    if args.command in ("bench", "sweep"):
        return _bench_or_sweep(args)
    if args.command in ("export", "latency"):
        return _deploy(args)
    if args.command == "pareto":
        return _pareto(args)
    try:
        config, resume = config_from_args(args)
        if _restarted_run(args, config):  # torchrun --max-restarts: continue the named run
            args.resume = str(Path(config.out_dir) / str(config.name))
            config, resume = config_from_args(args)
        init_from_env(config.prune.device)  # under torchrun: join its process group
        console = Console(quiet=not is_main())
        if args.command == "train":
            commands.train_dense_model(config, console)
        elif args.command == "eval":
            if bool(args.official) != bool(args.official_dir):
                raise UserError("--official and --official-dir go together: give both or neither")
            official = (args.official_dir, args.official) if args.official else None
            commands.evaluate_path(
                args.path, config, official, console, args.imagenet_v2, args.eval_runtime
            )
        else:
            run_experiment(config, console, resume=resume)
    except TrainingDiverged as exc:
        _report(f"error: {exc}")
        return 3
    except UserError as exc:
        _report(f"error: {exc}")
        return 2
    except RunInterrupted as exc:
        _report(f"{exc}; continue with: adasap run --resume {exc.run_dir}")
        return 130
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    finally:
        close()
    return 0


def _restarted_run(args: argparse.Namespace, config: ExperimentConfig) -> bool:
    """Whether torchrun restarted this ``adasap run --name N`` after its run directory was made.

    The restarted workers get the original command line; with ``--name`` it names the same
    run directory, which then continues as with ``--resume`` (docs/distributed.md).
    """
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if args.command != "run" or args.resume or config.name is None or restarts == 0:
        return False
    return (Path(config.out_dir) / config.name / "config.json").is_file()


def _report(message: str) -> None:
    """Print on stderr; under torchrun on rank 0 alone (every rank stops alike)."""
    if is_main():
        print(message, file=sys.stderr)


def _pareto(args: argparse.Namespace) -> int:
    try:
        png, table = write_pareto(args.folders, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {png} and {table}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    console = Console()
    try:
        if args.command == "export":
            report = commands.export_path(
                args.path, args.onnx, method=args.method, opset=args.opset, int8=args.int8
            )
            console.print(str(report))
            return 0 if report.passed else 1
        commands.measure_path_latency(
            args.path,
            batch_sizes=args.batch_sizes,
            runtimes=args.runtimes,
            device=args.device,
            repeats=args.repeats,
            console=console,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _bench_or_sweep(args: argparse.Namespace) -> int:
    task = getattr(args, "task", JOBS.names()[0])
    presets = JOBS.get(task).bench_presets if args.command == "bench" else SWEEP_PRESETS
    args.preset = args.preset or next(iter(presets))
    kind = "" if task == JOBS.names()[0] else f"{task}-"  # the default task keeps short names
    out = args.out or f"runs/{args.command}-{kind}{args.preset}"
    console = Console()
    try:
        commands.run_grid(
            args.command, args.preset, out, task=task,
            jobs=args.jobs, ray=args.ray, report_only=args.report_only,
            check=getattr(args, "check", False), console=console,
        )  # fmt: skip
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RunInterrupted, KeyboardInterrupt):
        print(f"interrupted; rerun the same command to continue ({out})", file=sys.stderr)
        return 130
    return 0
