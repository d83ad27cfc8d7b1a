"""``riemod <subcommand>``: demo, certify, laws, sample.

Each subcommand lives in its own module ``riemod.cli.<name>`` with ``add_parser(subparsers)``
(which sets ``func``) so this file only dispatches. Help texts are written as reST in docstrings;
:func:`plain_text` turns them into plain text for the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap

SUBCOMMANDS = ("demo", "certify", "laws", "sample")

_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")  # :class:`Geometry` -> Geometry
_LITERAL = re.compile(r"``([^`]*)``")      # ``riemod demo`` -> riemod demo


def plain_text(text: str | None) -> str | None:
  """``text`` without reST markup (roles and double-backtick literals), for terminal help.

  Example:
    >>> plain_text("``riemod sample blr``: see :func:`riemod.sampling.sample`.")
    'riemod sample blr: see riemod.sampling.sample.'
  """
  if not isinstance(text, str):
    return text
  return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _make_plain(parser: argparse.ArgumentParser) -> None:
  """Strips reST markup from every help string of ``parser`` and of its subcommands' parsers."""
  parser.description = plain_text(parser.description)
  parser.epilog = plain_text(parser.epilog)
  for action in parser._actions:  # pylint: disable=protected-access - argparse keeps no public list
    action.help = plain_text(action.help)
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      for choice in action._choices_actions:  # pylint: disable=protected-access - per-command help
        choice.help = plain_text(choice.help)
      for subparser in action.choices.values():
        _make_plain(subparser)


def _version() -> str:
  """The installed distribution's version (cheap: no jax import), else the package's own."""
  from importlib import metadata

  try:
    return metadata.version("riemod")
  except metadata.PackageNotFoundError:
    from riemod import __version__

    return __version__


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Defaults after every option's help; the epilog's lines (one per subcommand) kept as written."""


def _format_default(value) -> str:
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return str(value)


def _defaults_epilog(subparsers: argparse._SubParsersAction) -> str:  # pylint: disable=protected-access
  """One wrapped paragraph per subcommand listing its options' defaults (flags and unset ones left out)."""
  lines = ["defaults of the subcommands ('riemod <subcommand> --help' explains each option):"]
  for name, subparser in subparsers.choices.items():
    items = [f"{action.option_strings[-1]} {_format_default(action.default)}"
             for action in subparser._actions  # pylint: disable=protected-access
             if action.option_strings and action.default is not None
             and action.default is not argparse.SUPPRESS and not isinstance(action.default, bool)]
    lines += textwrap.wrap(f"{name}: " + (", ".join(items) or "no options with defaults"),
                           width=96, initial_indent="  ", subsequent_indent="      ",
                           break_on_hyphens=False, break_long_words=False)  # keep paths whole
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  """The ``riemod`` parser: ``--version`` and one subcommand per module of ``SUBCOMMANDS``."""
  parser = argparse.ArgumentParser(
      prog="riemod", description=__doc__.splitlines()[0],
      formatter_class=_HelpFormatter)
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="subcommand",
                                     help=", ".join(SUBCOMMANDS))
  for name in SUBCOMMANDS:
    try:
      module = importlib.import_module(f"riemod.cli.{name}")
    except ModuleNotFoundError as error:
      if error.name != f"riemod.cli.{name}":
        raise
      continue
    module.add_parser(subparsers)
  parser.epilog = _defaults_epilog(subparsers)
  _make_plain(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
