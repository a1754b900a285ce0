"""Which architectures adasap prunes: every model of a zoo through the structures check.

Each model runs in its own child process (a hang or a memory blow-up costs that model only):
built from scratch for 10 classes (``adasap.models.build_model``) at ``--image-size`` px (64)
or, where the dense model cannot run at that size, with timm's ``img_size`` at it, else at its
native size (timm's config; 224 for torchvision). ``adasap.prune`` prunes it to keep half its
**parameters** (``--keep-kind params``, ``--round-to 1``, one removal after a few batches of
random images: this checks structures, not speed), then, with batch-norm statistics
re-estimated on random images (see ``_calibrated``): the measured kept fraction, a
forward pass, a safetensors reload with identical outputs and an ONNX export checked with
onnxruntime. A row holds the outcome (``ok``; ``missed``: kept fraction off the target;
``check-failed``; ``refused``: adasap's one-line ``UserError``; ``unexpected``: any other
exception or a crash, a bug to report; ``timeout``; ``memory``: RSS above ``--memory-gb``,
polled by the parent; ``unbuildable``: the dense model runs at no size tried), the output
channels kept per layer kind, the stage reached, seconds (child start to end) and peak RSS.

Zoos: ``torchvision``, its classifiers of at most 60M parameters; ``timm``, the smallest
variant (timm's ``test_*`` fixtures left out) of each model module (family) with under 30M
parameters. Parameters are counted on the meta device, cached in ``$ADASAP_CACHE``.

    .venv/bin/python benchmarks/bench_coverage.py --zoo torchvision --markdown coverage.md
    .venv/bin/python benchmarks/bench_coverage.py --zoo timm --list-only
    .venv/bin/python benchmarks/bench_coverage.py --models resnet18 timm:resnet10t

Rows go to ``--out`` (JSONL); a rerun skips the models already there (delete a line to redo
one). Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

COLUMNS = (
    "model", "image size", "outcome", "kept", "what was pruned", "s (pruning)",
    "peak GB (pruning)", "error",
)  # fmt: skip
OUTCOMES = {
    "ok": "reached the target", "missed": "missed it", "check-failed": "failed a check",
    "refused": "refused cleanly", "unexpected": "failed unexpectedly", "timeout": "timed out",
    "memory": "exceeded memory", "unbuildable": "did not build",
}  # fmt: skip
ZOO_LIMITS = {"torchvision": 60e6, "timm": 30e6}  # parameters (at most; under)


def architecture(name: str, size: int) -> dict[str, Any]:
    """``build_model``'s keyword arguments (and the saved model's architecture)."""
    return dict(
        name=name, num_classes=10, in_channels=3, image_size=size, mean=[0.5] * 3, std=[0.25] * 3
    )


def _count(build: Any) -> int:
    """Parameters of ``build()``, built on the meta device (for real where that fails)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return sum(p.numel() for p in build().parameters())
        except Exception:  # e.g. RegNet reads its widths from tensors
            return sum(p.numel() for p in build().parameters())


def param_counts(zoo: str, names: list[str], build: Any, console: Console) -> dict[str, int]:
    """Parameters per model name (-1: it does not build), cached per zoo and version."""
    from adasap.io import atomic_write_json, cache_root

    version = __import__(zoo).__version__
    path = cache_root() / "bench_coverage" / f"{zoo}-{version}-params.json"
    counts = json.loads(path.read_text()) if path.is_file() else {}
    missing = [n for n in names if n not in counts]
    if missing:
        console.print(f"counting the parameters of {len(missing)} {zoo} models (cached after)")
        for name in missing:
            try:
                counts[name] = _count(lambda n=name: build(n))
            except Exception:  # a model that does not build is left out
                counts[name] = -1
        atomic_write_json(path, counts)
    return counts


