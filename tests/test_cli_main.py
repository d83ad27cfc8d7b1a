"""The top-level CLI: --version, defaults in --help, help texts free of reST markup."""

from __future__ import annotations

import argparse
import doctest
import re
from importlib import metadata

import pytest

import riemod
from riemod.cli import main as cli_main


def _subparsers(parser):
  return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli_main.main(["--version"])
  assert exit_info.value.code == 0
  printed = capsys.readouterr().out.strip()
  assert printed == f"riemod {metadata.version('riemod')}"
  assert printed == f"riemod {riemod.__version__}"  # the package and its metadata agree


def test_top_level_help_lists_every_subcommand_default():
  parser = cli_main.build_parser()
  text = parser.format_help()
  subparsers = _subparsers(parser)
  assert set(subparsers.choices) == set(cli_main.SUBCOMMANDS)
  for name, sub in subparsers.choices.items():
    # The epilog's paragraph of this subcommand, lines joined back.
    paragraph = re.search(rf"^  {name}: (.*(?:\n      .*)*)", text, flags=re.M)
    assert paragraph, f"no defaults line for {name} in:\n{text}"
    listed = " ".join(paragraph.group(1).split())
    for action in sub._actions:
      if (action.option_strings and action.default is not None
          and action.default is not argparse.SUPPRESS and not isinstance(action.default, bool)):
        expected = f"{action.option_strings[-1]} {cli_main._format_default(action.default)}"
        assert expected in listed, (name, expected, listed)


@pytest.mark.parametrize("markup", ["``", ":class:`", ":func:`"])
def test_help_is_plain_text(markup):
  parser = cli_main.build_parser()
  texts = {"riemod": parser.format_help()}
  texts |= {name: sub.format_help() for name, sub in _subparsers(parser).choices.items()}
  for name, text in texts.items():
    assert markup not in text, f"reST markup {markup!r} in the help of {name}:\n{text}"


def test_plain_text_doctest():
  outcome = doctest.testmod(cli_main)
  assert outcome.attempted >= 1 and outcome.failed == 0
