"""``riemod <subcommand>``: demo, certify, laws, sample.

Each subcommand lives in its own module ``riemod.cli.<name>`` with ``add_parser(subparsers)``
(which sets ``func``) so this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "certify", "laws", "sample")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="riemod", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name in SUBCOMMANDS:
    try:
      module = importlib.import_module(f"riemod.cli.{name}")
    except ModuleNotFoundError as error:
      if error.name != f"riemod.cli.{name}":
        raise
      continue
    module.add_parser(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