def zoo_models(zoo: str, console: Console) -> list[tuple[str, int]]:
    """(name, parameters) of the zoo's models, as ``build_model`` names."""
    limit = ZOO_LIMITS[zoo]
    if zoo == "torchvision":
        import torchvision

        from adasap.models import build_model

        names = torchvision.models.list_models(module=torchvision.models)
        counts = param_counts(zoo, names, lambda n: build_model(**architecture(n, 224)), console)
        return [(n, counts[n]) for n in names if 0 < counts[n] <= limit]
    import timm
    from timm.models._registry import model_entrypoint

    names = [n for n in timm.list_models() if not n.startswith("test_")]
    counts = param_counts(zoo, names, lambda n: timm.create_model(n, num_classes=10), console)
    smallest: dict[str, tuple[int, str]] = {}  # per family: the module defining the model
    for name in names:
        family = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        if counts[name] > 0 and (counts[name], name) < smallest.get(family, (limit, "")):
            smallest[family] = (counts[name], name)
    return sorted((f"timm:{name}", count) for count, name in smallest.values())


class _Unbuildable(Exception):
    pass


def _builders(name: str, size: int) -> list[tuple[int, bool, Any]]:
    """(image size, built by build_model, builder) to try in turn."""
    from adasap.models import build_model

    def standard(s: int) -> Any:
        return lambda: build_model(**architecture(name, s))

    if not name.startswith("timm:"):
        return [(s, True, standard(s)) for s in dict.fromkeys((size, 224))]
    import timm

    bare = name.removeprefix("timm:")
    cfg = timm.models.get_pretrained_cfg(bare)
    native = int(cfg.input_size[-1]) if cfg is not None else 224

    def sized() -> Any:  # ViTs and others take the image size they are built for
        return timm.create_model(bare, num_classes=10, exportable=True, img_size=size)

    tries = [(size, True, standard(size)), (size, False, sized)]
    return tries + ([(native, True, standard(native))] if native != size else [])


def _runs_exportably(model: Any, size: int) -> bool:
    """Whether every adaptive pooling divides its input's grid at ``size`` (ONNX cannot express
    the others: AlexNet at 64 px), after a forward pass (AssertionError unless 10 logits)."""
    import torch
    from torch import nn

    grids: list[tuple[Any, Any]] = []
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    hooks = [
        m.register_forward_hook(lambda _, i, o: grids.append((i[0].shape[-2:], o.shape[-2:])))
        for m in model.modules()
        if isinstance(m, pools)
    ]
    try:
        with torch.no_grad():
            assert model(torch.rand(2, 3, size, size)).shape == (2, 10), "not 10 logits"
    finally:
        for hook in hooks:
            hook.remove()
    return all(g % p == 0 for grid, pooled in grids for g, p in zip(grid, pooled, strict=True))


