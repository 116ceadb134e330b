"""`canon <verb>`: the command line. Each verb parses its flags and calls one library function.

Every verb registers itself in VERBS through `_verb`; errors a user can act on (CanonError)
print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from canon.bench.commands import add_bench_parser
from canon.data.pack_command import add_pack_parser
from canon.errors import CanonError, ConfigError, canon_message
from canon.files import atomic_write, check_output_file, printable
from canon.reproduce.commands import add_reproduce_parser
from canon.torchrun import launched_by_torchrun
from canon.visualize.arguments import non_negative_int, positive_int
from canon.visualize.commands import add_visualize_parser

if TYPE_CHECKING:  # torch loads only when a verb runs, so that --help answers at once
    from canon.engine.trainer import TrainingInterrupted

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _verb(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], None]):
        VERBS[name] = (help_text, add_arguments, run)
        return run

    return register


def _pattern_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*'")


@_verb("models", "list the registered models", _pattern_arguments)
def _run_models(args: argparse.Namespace) -> None:
    from canon.models.factory import describe_model, list_models

    _print_described(list_models(args.pattern), describe_model, args.pattern, "model")


def _print_described(names: list[str], describe: Callable[[str], str], pattern: str | None,
                     kind: str) -> None:
    if not names:  # as `canon summary` does: an empty listing reads as success
        raise ConfigError(f"no {kind} matches {pattern!r} (`canon {kind}s` lists them all)")
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models", nargs="*", metavar="MODEL",
        help="model names or shell-style patterns ('resnet*'); default: every registered model",
    )
    parser.add_argument(
        "--input-size", type=int, metavar="N",
        help="square input side in pixels; default: each model's own (eval_config.input_size)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")


@_verb("summary", "layers, parameters, GFLOPs and activation memory per model", _summary_arguments)
def _run_summary(args: argparse.Namespace) -> None:
    from canon.models.summary import format_table, summarize_requested

    summaries, skipped = summarize_requested(args.models, args.input_size)
    for name, reason in skipped:
        print(f"canon summary: skipped {name}: {reason}", file=sys.stderr)
    print(format_table(summaries, markdown=args.markdown))


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", metavar="DATA", help="sample, cifar10, cifar100, or a dataset folder"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--size", type=int, metavar="N",
        help="side of the mean image, of whole images squashed to it (the cache a run reads "
        "at its data.resize_size; AlexNet's and ZFNet's central squares, and runs holding "
        "data.val_split images out, read others: see --recipe); default: 32 for CIFAR and "
        "the sample, 256 for folders",
    )
    which.add_argument(
        "--recipe", metavar="NAME|FILE",
        help="the statistics this recipe's runs on DATA read (its data.resize_size, its mean "
        "image's fit, the images it trains on), so that training finds them cached",
    )
    parser.add_argument("--workers", type=non_negative_int, default=0, help="decoding processes")
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default: $CANON_CACHE, else ~/.cache/canon)")
    parser.add_argument("--refresh", action="store_true", help="recompute even if cached")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first bad file instead of skipping"
    )


_MAX_STATS_SIZE = 1024


@_verb("stats", "training-set mean image, channel mean/std and RGB PCA (cached)", _stats_arguments)
def _run_stats(args: argparse.Namespace) -> None:
    import dataclasses

    from canon.data.loaders import recipe_statistics
    from canon.data.stats import statistics_of
    from canon.errors import ConfigError
    from canon.recipes import load_recipe

    # A bound, not an allocator traceback: the canon's networks see 224-512 px, and a batch of
    # 256 fitted images at 1024 px is already 0.8 GB.
    if args.size is not None and not 1 <= args.size <= _MAX_STATS_SIZE:
        raise ConfigError(f"--size must be a pixel count from 1 to {_MAX_STATS_SIZE} (the "
                          f"recipe's data.resize_size), got {args.size}")
    if args.recipe is not None:
        data = dataclasses.replace(load_recipe(args.recipe).data, dataset=args.data)
        stats, path = recipe_statistics(data, cache=args.cache, workers=args.workers,
                                        strict=args.strict, refresh=args.refresh)
    else:
        stats, path = statistics_of(args.data, size=args.size, cache=args.cache,
                                    workers=args.workers, strict=args.strict,
                                    refresh=args.refresh)
    print(stats.summary())
    print(f"cached at {path}")


def _recipes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "words", nargs="*", metavar="PATTERN | show NAME",
        help="a shell-style filter ('resnet*'), or `show NAME|FILE` for one recipe's resolved "
        "values with the paper citation of each",
    )


@_verb("recipes", "list the bundled training recipes, or show one", _recipes_arguments)
def _run_recipes(args: argparse.Namespace) -> None:
    from canon.errors import ConfigError
    from canon.recipes import RECIPES, list_recipes, show_recipe

    if args.words[:1] == ["show"]:
        if len(args.words) != 2:
            raise ConfigError("usage: canon recipes show NAME (a bundled recipe or a YAML file)")
        print(show_recipe(args.words[1]))
        return
    if len(args.words) > 1:
        raise ConfigError("usage: canon recipes [PATTERN] or canon recipes show NAME")
    pattern = args.words[0] if args.words else None
    _print_described(list_recipes(pattern), lambda name: RECIPES.get(name).description,
                     pattern, "recipe")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", metavar="NAME|FILE",
        help="a bundled recipe (`canon recipes` lists them) or a recipe YAML file; "
        "default: quickstart (ResNet-20 on the bundled CIFAR-10 sample)",
    )
    parser.add_argument("--model", help="train this registered model instead of the recipe's")
    parser.add_argument(
        "--init-from", metavar="RUN|CKPT|torchvision:NAME",
        help="start from these weights (tensors copied by name and shape; model.init_layers "
        "limits them): a run directory, checkpoint, model.safetensors or torchvision:NAME",
    )
    parser.add_argument(
        "--data", metavar="PATH|cifar10|cifar100|sample",
        help="dataset: an ImageNet-layout folder (train/<class>/, val/<class>/), a shard "
        "folder of one (canon pack), a CIFAR folder or name, or the bundled sample",
    )
    parser.add_argument("--epochs", type=int, help="epochs to train (replaces the recipe's "
                        "iteration limit)")
    parser.add_argument("--batch-size", type=int, help="images per device per micro-step")
    parser.add_argument(
        "--lr", type=float,
        help="learning rate at the recipe's optimizer.base_batch_size; scaled linearly to "
        "the global batch (batch size x accum x devices)",
    )
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"), help="autocast precision")
    parser.add_argument("--accum", type=int, metavar="K", help="micro-steps per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--resume", nargs="?", const="latest", metavar="PATH",
        help="continue a run: a run directory or checkpoint; alone, the latest run of the "
        "recipe (or the one in --output-dir)",
    )
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="run directory; default: runs/<recipe>[-N], under torchrun "
                        "runs/<recipe>-<launch id>")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir (its files are deleted "
                        "once the new run has an epoch checkpoint, and put back if it fails "
                        "before)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override any recipe value (YAML syntax), e.g. --set schedule.warmup_epochs=5",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, help="data loader processes per device")
    parser.add_argument("--seed", type=int, help="random seed (data order, augmentation, init)")
    parser.add_argument(
        "--model-parallel", metavar="towers|stages:K[:M]",
        help="one model over several devices: towers = AlexNet's two-GPU split (2012 paper); "
        "stages:K = pipeline over K devices with M micro-batches (default 4K)",
    )
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun: batch-norm statistics over the global batch (CUDA)")
    _strict_argument(parser)
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard events to <run>/tensorboard")


def _flag_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    from canon.recipes import flag_overrides, overridden_keys

    flags = [
        ("--model", "model.name", args.model), ("--init-from", "model.init_from", args.init_from),
        ("--data", "data.dataset", args.data), ("--epochs", "train.epochs", args.epochs),
        ("--batch-size", "train.batch_size", args.batch_size), ("--lr", "optimizer.lr", args.lr),
        ("--amp", "train.amp", args.amp), ("--accum", "train.accum_steps", args.accum),
        ("--compile", "train.compile", args.compile or None),
        ("--workers", "train.workers", args.workers), ("--seed", "train.seed", args.seed),
        ("--model-parallel", "train.model_parallel", args.model_parallel),
        ("--sync-bn", "train.sync_batchnorm", args.sync_bn or None),
        ("--strict", "train.strict_data", args.strict or None),
        ("--tensorboard", "train.tensorboard", args.tensorboard or None),
    ]
    overrides = flag_overrides(flags, args.set)
    if args.epochs is not None:
        if "train.iterations" in overridden_keys(args.set):
            raise ConfigError(f"--epochs {args.epochs} replaces the iteration limit that --set "
                              "train.iterations gives: pass one of them")
        overrides.append(("train.iterations", None))
    return overrides


@_verb("train", "train a model with one of the papers' recipes", _train_arguments)
def _run_train(args: argparse.Namespace) -> None:
    from canon.engine.checkpoint import resumable_checkpoints
    from canon.engine.distributed import is_main_process
    from canon.engine.rundir import plan_run
    from canon.engine.stopping import StoppedAtOnce
    from canon.engine.trainer import TrainingInterrupted, train

    with warnings.catch_warnings():
        if not is_main_process():
            _show_only_this_process_s_own_warnings()
        plan = plan_run(args.recipe, [*_flag_overrides(args), *args.set], resume=args.resume,
                        output_dir=args.output_dir)
        try:
            result = train(plan.recipe, plan.run_dir, resume=plan.state,
                           overwrite=args.overwrite, device=args.device)
        except TrainingInterrupted as stop:
            _exit_stopped(stop, plan.run_dir)
        except StoppedAtOnce:  # a second Ctrl-C: no interrupted.pt, the last checkpoint's left
            saved = resumable_checkpoints(plan.run_dir) if plan.run_dir.is_dir() else []
            if not saved:
                raise
            _exit_stopped(TrainingInterrupted(saved[0]), plan.run_dir, at_once=True)
    last = result.metrics[-1] if result.metrics else None
    if last is not None and is_main_process():
        split = "test" if result.validated_on_test_set else "val"
        best = "" if result.best_val_top1_error is None else (  # of whole epochs only
            f" (best.pt, the best whole epoch's: {result.best_val_top1_error:.2f}%)")
        print(f"done: {result.run_dir}  final model: {split} top-1 error "
              f"{last['val_top1_error']:.2f}%{best}, top-5 {last['val_top5_error']:.2f}%")


def _show_only_this_process_s_own_warnings() -> None:
    """Under torchrun, a process other than rank 0 shows only the images it failed to decode:
    the others, of the same recipe, data and checkpoint, rank 0 shows once for all."""
    from canon.data.folders import UndecodableImageWarning

    warnings.simplefilter("ignore")
    warnings.simplefilter("default", UndecodableImageWarning)  # the filter checked first


SOURCE_HELP = ("a run directory, model.safetensors, a checkpoint .pt file, or torchvision:NAME "
               "(torchvision's ImageNet weights, downloaded to its cache)")


def _strict_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict", action="store_true",
        help="stop at the first file that is no decodable image (empty, undecodable, or not an "
        "image file name) instead of skipping it with a warning",
    )


def _report_skipped(count: int) -> None:
    if count:
        print(f"skipped {count} image file(s), empty, missing or undecodable (see the "
              "warnings; --strict stops at the first)")


def _exit_stopped(stop: TrainingInterrupted, run_dir: Path, at_once: bool = False) -> NoReturn:
    """A training run stopped by a signal, its state saved (TrainingInterrupted), or `at_once`
    by a second Ctrl-C, its last checkpoint being `stop.checkpoint`: how to go on, then the
    shell's exit status for the signal (130 Ctrl-C, 143 SIGTERM)."""
    from canon.engine.distributed import is_main_process

    if is_main_process():  # under torchrun: as many processes (the checkpoint's batch)
        how = ("the same torchrun command with --resume" if launched_by_torchrun()
               else "canon train --resume")
        stopped = "\nstopped at once (the steps since it are lost)" if at_once else "stopped"
        print(f"{stopped}; resume with: {how} {run_dir}  ({stop.checkpoint})")
    sys.exit(128 + stop.signal_number)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help=SOURCE_HELP + "; several: each one and their ensemble (the mean "
                        "of their softmax outputs)")
    parser.add_argument("--data", help="dataset name or folder; default: the one trained on")
    parser.add_argument(
        "--protocol", default="center",
        help="center, ten-crop, dense, 144-crop (GoogLeNet), multi-scale (= multi-scale+center), "
        "multi-scale+ten-crop, multi-scale+dense, multi-crop (VGG: 5x5 grid + flips at 3 scales) "
        "or multi-crop+dense (VGG)",
    )
    parser.add_argument("--per-class", action="store_true",
                        help="also write each class's error (CSV) and the confusion matrix (PNG)")
    parser.add_argument(
        "--scales", type=positive_int, nargs="+", metavar="S",
        help="the shorter sides (px) the multi-scale protocols and 144-crop resize to; "
        "default: the recipe's data.test_scales, else VGG's rule (resize_size - 32, "
        "resize_size, + 32, those not under the crop)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="the most views (crops, reflections, scales) a forward pass "
                        "takes: images are loaded BATCH_SIZE // views per image at a time")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument(
        "--output", type=Path, metavar="JSON",
        help="where to write the result; default: eval-PROTOCOL.json in the run directory "
        "named, or beside the model file named (eval-PROTOCOL-CHECKPOINT.json for a "
        "checkpoint), or ensemble-PROTOCOL.json here for several; with -DATA before .json "
        "on a --data other than the first model's own",
    )
    _strict_argument(parser)


