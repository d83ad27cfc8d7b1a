"""``riemod laws`` command line."""

import argparse
import json

import pytest

from riemod.cli import laws


def test_laws_json_output(capsys):
  assert laws.main(["--arch", "relu", "--dims", "2,2,1", "--bias", "--json", "--points", "2"]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["count"] == 2 and payload["parameters"] == 9 and payload["lie_dimension"] == 7


def test_laws_text_output_with_degree(capsys):
  assert laws.main(["--arch", "linear", "--dims", "2,2,1", "--degree", "2", "--points", "2"]) == 0
  out = capsys.readouterr().out
  # U V^T with n=2, m=1, r=2: r(r+1)/2 = 3 laws, the entries of W1^T W1 - W2 W2^T.
  assert "laws = 3" in out and "polynomial laws of degree <= 2: 3" in out


def test_laws_registers_on_subparsers_and_rejects_bad_input(capsys):
  parser = argparse.ArgumentParser()
  laws.add_parser(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["laws", "--arch", "linear", "--dims", "2,2"])
  assert args.func is laws.run
  with pytest.raises(SystemExit):
    parser.parse_args(["laws", "--arch", "linear", "--dims", "2"])
  assert laws.main(["--arch", "linear", "--dims", "2,2", "--bias"]) == 2
  assert "--bias" in capsys.readouterr().err
