"""The ``leantrain`` command: train, prepare-data, export, estimate, plot.

User mistakes (``UserError``) end in one line on stderr and exit code 2, without a traceback.
"""

import argparse
import sys
from collections.abc import Callable

from ..errors import UserError


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    train(load_config(args.config, args.overrides))
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from .data import prepare_data_main

    return prepare_data_main(args.rest)


def _export(args: argparse.Namespace) -> int:
    from .export import export_main

    return export_main(args.rest)


def _estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate_main

    return estimate_main(args.rest)


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_main

    return plot_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantrain", description="Memory-efficient training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a YAML config (a path or a bundled name)",
                                description="Train from a YAML config; key=value pairs override its keys.")
    train.add_argument("config", help="config file, or the name of a bundled config such as 'quickstart'")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.max_steps=100 optim.lr=3e-4")
    train.set_defaults(run=_train)

    prepare = commands.add_parser("prepare-data", help="tokenize text/JSONL files into memmap shards",
                                  add_help=False)
    prepare.add_argument("rest", nargs=argparse.REMAINDER)
    prepare.set_defaults(run=_prepare_data)

    export = commands.add_parser("export", help="write a run as a Hugging Face model directory", add_help=False)
    export.add_argument("rest", nargs=argparse.REMAINDER)
    export.set_defaults(run=_export)

    estimate = commands.add_parser("estimate", help="per-rank memory plan of a config (add --measure to check it)",
                                   add_help=False)
    estimate.add_argument("rest", nargs=argparse.REMAINDER)
    estimate.set_defaults(run=_estimate)

    plot = commands.add_parser("plot", help="plot loss curves of runs into a PNG", add_help=False)
    plot.add_argument("rest", nargs=argparse.REMAINDER)
    plot.set_defaults(run=_plot)
    return parser


def run_guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        print(f"leantrain: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Verbs that parse their own arguments get options that come before their first positional
        # (`leantrain estimate --help`), which the REMAINDER argument alone does not capture.
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = [*unknown, *args.rest]
    return run_guarded(lambda: args.run(args))


def train_main(argv: list[str] | None = None) -> int:
    """``python -m leantrain.train CONFIG [key=value ...]``, as launched by torchrun."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