def _is_eval_json(path: Path) -> bool:
    import json

    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and {"protocol", "top1_error"} <= written.keys()


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _is_features_file(path: Path) -> bool:
    from canon.errors import DataError
    from canon.transfer.features import Features

    try:
        Features.load(path)
    except DataError:
        return False
    return True


@_verb("eval", "top-1/top-5 error of trained models (or their ensemble) under a test protocol",
       _eval_arguments)
def _run_eval(args: argparse.Namespace) -> None:
    import json

    from canon.data.datasets import anchored_dataset, check_recorded_dataset
    from canon.devices import resolve_device
    from canon.engine.trained import load_trained
    from canon.errors import DataError
    from canon.evaluation.ensemble import evaluate_ensemble
    from canon.evaluation.report import (
        class_report,
        is_class_report,
        write_class_errors,
        write_confusion_png,
    )

    trained = [load_trained(source) for source in args.sources]
    if args.data is None:
        check_recorded_dataset(trained[0].data.dataset, "evaluate")
    data = anchored_dataset(args.data or trained[0].data.dataset)
    output = args.output or _default_eval_output(args, trained, data)
    # Before the work: the default output too may be a user's file, or unwritable.
    check_output_file(output, "--output", "an evaluation's JSON", _is_eval_json)
    if args.output is None:
        _check_same_data(output, data)
        if len(trained) > 1:
            _check_same_members(output, _ensemble_sources(args.sources))
    stem = output.with_suffix("")
    per_class, confusion = (stem.with_name(f"{stem.name}-{end}")
                            for end in ("per-class.csv", "confusion.png"))
    # An earlier --per-class's report of this output's: canon's CSV, and a PNG beside it or
    # beside canon's JSON. Replaced, or deleted with a result written without --per-class.
    csv_ours = is_class_report(per_class)
    png_ours = (csv_ours or _is_eval_json(output)) and _is_png(confusion)
    if args.per_class:
        check_output_file(per_class, "--per-class", "canon's per-class report",
                          lambda path: csv_ours)
        check_output_file(confusion, "--per-class", "canon's confusion matrix",
                          lambda path: png_ours)
    stale = [] if args.per_class else [
        path for path, ours in ((per_class, csv_ours), (confusion, png_ours)) if ours]
    options = {"batch_size": args.batch_size, "workers": args.workers, "strict": args.strict,
               "progress": True, "keep_probabilities": args.per_class,
               "scales": tuple(args.scales or ())}
    if len(trained) == 1:
        result = trained[0].evaluate(args.data, args.protocol, device=args.device, **options)
    else:
        result = evaluate_ensemble([t.member() for t in trained], data, args.protocol,
                                   device=resolve_device(args.device), **options)
        result["data"], result["sources"] = data, _ensemble_sources(args.sources)
        for member in result["members"]:
            print(f"  {member['name']}: top-1 error {member['top1_error']:.2f}%, top-5 error "
                  f"{member['top5_error']:.2f}%")
    if not result["images"]:  # every file undecodable: no error rate to print or write
        raise DataError(f"none of the {result['skipped']} image file(s) of {result['data']} "
                        "could be decoded (see the warnings): nothing was evaluated")
    what = trained[0].source if len(trained) == 1 else f"ensemble of {len(trained)}"
    print(
        f"{printable(what)}: {result['protocol']}{_scales_said(args.protocol, result)} "
        f"on {printable(result['data'])} "
        f"({result['images']} images): top-1 error {result['top1_error']:.2f}%, top-5 error "
        f"{result['top5_error']:.2f}%"
    )
    _report_skipped(result["skipped"])
    scores = (result.pop("probabilities"), result.pop("labels")) if args.per_class else None
    result.pop("member_predictions", None)  # an ensemble's, image by image: not for the JSON
    text = json.dumps(result, indent=2)  # first: the per-class files are extras
    atomic_write(output, lambda path: path.write_text(text),
                 advice="the result is printed above; choose a writable --output")
    print(f"wrote {printable(output)}")
    if scores is None:  # an earlier --per-class's, which would go with the new result
        for path in stale:
            path.unlink(missing_ok=True)
        return
    report = class_report(*scores, trained[0].classes)
    write_class_errors(report, per_class)
    write_confusion_png(report.confusion, report.classes, confusion)
    print(f"wrote {printable(per_class)} and {printable(confusion)}")


