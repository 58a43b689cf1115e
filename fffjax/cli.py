"""The ``fffjax`` command line: ``fffjax [--version] [--debug] <subcommand> [options]``.

Each subcommand lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). Register a new one with a single line in
:data:`SUBCOMMANDS`. Only the module of the subcommand being run is imported, so a command
does not pay for (or break on) the imports of the others.

A user error raised by a subcommand (see :func:`is_user_error`) prints one line,
``fffjax: error: <message>``, on stderr and exits with status 2, as argparse does for a bad option;
``--debug`` shows its traceback instead. Any other exception is a bug and keeps its traceback.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

from fffjax import __version__

# Errors of the user's making: a missing or existing path, a bad value (an unknown `--config`
# included), a missing corpus (`fffjax.data.corpus.missing_data_error`: a FileNotFoundError).
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)

# name -> (module defining HELP, add_arguments, run; one-line help shown by `fffjax --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fffjax.demo", "train FFF-v1 and an equally wide FF on digits, harden, time, "
                            "checkpoint, export to PyTorch and check it there"),
    "pretrain": ("fffjax.train.pretrain", "MLM-pretrain crammed BERT (FFF or dense twin) on the offline corpus, "
                                          "resumable"),
    "train-lm": ("fffjax.train.lm", "train the causal decoder (FFF or a baseline) on the offline corpus, resumable"),
    "finetune": ("fffjax.train.finetune", "fine-tune a crammed-BERT classifier on amazon reviews or spam"),
    "export": ("fffjax.convert.cmd_export", "write a checkpoint's model in the published UltraFastBERT HF layout"),
    "import": ("fffjax.convert.cmd_import", "read a published-layout UltraFastBERT directory into a checkpoint"),
    "inspect": ("fffjax.convert.cmd_inspect", "show a checkpoint's config, parameter counts, step and metrics"),
    "fill-mask": ("fffjax.cmd_fill_mask", "the most likely tokens at each mask token of a text"),
    "embed": ("fffjax.cmd_embed", "mean-pooled sentence embeddings of a text file into a .npy file"),
    "distill": ("fffjax.cmd_distill", "convert a BERT sentence encoder's feedforward layers into FFF trees, "
                                      "distil and measure"),
    "predict": ("fffjax.cmd_predict", "the labels a fine-tuned classifier gives the texts of a file"),
    "generate": ("fffjax.cmd_generate", "continue a prompt with a causal LM checkpoint, streaming the tokens"),
    "bench": ("fffjax.bench_cli", "list the benchmark scripts of experiments/, or run one: fffjax bench NAME [ARGS]"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only ``selected``'s module is imported for its options."""
    parser = argparse.ArgumentParser(
        prog="fffjax", description="Fast feedforward networks (FFF-v1, UltraFastBERT's FFF-v2) in JAX.")
    parser.add_argument("--version", action="version", version=f"fffjax {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (a missing path, a bad value) instead of one line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def _selected_command(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if arg in SUBCOMMANDS), None)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (:data:`USER_ERRORS`, or a damaged checkpoint), not a bug."""
    if isinstance(error, USER_ERRORS):
        return True
    # Imported here: a command that reads no checkpoint does not load orbax.
    from fffjax.train.checkpoint import CheckpointCorruptError

    return isinstance(error, CheckpointCorruptError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fffjax`` script; returns the exit status (2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_selected_command(argv)).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if args.debug or not is_user_error(error):
            raise
        print(f"fffjax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
