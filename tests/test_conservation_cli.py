"""``riemod laws`` command line."""

import argparse
import json
import time

import pytest

from riemod.cli import laws


def test_laws_json_output(capsys, tmp_path):
  assert laws.main(["--arch", "relu", "--dims", "2,2,1", "--bias", "--json", "--points", "2",
                    "--out", str(tmp_path)]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["count"] == 2 and payload["parameters"] == 9 and payload["lie_dimension"] == 7
  assert payload["closed_form"] == 2 and payload["agrees"]
  assert json.loads((tmp_path / "count.json").read_text())["count"] == 2


def test_laws_text_output_with_degree(capsys, tmp_path):
  assert laws.main(["--arch", "linear", "--dims", "2,2,1", "--degree", "2", "--points", "2",
                    "--out", str(tmp_path)]) == 0
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
  assert laws.main(["--dims", "2,2"]) == 2
  assert "--arch" in capsys.readouterr().err


def test_momentum_count_of_an_overparameterised_linear_net_is_fast_and_matches_the_charges(capsys, tmp_path):
  # 1-7-2 under momentum (43-dimensional phase space): the r (r - 1) / 2 = 21 decaying charges. The
  # nested-derivative counter needed ~8 minutes here; exact polynomial brackets take about a second.
  assert laws.main(["--arch", "linear", "--dims", "1,7,2", "--flow", "momentum", "--json", "--points", "2",
                    "--out", str(tmp_path)]) == 0
  payload = json.loads(capsys.readouterr().out)
  assert payload["count"] == 21 and payload["closed_form"] == 21 and payload["dimension"] == 43


def test_sweep_writes_table_plot_and_agrees_with_the_closed_forms(capsys, tmp_path):
  status = laws.main(["sweep", "--nets", "3", "--max-params", "40", "--flow", "gradient,mirror", "--points", "1",
                      "--no-progress", "--out", str(tmp_path), "--json"])
  summary = json.loads(capsys.readouterr().out)["summary"]
  assert status == 0 and summary["networks"] == 12
  assert summary["agree"] == summary["with_closed_form"] >= 10
  assert (tmp_path / "sweep.md").exists() and (tmp_path / "sweep.png").exists()
  rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
  assert {r["flow"] for r in rows} == {"gradient", "mirror"}


def test_sweep_reports_counts_it_had_to_stop_and_exits_nonzero(capsys, tmp_path):
  # A too-large count (here: any count, with a 1 ms limit) is a failed row, not a crashed sweep.
  status = laws.main(["sweep", "--arch", "linear", "--nets", "2", "--max-params", "40", "--points", "1",
                      "--timeout", "0.001", "--no-progress", "--out", str(tmp_path), "--json"])
  summary = json.loads(capsys.readouterr().out)["summary"]
  assert status == 1 and summary["failed"] == 2 and summary["networks"] == 2
  rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
  assert all(r["count"] is None and r["error"].startswith("stopped after") for r in rows)
  assert "**stopped after" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("dims", [(2, 12, 2), (1, 6, 2, 1), (1, 3, 3, 1)])
def test_momentum_closed_form_counts_the_rotations_that_move_the_weights(dims):
  # 2-12-2: so(12) has 66 charges, but the 4 rotations of the 12 - 2 (2 + 2) = 4 directions that no weight
  # or velocity vector spans leave nothing; the counter finds 60. A naive d (d - 1) / 2 says 66.
  from riemod.conservation import count_laws, linear_network  # pylint: disable=import-outside-toplevel
  expected = laws.closed_form("linear", dims, False, "momentum")
  assert count_laws(linear_network(dims), flow="momentum", num_points=2).count == expected
  assert laws.closed_form("linear", (2, 40, 3), False, "momentum") == 345  # <= 2 D + 1 = 401
  assert laws.closed_form("linear", (1, 9, 1), False, "momentum") is None


def test_timeout_fires_again_when_its_first_alarm_is_swallowed(monkeypatch):
  # An alarm landing in a garbage-collection callback (JAX's _xla_gc_callback) is ignored by
  # Python; a one-shot alarm then never stops the count. The alarm repeats until it lands.
  def count_that_swallows_the_first_alarm(*args, **kwargs):
    try:
      time.sleep(2)
    except BaseException:  # noqa: BLE001 - what an unraisable-exception context does
      pass
    time.sleep(2)
    return dict(count=1)

  monkeypatch.setattr(laws, "count_one", count_that_swallows_the_first_alarm)
  args = argparse.Namespace(timeout=0.05, tau=None, points=1, seed=0)
  row = laws._count_or_failure("linear", (1, 2, 1), False, "gradient", args)
  assert row["count"] is None and row["error"] == "stopped after 0.05 s"
  assert row["count_seconds"] < 1.0


def test_a_count_that_overran_its_limit_is_a_failed_row_even_if_every_alarm_was_lost(monkeypatch):
  # A short count can end before the repeated alarm; the clock still says it overran (CI saw a
  # 1 ms sweep count one network to the end this way).
  def count_that_swallows_every_alarm(*args, **kwargs):
    deadline = time.perf_counter() + 0.2
    while time.perf_counter() < deadline:
      try:
        time.sleep(0.01)
      except BaseException:  # noqa: BLE001 - what an unraisable-exception context does
        pass
    return dict(count=1)

  monkeypatch.setattr(laws, "count_one", count_that_swallows_every_alarm)
  args = argparse.Namespace(timeout=0.05, tau=None, points=1, seed=0)
  row = laws._count_or_failure("linear", (1, 2, 1), False, "gradient", args)
  assert row["count"] is None and row["error"] == "stopped after 0.05 s"


def _growing_count(chunks: list):
  def count(*args, **kwargs):
    for _ in range(60):                       # up to 600 MB, 10 MB every 10 ms
      chunks.append(bytearray(10 * 2**20))
      time.sleep(0.01)
    return dict(count=1)
  return count


def test_a_count_that_outgrows_max_memory_is_stopped(monkeypatch, capsys, tmp_path):
  # A deep linear network's count can grow until the system kills the process; past
  # --max-memory it is a failed row (sweep) or an error naming the option (single count).
  chunks = []
  monkeypatch.setattr(laws, "count_one", _growing_count(chunks))
  limit = (laws._resident_bytes() + 100 * 2**20) / 2**30
  args = argparse.Namespace(timeout=0, max_memory=limit, tau=None, points=1, seed=0)
  row = laws._count_or_failure("linear", (1, 2, 1), False, "gradient", args)
  assert row["count"] is None and row["error"] == f"stopped at {limit:g} GB of memory"
  assert len(chunks) < 60
  chunks.clear()
  status = laws.main(["--arch", "linear", "--dims", "1,2,1", "--max-memory", f"{limit:.6f}",
                      "--out", str(tmp_path)])
  assert status == 1 and "--max-memory" in capsys.readouterr().err and len(chunks) < 60