def _scales_said(protocol: str, result: dict) -> str:
    """" at scales 224, 256, 288" for the protocols that resize to several (their views
    record the single scale of the others too); an ensemble's members may each have theirs."""
    from canon.data.views import parse_protocol

    parsed = parse_protocol(protocol)
    several = parsed.multi_scale or "144-crop" in parsed.methods
    scales = result.get("scales")  # an ensemble's result has none of its own
    return f" at scales {', '.join(map(str, scales))}" if several and scales else ""


def _default_eval_output(args: argparse.Namespace, trained: list, data: str) -> Path:
    """eval-PROTOCOL.json in the run directory named, also when read from its checkpoints
    (no export yet); beside a model file named, with a checkpoint's name (a checkpoint of
    some epoch: not over the run's own result, nor over another epoch's); here for
    torchvision:NAME, with its name; for several models, ensemble-PROTOCOL.json here.
    Another dataset's result gets its folder's name, beside the model's own one."""
    from canon.data.datasets import anchored_dataset
    from canon.data.views import parse_protocol
    from canon.engine.trained import TORCHVISION

    def part(name: str) -> str:
        return "-" + re.sub(r"[^A-Za-z0-9._-]", "_", name)

    protocol = parse_protocol(args.protocol).name
    other = "" if data == anchored_dataset(trained[0].data.dataset) else part(Path(data).name)
    if len(trained) > 1:
        return Path(f"ensemble-{protocol}{other}.json")
    named, source = Path(args.sources[0]), trained[0].source
    if named.is_dir():
        return named / f"eval-{protocol}{other}.json"
    if str(source).startswith(TORCHVISION):  # here, named after the weights
        return Path(f"eval-{protocol}{other}{part(str(source))}.json")
    epoch = part(source.stem) if source.suffix == ".pt" else ""
    return source.parent / f"eval-{protocol}{other}{epoch}.json"


