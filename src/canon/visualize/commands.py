"""`canon visualize VERB RUN ...`: the command line of canon.visualize.

Each verb is one function taking the parsed arguments and returning what it wrote (Written),
registered with `@visualization(name, help, *argument_groups)`; the groups, shared between
verbs, are in canon.visualize.arguments. Every verb also gets RUN (with several_runs=True, one
or more RUNs compared on one plot), --output-dir and --device. Heavy modules are imported
inside the verbs, so `canon --help` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from canon.visualize.arguments import (
    Arguments,
    batch_argument,
    contrast_argument,
    data_arguments,
    feature_arguments,
    image_argument,
    images_argument,
    layer_argument,
    max_images_argument,
    metric_argument,
    names_argument,
    square_arguments,
    top_argument,
    transform_arguments,
)

if TYPE_CHECKING:  # torch and the rest load only when a verb runs
    from canon.engine.trained import TrainedModel
    from canon.visualize.images import Written

Visualization = Callable[[argparse.Namespace], "Written"]


class Verb(NamedTuple):
    help: str
    arguments: tuple[Arguments, ...]
    run: Visualization
    several_runs: bool  # RUN is nargs="+": args.checkpoint is a list
    run_help: str
    run_dirs_only: bool  # no checkpoint file or torchvision:NAME


VISUALIZATIONS: dict[str, Verb] = {}
RUN_HELP = ("a run directory, model.safetensors, a checkpoint .pt file or torchvision:NAME "
            "(torchvision's ImageNet weights)")


def visualization(name: str, help_text: str, *arguments: Arguments, several_runs: bool = False,
                  run_help: str = RUN_HELP, run_dirs_only: bool = False):
    """Register a verb: `help_text`, its argument groups and the function that runs it; with
    `several_runs`, RUN takes one or more (`run_help` says what a RUN may be)."""
    def register(run: Visualization) -> Visualization:
        VISUALIZATIONS[name] = Verb(help_text, arguments, run, several_runs, run_help,
                                    run_dirs_only)
        return run

    return register


def _trained(args: argparse.Namespace) -> TrainedModel:
    from canon.engine.trained import load_trained

    return load_trained(args.checkpoint)


def _written(result: dict[str, Any], summary: str) -> Written:
    """An analysis' result (the paths it wrote under png, csv and json) as Written."""
    from canon.visualize.images import Written

    return Written(summary, [Path(result[key]) for key in ("png", "csv", "json") if key in result])


@visualization("filters", "the first layer's kernels as a grid (AlexNet Fig. 3, ZFNet Fig. 6)",
               contrast_argument)
def _filters(args: argparse.Namespace) -> Written:
    from canon.visualize.filters import write_filters

    return write_filters(_trained(args), args.output_dir, shared_contrast=args.contrast == "shared")


@visualization("activations", "a layer's feature maps for one image", image_argument,
               layer_argument())
def _activations(args: argparse.Namespace) -> Written:
    from canon.visualize.filters import write_activations

    return write_activations(_trained(args), args.image, args.layer, args.output_dir,
                             device=args.device)


@visualization("deconvnet", "top images per feature and their deconvnet projections "
               "(Zeiler & Fergus Fig. 2)", layer_argument(), data_arguments(32),
               feature_arguments(9), top_argument)
def _deconvnet(args: argparse.Namespace) -> Written:
    from canon.visualize.deconvnet import write_deconvnet

    return write_deconvnet(
        _trained(args), args.layer, args.output_dir, data=args.data, split=args.split,
        features=args.features, channels=args.channels, top=args.top,
        batch_size=args.batch_size, workers=args.workers, device=args.device,
    )


@visualization("evolution", "features' projections at each kept epoch (Zeiler & Fergus "
               "Fig. 4)", layer_argument(), data_arguments(32), feature_arguments(6),
               images_argument, run_help="a run directory: its kept epoch checkpoints "
               "(train.keep_epochs) beside its final model", run_dirs_only=True)
def _evolution(args: argparse.Namespace) -> Written:
    from canon.visualize.evolution import write_evolution

    return write_evolution(
        args.checkpoint, args.layer, args.output_dir, data=args.data, split=args.split,
        images=args.images, features=args.features, channels=args.channels,
        batch_size=args.batch_size, workers=args.workers, device=args.device,
    )


@visualization("occlusion", "a grey square slid over an image: a feature map's activation, "
               "the correct class's probability and the top class per position (Zeiler & "
               "Fergus Fig. 7)", image_argument, square_arguments,
               layer_argument("the last of the model's stages"), batch_argument(64))
def _occlusion(args: argparse.Namespace) -> Written:
    from canon.visualize.occlusion import occlusion

    result = occlusion(
        args.checkpoint, args.image, args.output_dir, size=args.size, stride=args.stride,
        label=args.label, layer=args.layer, batch_size=args.batch_size, device=args.device,
    )
    positions, size = len(result["starts"]), result["size"]
    lowest = min(min(row) for row in result["maps"]["probability"])
    return _written(result, f"{positions}x{positions} positions of a {size}x{size} square on "
                    f"{args.image.name}: p({result['label']}) "
                    f"{result['unoccluded_probability']:.3f} unoccluded, {lowest:.3f} lowest")


