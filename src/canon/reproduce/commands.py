"""`canon reproduce NAME [--quick] [--runs N] [--data DIR] [--amp A] [--output-dir DIR]
[--device D] [--jobs N] [--cuda-graph]` and `canon reproduce --list`: the command line of
canon.reproduce. `--micro` (not shown in --help) is for canon's tests: a few steps of two
depths, which show nothing. torch loads only when an experiment runs, so `--list` and `--help`
answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from canon.errors import ConfigError
from canon.reproduce.experiments import listing


def add_reproduce_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `reproduce` verb, on canon's top-level subparsers (sets `run`)."""
    help_text = "reproduce the papers' findings and set our numbers beside theirs"
    parser = subparsers.add_parser("reproduce", help=help_text, description=help_text)
    parser.add_argument("experiment", nargs="?", metavar="NAME",
                        help="the experiment (--list names them)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="shortened for a CPU; --list says how for each experiment")
    modes.add_argument("--micro", dest="mode", action="store_const", const="micro",
                       help=argparse.SUPPRESS)  # canon's tests only
    parser.add_argument("--runs", type=int, metavar="N",
                        help="seeds per recipe, for the experiments that compare seeds "
                        "(cifar-table6: mean and std; ensembles: its members)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR", default=Path("reproduce"),
                        help="runs go to DIR/runs (shared by the experiments), the report to "
                        "DIR/NAME[-quick][-AMP]; default: ./reproduce")
    parser.add_argument("--data", metavar="DIR",
                        help="the dataset folder the recipes train on (imagenette: "
                        "/path/to/imagenette2-160); CIFAR-10 is downloaded when absent")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="train N runs at once, a process each, on the same device (the "
                        "CIFAR nets leave a big GPU mostly idle); default: 1")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture each run's training step in a CUDA graph "
                        "(train.cuda_graph): the same training, launched at once")
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"),
                        help="every run's autocast precision (train.amp; default: the "
                        "recipes'): other numbers, so other runs, named with it")
    parser.set_defaults(run=run_reproduce, mode="full")


def run_reproduce(args: argparse.Namespace) -> None:
    """List the experiments, or reproduce one and say whether its finding showed."""
    if args.list:
        print(listing())
        return
    if args.experiment is None:
        raise ConfigError("name an experiment: canon reproduce NAME (canon reproduce --list)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: train at least one run at a time")
    from canon.engine.trainer import TrainingInterrupted
    from canon.reproduce.runner import reproduce

    try:
        result = reproduce(args.experiment, args.output_dir, mode=args.mode, runs=args.runs,
                           device=args.device, data=args.data, jobs=args.jobs,
                           cuda_graph=args.cuda_graph, amp=args.amp)
    except TrainingInterrupted as stop:
        print(f"stopped ({stop.checkpoint}); the same command resumes it")
        sys.exit(128 + stop.signal_number)  # the shell's convention, as `canon train`
    except KeyboardInterrupt:  # outside training (analysis, report): nothing to save
        print("stopped before the report was written; the same command writes it (finished "
              "runs are not trained again)")
        sys.exit(130)
    for finding in result.findings:
        print(f"{'held' if finding.held else 'did not hold'}: {finding.statement} "
              f"({finding.evidence})")
    print(f"{args.experiment}: finding {'shown' if result.shown else 'not shown'} "
          f"({result.trained} run(s) trained now) -> {result.readme}")