def _check_same_data(output: Path, data: str) -> None:
    """A default output that holds a result on other images (another folder of the same
    name) is not replaced: a DataError saying to name one."""
    from canon.data.datasets import recorded_differences
    from canon.errors import DataError

    earlier = recorded_differences(output, {"data": data}).get("data")
    if earlier is not None:
        raise DataError(f"{output} holds the result on {earlier}, other images than {data}: "
                        "name another file with --output")


def _ensemble_sources(sources: list[str]) -> list[str]:
    """An ensemble's models as named (run folders, files, torchvision:NAME), absolute and
    sorted: the same ensemble however it is typed, and while its runs train on."""
    from canon.engine.trained import recorded_source

    return sorted(map(recorded_source, sources))


def _check_same_members(output: Path, sources: list[str]) -> None:
    """A default ensemble output (ensemble-PROTOCOL.json, here) that holds another ensemble's
    result is not replaced: a DataError saying to name one."""
    import json

    from canon.errors import DataError

    try:
        earlier = json.loads(output.read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not an ensemble's
        return
    if earlier != sources:
        raise DataError(f"{output} holds the result of another ensemble ({', '.join(earlier)})"
                        ": name another file with --output")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="SOURCE... IMAGE...",
        help="one or more models (" + SOURCE_HELP + "; several: their ensemble), then image "
        "files or folders (searched recursively)",
    )
    parser.add_argument("--top", type=positive_int, default=5, help="classes to show per image")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images decoded and scored at a time, fewer once they hold 64 "
                        "megapixels (results print as each batch is done)")
    _strict_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")


