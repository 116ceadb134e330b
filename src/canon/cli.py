"""`canon <verb>`: the command line. Each verb parses its flags and calls one library function.

Every verb registers itself in VERBS through `_verb`; errors a user can act on (CanonError)
print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from canon.errors import CanonError

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _verb(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], None]):
        VERBS[name] = (help_text, add_arguments, run)
        return run

    return register


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*'")


@_verb("models", "list the registered models", _models_arguments)
def _run_models(args: argparse.Namespace) -> None:
    from canon.registry import describe_model, list_models

    names = list_models(args.pattern)
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {describe_model(name)}")


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
    from canon.errors import ConfigError, InputSizeError
    from canon.models.summary import format_table, summarize
    from canon.registry import list_models

    if args.input_size is not None and args.input_size < 1:
        raise ConfigError(f"--input-size must be a positive pixel count, got {args.input_size}")
    summaries = []
    for requested in args.models or ["*"]:
        if not any(c in requested for c in "*?["):
            summaries.append(summarize(requested, input_size=args.input_size))
            continue
        matches = list_models(requested)
        if not matches:
            raise ConfigError(f"no registered model matches {requested!r} (see `canon models`)")
        for name in matches:
            try:
                summaries.append(summarize(name, input_size=args.input_size))
            except InputSizeError as error:  # a pattern asks for the models that fit
                print(f"canon summary: skipped {name}: {error}", file=sys.stderr)
    print(format_table(summaries, markdown=args.markdown))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canon", description="The ImageNet canon of convolutional networks."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments, run) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return
    try:
        args.run(args)
    except CanonError as error:
        if os.environ.get("CANON_DEBUG"):
            raise
        print(f"canon {args.verb}: error: {error}", file=sys.stderr)
        sys.exit(2)
