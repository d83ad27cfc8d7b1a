"""The main job: ``riemod demo`` trains both optimizers, writes its results and plot."""

from __future__ import annotations

import json
import math

import pytest

from riemod.cli.main import main


def _run(tmp_path, capsys, *extra):
  assert main(["demo", "--steps", "20", "--out", str(tmp_path), *extra]) == 0
  printed = capsys.readouterr().out
  results = json.loads((tmp_path / "results.json").read_text())
  return printed, results


def test_demo_trains_both_and_saves_results(tmp_path, capsys):
  printed, results = _run(tmp_path, capsys, "--no-certificate")
  rows = {r["optimizer"]: r for r in results["results"]}
  assert set(rows) == {"riemod", "adam"}
  for row in rows.values():
    assert math.isfinite(row["final_train_loss"]) and 0 <= row["test_accuracy"] <= 1
  curve = results["curves"]["riemod"]
  assert curve[-1][2] < 0.5 * curve[0][2]  # riemod's full training loss fell
  assert (tmp_path / "loss_vs_time.png").stat().st_size > 10_000
  assert "riemod" in printed and "median step ms" in printed


@pytest.mark.slow
def test_demo_prints_the_certificate(tmp_path, capsys):
  printed, _ = _run(tmp_path, capsys)
  assert "Certificate of the trained model" in printed and "contraction factor" in printed