def _is_source(path: str) -> bool:
    """A model: torchvision:NAME, a .pt or .safetensors file, or a folder holding a run's
    export or checkpoints (any other folder is one of images)."""
    from canon.engine.checkpoint import CHECKPOINT_DIR, EXPORT_WEIGHTS
    from canon.engine.trained import TORCHVISION

    if Path(path).is_dir():
        return (Path(path) / EXPORT_WEIGHTS).is_file() or (Path(path) / CHECKPOINT_DIR).is_dir()
    return path.startswith(TORCHVISION) or Path(path).suffix in (".pt", ".safetensors")


def _image_files(path: str, strict: bool = False) -> list[str]:
    """`path`, or the image files under it (by name, in sorted order) when it is a folder:
    as a dataset folder is read, hidden files and folders (.DS_Store, macOS's ._name.jpg,
    .ipynb_checkpoints/) left out, links to nothing kept (to be reported as unreadable), an
    unreadable subfolder warned of (`strict`: refused)."""
    import warnings

    from canon.data.folders import IMAGE_EXTENSIONS, BadImageWarning
    from canon.errors import ConfigError, DataError

    if not Path(path).is_dir():
        return [path]
    found, unreadable = [], []
    for folder, subfolders, files in os.walk(path, onerror=unreadable.append):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in subfolders:  # os.walk lists them, but does not go in (a loop would not end)
            if os.path.islink(os.path.join(folder, name)):
                warnings.warn(f"skipping {os.path.join(folder, name)}: a link to a folder (not "
                              "followed, as in a dataset folder)", BadImageWarning, stacklevel=2)
        found += [os.path.join(folder, name) for name in files
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    for error in unreadable:
        problem = f"the folder {error.filename}: cannot read it ({error.strerror})"
        if strict:
            raise DataError(f"{problem}; --strict stops at the first unreadable file or folder")
        warnings.warn(f"skipping {problem}", BadImageWarning, stacklevel=2)
    found.sort()
    if not found:
        raise ConfigError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) and is "
                          "not a run directory (no model.safetensors or checkpoints/)")
    return found