def _dense(name: str, size: int, build: Any = None) -> tuple[Any, int, bool, Any]:
    """The first dense model that runs and can export, else the first that runs: (model,
    image size, built by build_model, builder)."""
    import torch

    error: BaseException | None = None
    runs = None
    for s, standard, builder in [(size, False, build)] if build else _builders(name, size):
        try:
            torch.manual_seed(0)
            model = builder().eval()
            if _runs_exportably(model, s):
                return model, s, standard, builder
            runs = runs or (model, s, standard, builder)
        except Exception as exc:  # the next size, or unbuildable
            error = exc
    if runs is not None:  # the export will refuse, in adasap's words
        return runs
    raise _Unbuildable(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")


def _channels(model: Any) -> dict[str, tuple[str, int]]:
    """Output width and kind of every conv and linear layer, by name."""
    from torch import nn

    from adasap.method.whole import is_attention

    attention = [n + "." for n, m in model.named_modules() if is_attention(m)]
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            grouped = "gconv" if m.groups > 1 and m.groups != m.in_channels else "conv"
            out[name] = ("dwconv" if m.groups == m.in_channels > 1 else grouped, m.out_channels)
        elif isinstance(m, nn.Linear):
            inside = any(name.startswith(a) for a in attention)
            out[name] = ("attention" if inside else "linear", m.out_features)
    return out


def _heads(model: Any) -> int:
    """Attention heads in the layers adasap removes heads from."""
    from adasap.method.heads import adapter_of

    adapters = ((m, adapter_of(m)) for m in model.modules())
    return sum(adapter.heads(m).count for m, adapter in adapters if adapter is not None)


def what_was_pruned(dense: Any, pruned: Any, history: list[list[Any]]) -> dict[str, Any]:
    """Output channels kept and dense per layer kind, attention heads kept and dense (the kinds
    that lost some) and the number of dependency groups that lost neurons (their roots)."""
    before, after = _channels(dense), _channels(pruned)
    kinds: dict[str, list[int]] = {}
    for name, (kind, width) in before.items():
        counts = kinds.setdefault(kind, [0, 0])
        counts[0] += after.get(name, (kind, 0))[1]
        counts[1] += width
    kinds["heads"] = [_heads(pruned), _heads(dense)]
    changed = {k: v for k, v in kinds.items() if v[0] != v[1]}
    return {"channels": changed, "groups": len({entry[0] for entry in history})}


REPORT: list[Any] = []  # the worker's: called with the row as each stage starts


def _stage(row: dict[str, Any], stage: str) -> None:
    row["stage"] = stage
    for report in REPORT:
        report(row)


def check(name: str, args: argparse.Namespace, build: Any = None) -> dict[str, Any]:
    """The structures check of one model in this process (``build``: instead of the name's
    builders): a row without ``seconds``."""
    from adasap.errors import UserError, exception_summary

    start = time.perf_counter()
    row: dict[str, Any] = {"model": name, "outcome": "unexpected", "stage": "build"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check(name, args, build, row)
        ours = [str(w.message) for w in caught if "adasap" in (w.filename or "")]
        if ours:
            row["warning"] = " ".join(ours[0].split())[:300]
    except _Unbuildable as exc:
        row.update(outcome="unbuildable", error=str(exc))
    except BaseException as exc:  # every failure is a row
        text = " ".join(str(exc).split())
        if isinstance(exc, MemoryError) or "can't allocate memory" in text:
            row.update(outcome="memory", error=exception_summary(exc))
        elif isinstance(exc, UserError):
            row.update(outcome="refused", error=text)
        else:
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if f"{os.sep}adasap{os.sep}" in f.filename][-1:]
            where = [f"{Path(f.filename).name}:{f.lineno}" for f in [*ours, frames[-1]]]
            row.update(error=f"UNEXPECTED {exception_summary(exc)}", where=" > ".join(where))
    row["check_seconds"] = round(time.perf_counter() - start, 2)
    row["peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def _check(name: str, args: argparse.Namespace, build: Any, row: dict[str, Any]) -> None:
    import copy

    import torch

    import adasap
    from adasap.data import load_dataset
    from adasap.deploy.onnx import export_onnx

    start = time.perf_counter()
    dense, size, standard, builder = _dense(name, args.image_size, build)
    row.update(image_size=size, params=sum(p.numel() for p in dense.parameters()))
    if not standard and build is None:
        row["timm_img_size"] = size  # timm.create_model(..., img_size=size), not build_model
    n = 8 * args.batches
    data = load_dataset(
        "synthetic", num_classes=10, channels=3, image_size=size, num_train=n + 8, num_test=4,
        val_fraction=8 / (n + 8),
    )  # fmt: skip
    _stage(row, "prune")
    result = adasap.prune(
        copy.deepcopy(dense), data, keep=args.keep, keep_kind=args.keep_kind,
        round_to=args.round_to, warmup_epochs=0, prune_epochs=1, finetune_epochs=0, prune_steps=1,
        batch_size=8, method="sgd", criterion=args.criterion, device="cpu", amp="off",
        channels_last=False, progress=False,
    )  # fmt: skip
    # the pruning alone: what a user's adasap.prune costs, before this check's copies
    row["prune_seconds"] = round(time.perf_counter() - start, 2)
    row["prune_peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    pruned = _calibrated(result.model, size)
    row["kept"] = sum(p.numel() for p in pruned.parameters()) / row["params"]
    row["kept_macs"] = result.keep_fraction("macs")
    row["pruned"] = what_was_pruned(dense, pruned, result.pruning_history)
    problems = []
    _stage(row, "forward")
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        expected = pruned(x)
    if expected.shape != (3, 10) or not torch.isfinite(expected).all():
        problems.append(f"forward: shape {tuple(expected.shape)} or non-finite logits")
    with tempfile.TemporaryDirectory() as scratch:
        _stage(row, "reload")
        folder = Path(scratch) / "model"
        adasap.save_model(folder, pruned, architecture(name, size), result.pruning_history)
        loaded = adasap.load_model(folder, base_model=None if standard else builder()).eval()
        with torch.no_grad():
            if not torch.equal(loaded(x), expected):
                problems.append("reload: outputs differ from the pruned model's")
        _stage(row, "onnx")
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))  # large logits: relative
        report = export_onnx(pruned, Path(scratch) / "m.onnx", image_size=size, tolerance=tolerance)
        row["onnx_max_diff"] = report.max_abs_diff
        if not report.passed:
            problems.append(f"onnx: max diff {report.max_abs_diff:.3g} >= {tolerance:.3g}")
    del row["stage"]
    row["keep_kind"] = args.keep_kind
    kept = row["kept_macs"] if args.keep_kind == "macs" else row["kept"]
    on_target = args.keep - args.tolerance <= kept <= args.keep + 0.005
    row["outcome"] = "check-failed" if problems else "ok" if on_target else "missed"
    if problems:
        row["error"] = "; ".join(problems)


def _calibrated(model: Any, size: int) -> Any:
    """``model`` in eval mode with its batch-norm statistics those of random images.

    Two training steps leave a random model's running statistics far from its activations, and
    in deep networks (EfficientNet-B3 and up) the logits grow to 1e4 or more, where float32
    rounding alone separates PyTorch from onnxruntime: the export check would then measure the
    random model's conditioning, not the export.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of ``pid`` in KiB; zeros once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields.get("VmRSS", "0 kB").split()[0]), int(fields.get("VmHWM", "0 kB").split()[0])


# the options a worker checks a model with (the others concern the parent)
WORKER_OPTIONS = (
    "image_size", "keep", "keep_kind", "round_to", "tolerance", "criterion", "batches",
    "threads",
)  # fmt: skip


def worker_argv(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The arguments of the worker checking ``name`` as ``args`` say, its row to ``out``."""
    argv = ["--worker", name, "--row-file", str(out)]
    for option in WORKER_OPTIONS:
        argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``check`` of ``name`` in a child process, under the time and memory limits."""
    with tempfile.TemporaryDirectory() as scratch:
        out, log = Path(scratch) / "row.json", Path(scratch) / "log.txt"
        command = [sys.executable, __file__, *worker_argv(name, args, out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start, peak, outcome = time.perf_counter(), 0, None
        with log.open("w") as sink:
            child = subprocess.Popen(
                command, stdout=sink, stderr=sink, env=env, start_new_session=True
            )
            try:
                while child.poll() is None and outcome is None:
                    rss, hwm = _memory_kb(child.pid)
                    peak = max(peak, hwm)
                    if rss > args.memory_gb * 2**20:
                        outcome = "memory"
                    elif time.perf_counter() - start > args.timeout:
                        outcome = "timeout"
                    time.sleep(0.1)
            finally:  # over a limit, or Ctrl-C here (the child has its own session)
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)  # the child's session only
                    child.wait()
        seconds = round(time.perf_counter() - start, 1)
        row = json.loads(out.read_text()) if out.is_file() else {}  # partial: up to a stage
        if outcome is None and row.pop("done", False):
            return {**row, "seconds": seconds}
        reached = ("image_size", "params", "timm_img_size", "stage")  # before the end
        row = {"model": name, **{k: row[k] for k in reached if k in row}, "seconds": seconds}
        row["outcome"] = outcome or "unexpected"
        last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1][:200]
        row["peak_gb"], row["error"] = (
            round(peak / 2**20, 3),
            {
                "timeout": f"no result within {args.timeout:g} s",
                "memory": f"RSS above {args.memory_gb:g} GB",
            }.get(outcome, f"UNEXPECTED crash (exit code {child.returncode}): {last}"),
        )
        return row


def cells(row: dict[str, Any]) -> list[str]:
    pruned = row.get("pruned") or {}
    what = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in pruned.get("channels", {}).items())
    if pruned:
        what = f"{what or 'nothing'} ({pruned['groups']} groups)"
    error = row.get("error") or row.get("warning") or ""
    if "stage" in row and row["outcome"] != "unbuildable":
        error = f"[{row['stage']}] {error}"
    return [
        row["model"], str(row.get("image_size", "")), row["outcome"],
        f"{_kept(row):.3f}" if "kept" in row else "", what,
        _with_pruning(row, "seconds", "prune_seconds", "{:.0f}"),
        _with_pruning(row, "peak_gb", "prune_peak_gb", "{:.2f}"),
        error.replace("|", "/"),
    ]  # fmt: skip


def _with_pruning(row: dict[str, Any], whole: str, pruning: str, form: str) -> str:
    """``whole (pruning)``: the check's figure and the pruning's part of it, where known."""
    text = form.format(row[whole]) if row.get(whole) else ""
    return text + (f" ({form.format(row[pruning])})" if pruning in row else "")


def _kept(row: dict[str, Any]) -> float:
    """The kept fraction of what the row was pruned by."""
    return row["kept_macs"] if row.get("keep_kind") == "macs" else row["kept"]


def summary(rows: list[dict[str, Any]]) -> str:
    counts = Counter(row["outcome"] for row in rows)
    parts = [f"{counts[k]} {label}" for k, label in OUTCOMES.items()]
    return f"{len(rows)} models: " + ", ".join(parts)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Pruned to keep {args.keep:g} of the {args.keep_kind} (round to {args.round_to}, "
        f"{args.criterion} scores, "
        f"one removal), from scratch, {args.threads} thread(s); limits {args.timeout:g} s, "
        f"{args.memory_gb:g} GB. What was pruned: output channels kept/dense per layer kind.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join([*lines, "", summary(rows), ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=tuple(ZOO_LIMITS), help="a whole zoo")
    parser.add_argument("--models", nargs="+", default=[], help="names (timm: timm:<name>)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--list-only", action="store_true", help="print the models, run none")
    parser.add_argument("--image-size", type=int, default=64, help="tried first (px)")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction to keep")
    parser.add_argument("--keep-kind", choices=("params", "macs"), default="params")
    parser.add_argument("--round-to", type=int, default=1, help="channels in blocks of N")
    parser.add_argument("--tolerance", type=float, default=0.06, help="'ok' down to keep - this")
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--batches", type=int, default=2, help="training batches of 8 images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="RSS limit per model")
    parser.add_argument("--out", type=Path, help="JSONL rows (default runs/coverage-<zoo>.jsonl)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.zoo or args.models or args.worker):
        parser.error("give --zoo or --models")
    args.out = args.out or Path("runs") / f"coverage-{args.zoo or 'models'}.jsonl"
    return args


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run, by model (a line cut short by a crash is left out)."""
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
            rows[row["model"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:  # the child: one model, its row to a file
        import torch

        torch.set_num_threads(args.threads)  # more threads on busy cores: many times slower
        REPORT.append(lambda row: args.row_file.write_text(json.dumps(row)))
        row = check(args.worker, args)
        args.row_file.write_text(json.dumps({**row, "done": True}))
        return [row]
    console = Console(width=200)
    models = [(name, None) for name in args.models]
    models = (models + (zoo_models(args.zoo, console) if args.zoo else []))[: args.limit]
    if args.list_only:
        for name, count in models:
            console.print(f"{name:50s} {'' if count is None else f'{count / 1e6:8.2f}M'}")
        console.print(f"{len(models)} models")
        return []
    done = read_rows(args.out)
    todo = [name for name, _ in models if name not in done]
    console.print(f"{len(models)} models, {len(models) - len(todo)} already in {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"keep {args.keep:g} of the {args.keep_kind}")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("kept", "s", "peak GB") else "left")
    with Live(table, console=console, auto_refresh=False, vertical_overflow="visible") as live:
        for name in todo:
            done[name] = row = run_child(name, args)
            with args.out.open("a") as sink:
                sink.write(json.dumps(row) + "\n")
            table.add_row(*map(escape, cells(row)))
            live.refresh()
            if not console.is_terminal:  # a log: one line per model as it ends
                console.print(escape(" | ".join(cells(row))))
    rows = [done[name] for name, _ in models]
    console.print("\n" + summary(rows))
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows, args))
    return rows


if __name__ == "__main__":
    main()
