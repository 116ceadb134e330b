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