# Decoded pixels canon predict holds before it scores them (about 200 MB of uint8 RGB): 64
# photos of 12 megapixels would take 2.3 GB, full size until each is cropped.
PREDICT_PIXELS = 64_000_000


@_verb("predict", "the most likely classes for image files (one model or an ensemble)",
       _predict_arguments)
def _run_predict(args: argparse.Namespace) -> None:
    import warnings

    from canon.data.folders import BadImageWarning
    from canon.devices import resolve_device
    from canon.engine.checkpoint import EXPORT_WEIGHTS
    from canon.engine.trained import decode_images, load_trained
    from canon.errors import ConfigError, DataError
    from canon.evaluation.ensemble import predict_ensemble

    count = next((i for i, p in enumerate(args.paths) if not _is_source(p)), len(args.paths))
    sources, images = args.paths[:count], args.paths[count:]
    missing = [path for path in images if not Path(path).exists()]
    if missing:  # a mistyped model path would otherwise be skipped as an image
        raise ConfigError(f"no such file: {', '.join(missing)} (models first: run directories, "
                          ".pt, .safetensors, torchvision:NAME; then image files)")
    misplaced = [path for path in images if _is_source(path)]
    if misplaced:  # a run directory's own pictures would be classified in its place
        raise ConfigError(f"{', '.join(misplaced)}: a model after the images; name every model "
                          "first, then the images (canon predict MODEL... IMAGE...)")
    if not sources or not images:
        raise ConfigError(f"canon predict needs {'a model' if not sources else 'images'}: "
                          "models first (run directories, .pt, .safetensors, torchvision:NAME), "
                          "then image files or folders of them")
    images = [file for path in images for file in _image_files(path, args.strict)]
    trained = [load_trained(source) for source in sources]
    for source, model in zip(sources, trained, strict=True):
        if (Path(source).is_dir() and model.source.suffix == ".pt"  # a run not finished yet
                and not (Path(source) / EXPORT_WEIGHTS).exists()):  # (else damaged: warned of)
            print(f"{source}: no exported model yet; predicting with {model.source}",
                  file=sys.stderr)
        model.model.to(resolve_device(args.device))
    members, skipped = [t.member() for t in trained], 0
    paths, decoded = [], []

    def predict_held() -> None:
        for path, ranking in zip(paths, predict_ensemble(members, decoded, args.top),
                                 strict=True):
            print(printable(path), flush=True)
            for name, probability in ranking:
                print(f"  {probability:7.2%}  {printable(name)}")
        paths.clear()
        decoded.clear()

    for path in images:  # a folder's worth stays in bounds: a batch, or PREDICT_PIXELS
        try:
            decoded += decode_images([path], trained[0].data)
            paths.append(path)
        except DataError as error:
            if args.strict:
                raise
            warnings.warn(f"skipping {error}", BadImageWarning, stacklevel=1)
            skipped += 1
        if len(decoded) == args.batch_size or (
                decoded and sum(image[0].numel() for image in decoded) >= PREDICT_PIXELS):
            predict_held()
    if decoded:
        predict_held()
    _report_skipped(skipped)
    if skipped == len(images):  # nothing predicted: a script must not read success
        raise DataError(f"none of the {len(images)} image file(s) could be decoded (see the "
                        "warnings)")


