"""`canon bench train --model M [...]`, `canon bench data --data PATH [...]` and `canon bench
loop [...]`: the command line of canon.bench, also run by the scripts in bench/. torch loads
only when a benchmark runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from canon.bench import DEFAULT_RECIPE
from canon.errors import ConfigError
from canon.files import atomic_write, check_output_file


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a canon model with a torchvision twin: resnet18, resnet34, "
                        "resnet50/101/152 (+_v1_5), vgg11..vgg19 (+_bn), alexnet_owt, "
                        "googlenet_bn")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="images per step; default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="timed steps per repeat; default: 50 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, metavar="N",
                        help="untimed steps first (compilation happens here); default: 10 on "
                        "CUDA, 2 on CPU")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                        help="autocast precision")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="channels-last memory format; default: on CUDA, off on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture canon's step in a CUDA graph (train.cuda_graph)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="square input side; default: the model's own (224)")
    _repeats_and_json(parser, 5, "timed repeats per model")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="an ImageNet-layout folder (train/<class>/*.JPEG)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="NAME|FILE|all",
                        help="whose data pipeline; all: every bundled ImageNet-style recipe; "
                        f"default: {DEFAULT_RECIPE}")
    parser.add_argument("--images", type=int, default=500, metavar="N",
                        help="training images per pass, spread over the split")
    parser.add_argument("--device", metavar="DEVICE",
                        help="also time canon's on-device path (train.decode_on_device) there: "
                        "cuda, cpu or auto")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="files decoded together on --device; default: 256")
    _repeats_and_json(parser, 5, "passes per pipeline")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="quickstart", metavar="NAME",
                        help="an in-memory CIFAR recipe; default: quickstart")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--workers", default="0,2", metavar="N,N",
                        help="the plain loops' DataLoader processes, one loop each; the fastest "
                        "is the baseline; default: 0,2")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="steps per loop; default: one epoch")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value for both loops, e.g. --set "
                        "model.name=resnet110; train.cuda_graph and train.compile reach "
                        "canon's loop alone")
    _repeats_and_json(parser, 3, "runs per loop")


def _repeats_and_json(parser: argparse.ArgumentParser, repeats: int, what: str) -> None:
    """Every benchmark's --repeats (`what`, alternating, the median reported) and --json."""
    parser.add_argument("--repeats", type=int, default=repeats, metavar="N",
                        help=f"{what}, alternating; the median is reported")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `bench` verb and its `train` and `data` benchmarks, on canon's top-level subparsers
    (each sets `run`)."""
    help_text = "training-step and input-pipeline speed, canon against torchvision"
    parser = subparsers.add_parser("bench", help=help_text, description=help_text)
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, add_arguments, run, text in (
        ("train", add_train_arguments, run_train,
         "images/s, memory and FLOP utilisation of a training step, canon against "
         "torchvision's same architecture, on synthetic data"),
        ("data", add_data_arguments, run_data,
         "images/s per core of canon's JPEG training pipeline against torchvision's doing the "
         "same geometry"),
        ("loop", add_loop_arguments, run_loop,
         "canon's whole training loop on an in-memory CIFAR recipe against the plain PyTorch "
         "loop (torchvision transforms in a DataLoader) training the same"),
    ):
        sub = benches.add_parser(name, help=text, description=text)
        add_arguments(sub)
        sub.set_defaults(run=run)


BENCH_KEY = "canon_bench"  # names the benchmark in the JSON it writes: {BENCH_KEY, "figures"}


def _check_json(path: Path | None) -> None:
    """Before the benchmark runs: --json can take its figures (replacing only an earlier
    benchmark's: any other JSON may be a run's eval_config.json or a pack's index)."""
    if path is not None:
        check_output_file(path, "--json", "a canon bench JSON (a bench before 0c89369 wrote "
                          "none it knows)", _is_bench_json)


def _is_bench_json(path: Path) -> bool:
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and BENCH_KEY in written


def _write_json(path: Path | None, bench: str, figures: object) -> None:
    if path is not None:
        text = json.dumps({BENCH_KEY: bench, "figures": figures}, indent=2)
        atomic_write(path, lambda target: target.write_text(text))
        print(f"wrote {path}")


def run_train(args: argparse.Namespace) -> None:
    """Time the training step of canon's model and torchvision's, and print the figures."""
    _check_json(args.json)
    from canon.bench.train import bench_train, format_train

    bench = bench_train(
        args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        cuda_graph=args.cuda_graph,
        device=args.device, image_size=args.image_size, repeats=args.repeats,
    )
    print(format_train(bench))
    _write_json(args.json, "train", bench.to_dict())


def run_data(args: argparse.Namespace) -> None:
    """Time canon's and torchvision's training pipelines, and print the table."""
    _check_json(args.json)
    from canon.bench.data import bench_data, format_data, imagenet_recipes

    recipes = imagenet_recipes() if args.recipe == "all" else [args.recipe]
    if args.batch_size is not None and args.device is None:
        raise ConfigError("--batch-size sizes the batches decoded on --device: give it too")
    batch_size = 256 if args.batch_size is None else args.batch_size
    results = bench_data(args.data, recipes, images=args.images, repeats=args.repeats,
                         device=args.device, batch_size=batch_size)
    print(format_data(results, args.data, args.device, batch_size))
    _write_json(args.json, "data", [result.to_dict() for result in results])


def run_loop(args: argparse.Namespace) -> None:
    """Time canon's training loop and the plain ones, and print the rates and the ratio."""
    _check_json(args.json)
    from canon.bench.loop import bench_loop, format_loop

    try:
        workers = tuple(int(count) for count in args.workers.split(","))
    except ValueError:
        raise ConfigError(f"--workers {args.workers!r}: expected counts such as 0,2") from None
    if any(count < 0 for count in workers):
        raise ConfigError(f"--workers {args.workers!r}: counts must be at least 0")
    figures = bench_loop(args.recipe, args.device, args.repeats, workers, args.steps, args.set)
    print(format_loop(figures))
    _write_json(args.json, "loop", figures)


def run_script(doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], None]) -> None:
    """A bench/ script: the benchmark's own flags, and a CanonError as one line."""
    from canon.errors import CanonError, canon_message

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        run(parser.parse_args())
    except CanonError as error:
        sys.exit(f"{parser.prog}: error: {canon_message(error)}")