@visualization("invariance", "feature distances and the true class's probability as images "
               "are shifted, scaled or rotated (Zeiler & Fergus Fig. 5)", transform_arguments,
               batch_argument(64))
def _invariance(args: argparse.Namespace) -> Written:
    from canon.visualize.invariance import invariance

    result = invariance(
        args.checkpoint, args.images, args.output_dir, transform=args.transform,
        values=args.values, labels=args.labels, batch_size=args.batch_size, device=args.device,
    )
    values, images = result["values"], result["images"]
    first = max(d for image in images for d in image["layer1_distance"])
    top = max(d for image in images for d in image["top_distance"])
    return _written(result, f"{args.transform} at {len(values)} values ({values[0]:g} to "
                    f"{values[-1]:g}) on {len(images)} image(s): largest distance {first:.3f} "
                    f"at layer 1, {top:.3f} at the penultimate layer")


@visualization("responses", "standard deviations of the 3x3 layers' responses after BN, "
               "runs compared (He et al. Fig. 7)", data_arguments(128, split=False),
               max_images_argument, names_argument, several_runs=True)
def _responses(args: argparse.Namespace) -> Written:
    from canon.visualize.responses import responses

    result = responses(
        args.checkpoint, args.output_dir, data=args.data, names=args.names,
        batch_size=args.batch_size, max_images=args.max_images, workers=args.workers,
        device=args.device,
    )
    runs = result["runs"]
    means = ", ".join(
        f"{run['name']} {sum(layer['std'] for layer in run['layers']) / len(run['layers']):.3f}"
        for run in runs
    )
    return _written(result, f"{len(runs)} run(s) on {runs[0]['images']} images, average "
                    f"layer response std: {means}")


@visualization("curves", "training and validation error by epoch, runs compared (He et al. "
               "Figs. 4 and 6)", metric_argument, names_argument, several_runs=True,
               run_help="a run directory (its metrics.csv), a checkpoint or export in one, or "
               "a metrics.csv file")
def _curves(args: argparse.Namespace) -> Written:
    from canon.visualize.curves import curves

    result = curves(args.checkpoint, args.output_dir, metric=args.metric, names=args.names)
    finals = ", ".join(f"{run['name']} {run['val'][-1]:.2f}% at epoch {run['epoch'][-1]:g}"
                       for run in result["runs"])
    return _written(result, f"final validation {args.metric.replace('top', 'top-')} error: "
                    f"{finals}")


def add_visualize_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `visualize` verb and its sub-verbs, on canon's top-level subparsers."""
    help_text = "pictures of what a trained network has learned, and the numbers behind them"
    parser = subparsers.add_parser("visualize", help=help_text, description=help_text)
    verbs = parser.add_subparsers(dest="visualization", metavar="VERB", required=True)
    for name, verb in VISUALIZATIONS.items():
        sub = verbs.add_parser(name, help=verb.help, description=verb.help)
        sub.add_argument("checkpoint", type=Path, metavar="RUN",
                         nargs="+" if verb.several_runs else None,
                         help=verb.run_help + ("; one or more" if verb.several_runs else ""))
        for add in verb.arguments:
            add(sub)
        sub.add_argument("--output-dir", type=Path, metavar="DIR", help=_output_help(name, verb))
        sub.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
        sub.set_defaults(visualize=verb.run)
    parser.set_defaults(run=run_visualize)


def _output_help(name: str, verb: Verb) -> str:
    """--output-dir's help: default_output_dir's answers for the RUNs the verb takes."""
    text = f"where to write; default: RUN's run directory/visualize/{name}"
    if not verb.run_dirs_only:
        text += f" ({name}-CHECKPOINT for a .pt file)"
    elsewhere = [*(["torchvision:NAME"] if verb.run_help == RUN_HELP else []),
                 *(["several RUNs"] if verb.several_runs else [])]
    return text + (f" (./visualize/{name} for {' or '.join(elsewhere)})" if elsewhere else "")


def default_output_dir(runs: Path | list[Path], verb: str) -> Path:
    """RUN's run directory/visualize/VERB (VERB-CHECKPOINT for a checkpoint named, some
    epoch's model: not over the final model's pictures); ./visualize/VERB where the pictures
    belong to no one run directory (torchvision:NAME, several runs compared)."""
    from canon.engine.checkpoint import run_dir_of
    from canon.engine.rundir import VISUALIZE_DIR
    from canon.engine.trained import TORCHVISION

    runs = runs if isinstance(runs, list) else [runs]
    if len(runs) == 1 and not str(runs[0]).startswith(TORCHVISION):
        epoch = f"-{Path(runs[0]).stem}" if Path(runs[0]).suffix == ".pt" else ""
        return run_dir_of(runs[0]) / VISUALIZE_DIR / f"{verb}{epoch}"
    return Path(VISUALIZE_DIR) / verb


def run_visualize(args: argparse.Namespace) -> int:
    """Run the chosen visualisation; print each file written and a one-line summary."""
    from canon.devices import resolve_device

    args.device = resolve_device(args.device)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.checkpoint, args.visualization)
    written = args.visualize(args)
    for path in written.paths:
        print(path)
    print(f"{args.visualization}: {written.summary} -> {args.output_dir}")
    return 0