def _transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--data", required=True, metavar="PATH|cifar10|cifar100",
                        help="the new dataset: a folder with train/ and val/ (or valid/, test/)"
                        " class folders, or a CIFAR name or folder")
    parser.add_argument(
        "--mode", required=True, choices=("linear-probe", "finetune"),
        help="linear-probe: logistic regression on the frozen network's penultimate features; "
        "finetune: train the whole network with a new classifier",
    )
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="the run directory to write; default: runs/transfer-<mode>[-N]")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="finetune: override a recipe value, e.g. --set train.epochs=30 or "
        "--set model.frozen_stages=2",
    )
    parser.add_argument("--batch-size", type=positive_int,
                        help="linear-probe: feature batch (default 64); finetune: "
                        "train.batch_size")
    parser.add_argument("--workers", type=non_negative_int,
                        help="decoding processes (linear-probe default 0; finetune: "
                        "train.workers)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")


@_verb("transfer", "carry a trained network to a new dataset (linear probe or fine-tuning)",
       _transfer_arguments)
def _run_transfer(args: argparse.Namespace) -> None:
    from canon.engine.rundir import RUNS_ROOT, new_run_dir
    from canon.engine.trainer import TrainingInterrupted
    from canon.transfer.runs import FEATURE_CACHE, transfer

    out = args.output_dir or new_run_dir(RUNS_ROOT, f"transfer-{args.mode}")
    try:
        run_dir = transfer(
            args.source, args.data, args.mode, out, overrides=args.set,
            overwrite=args.overwrite, device=args.device, batch_size=args.batch_size,
            workers=args.workers,
        )
    except TrainingInterrupted as stop:  # a fine-tuning run: it goes on as any training run
        _exit_stopped(stop, out)
    except KeyboardInterrupt:  # a probe: without --output-dir, a rerun would start afresh
        if not (Path(out) / FEATURE_CACHE).is_dir():
            raise
        print(f"\nstopped; the features extracted so far are kept in {out / FEATURE_CACHE}: "
              f"the same command with --output-dir {out} goes on from them")
        sys.exit(130)
    print(f"done: {run_dir}  (canon eval {run_dir}; canon predict {run_dir} IMAGE...)")


def _features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--data", required=True, help="dataset name or folder")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.safetensors")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")


@_verb("features", "export a network's penultimate features of a dataset split",
       _features_arguments)
def _run_features(args: argparse.Namespace) -> None:
    from canon.data.datasets import anchored_dataset, open_split
    from canon.devices import resolve_device
    from canon.engine.trained import load_trained
    from canon.transfer.features import extract_features

    if args.out.suffix != ".safetensors":  # a reader going by the name would misread it
        raise ConfigError(f"--out {args.out}: the features are written as safetensors; name "
                          "the file FILE.safetensors")
    check_output_file(args.out, "--out", "a features file", _is_features_file)
    trained = load_trained(args.source)
    trained.model.to(resolve_device(args.device))
    # The evaluation split is labelled by the training split's classes, as a probe fitted on
    # the training features reads them (val may lack some of them).
    options = ({"class_ids": open_split(args.data, "train").class_ids}
               if args.split == "val" else {})
    features = extract_features(
        trained, open_split(args.data, args.split, **options),
        f"{anchored_dataset(args.data)} {args.split}",
        batch_size=args.batch_size, workers=args.workers, progress=True,
    )
    features.save(args.out)
    print(f"wrote {args.out}: {tuple(features.features.shape)} features and labels of "
          f"{len(features.classes)} classes")


def build_parser() -> argparse.ArgumentParser:
    from canon import __version__

    parser = argparse.ArgumentParser(
        prog="canon", description="The ImageNet canon of convolutional networks."
    )
    parser.add_argument("--version", action="version", version=f"canon {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments, run) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    add_visualize_parser(verbs)
    add_reproduce_parser(verbs)
    add_bench_parser(verbs)
    add_pack_parser(verbs)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object) -> str:
    """Warnings as one line for people at a terminal, not a source line for programmers."""
    return f"canon: {category.__name__}: {message}\n"


def _chosen_subparser(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> tuple[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest)
            return None if name is None else (name, action.choices[name])
    return None


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, taking a verb's options between its positional arguments too.

    argparse ends a variadic positional at the first option, so `canon predict RUN --top 2
    IMAGE` would leave IMAGE over as "unrecognized" under plain `canon:`. Where anything is
    left over, the innermost verb's own parser reads that verb's arguments again with
    intermixed parsing (which argparse refuses on a parser with subcommands): what is still
    left over is then reported under the verb's name.
    """
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    leaf, start = parser, 0
    while (chosen := _chosen_subparser(leaf, args)) is not None:
        name, leaf = chosen
        start = argv.index(name, start) + 1
    if leaf is parser:
        return parser.parse_args(argv)  # no verb: argparse's own error
    own = {action.dest for action in leaf._actions}
    outer = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in own})
    return leaf.parse_intermixed_args(argv[start:], outer)


def _check_launcher(verb: str) -> None:
    """`canon train` shares its work among torchrun's processes; any other verb would run
    whole in each of them, writing the same files and printing everything once a process
    (`canon recipes` only reads YAML)."""
    if verb not in ("train", "recipes") and launched_by_torchrun():
        raise ConfigError(f"canon {verb} runs in one process, and torchrun started one per "
                          "device (each would do all of it): run it without torchrun")


def _print_error(verb: str, message: str) -> None:
    """Under torchrun every rank may meet the same error: rank 0 prints it, first (its output
    may be all torchrun keeps: --local-ranks-filter 0, per-rank logs), and another rank only
    where it met it before every other rank (canon.engine.distributed.first_to_meet). Twice at
    most where every rank printed one copy, and eight would bury an error that differs."""
    line = f"canon {verb}: error: {message}"
    if not launched_by_torchrun():
        print(line, file=sys.stderr)
        return
    from canon.engine.distributed import first_to_meet, is_main_process

    try:
        main = is_main_process()
    except CanonError:  # RANK is no number: the error may be that
        main = True
    if main:
        print(line, file=sys.stderr, flush=True)
    first = first_to_meet(message)  # rank 0 is counted too: the others then know it has it
    if first and not main:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if args.verb is None:
        parser.print_help()
        return
    default_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        _check_launcher(args.verb)
        args.run(args)
    except CanonError as error:
        if os.environ.get("CANON_DEBUG"):
            raise
        _print_error(args.verb, canon_message(error))
        sys.exit(2)
    except KeyboardInterrupt as stop:  # Ctrl-C where nothing is saved (training's verbs say
        if os.environ.get("CANON_DEBUG"):  # more); a verb may say what it left (canon pack)
            raise
        left = f"; {stop}" if str(stop) else ""
        print(f"\ncanon {args.verb}: stopped{left}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (| head): stop as a shell tool does
        if os.environ.get("CANON_DEBUG"):
            raise
        with contextlib.suppress(OSError, ValueError):  # the exit's flush would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool stopped so
    finally:
        warnings.formatwarning = default_format  # main() may be called from Python
