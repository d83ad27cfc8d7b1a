"""``riemod laws``: count and find the conservation laws of a linear or ReLU network, or sweep many.

Example:
  riemod laws --arch relu --dims 3,4,2 --bias --degree 2
  riemod laws --arch linear --dims 1,7,2 --flow momentum --json
  riemod laws sweep --arch linear --nets 50          # table and plot under --out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

DEFAULT_OUT = os.path.join("riemod-output", "laws")
FLOWS = ("gradient", "momentum", "mirror")


def _dims(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(part) for part in text.split(","))
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"--dims '{text}' must be comma-separated integers, e.g. 3,4,2") from err
  if len(dims) < 2 or any(d < 1 for d in dims):
    raise argparse.ArgumentTypeError(f"--dims '{text}' needs at least two positive widths (input first)")
  return dims


def _choices(allowed):
  def parse(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if not values or bad:
      raise argparse.ArgumentTypeError(f"'{text}': pick from {', '.join(allowed)} (comma-separated)")
    return values
  return parse


def closed_form(arch: str, dims, bias: bool, flow: str):
  """The number of laws the papers' formulas predict, or ``None`` where riemod knows none.

  * gradient flow, ReLU (with or without biases): one law per hidden neuron (Marcotte, Gribonval &
    Peyre 2023);
  * gradient flow, linear: ``d_l (d_l + 1) / 2`` per hidden layer (the balancedness matrices), when
    every hidden width satisfies ``d_l <= d_{l-1} + d_{l+1}`` (otherwise those entries are dependent);
  * momentum, linear: the decaying charges ``exp(t / tau)(W^T W' - W'^T W)`` (Marcotte, Gribonval &
    Peyre 2024), ``d_l (d_l - 1) / 2`` per hidden layer when ``d_l <= k = 2 (d_{l-1} + d_{l+1})``; a wider
    layer loses the rotations that fix all ``k`` weight and velocity vectors, ``m (m - 1) / 2`` with
    ``m = d_l - k`` (measured: 2-12-2 has 60 laws, not 66; 2-40-3 has 345). ReLU: none;
  * mirror (NMF) flow: one law per hidden neuron (the rescaling balances ``sum in - sum out``).

  A linear network with one input and one output computes a scalar product of its weights, whose single
  field leaves ``D - 1`` laws under gradient and mirror flows: no formula above applies, so ``None``. Under
  momentum the charges above are all the laws of the deep ones (1-2-2-1: 2, 1-3-3-1: 6, 1-3-3-3-1: 9, as
  counted), but a two-layer ``1-d-1`` has more (``4 d - 6``), so ``None`` there.

  Example:
    >>> closed_form("linear", (8, 10, 8), False, "gradient"), closed_form("relu", (3, 4, 2), True, "momentum")
    (55, 0)
  """
  hidden = list(dims[1:-1])
  if arch == "linear" and flow == "momentum" and not (len(dims) == 3 and dims[0] * dims[-1] == 1):
    # Rotations of hidden layer l that fix its k weight and velocity vectors leave no charge.
    fixed = [max(d - 2 * (a + b), 0) for a, d, b in zip(dims[:-2], hidden, dims[2:])]
    return sum(d * (d - 1) // 2 - m * (m - 1) // 2 for d, m in zip(hidden, fixed))
  if arch == "linear" and dims[0] * dims[-1] == 1:
    return None
  if flow == "mirror":
    return sum(hidden)
  if arch == "relu":
    return sum(hidden) if flow == "gradient" else 0
  if flow == "gradient":
    if all(d <= a + b for a, d, b in zip(dims[:-2], hidden, dims[2:])):
      return sum(d * (d + 1) // 2 for d in hidden)
    return None
  return None


def representation(arch: str, dims, bias: bool, flow: str):
  """The ``Reparametrization`` counted (positive points for the mirror flow)."""
  from riemod import conservation  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  rep = conservation.linear_network(dims) if arch == "linear" else conservation.relu_network(dims, bias=bias)
  return dataclasses.replace(rep, positive=True) if flow == "mirror" else rep


def count_one(arch: str, dims, bias: bool = False, flow: str = "gradient", *, tau: float = 1.0,
              points: int = 3, seed: int = 0) -> dict:
  """Counts one architecture; a JSON-ready row with the closed form and the wall time."""
  from riemod import conservation  # pylint: disable=g-import-not-at-top
  rep = representation(arch, dims, bias, flow)
  started = time.perf_counter()
  counted = conservation.count_laws(rep, flow=flow, tau=tau, num_points=points, seed=seed)
  seconds = time.perf_counter() - started
  expected = closed_form(arch, dims, bias, flow)
  row = counted.as_dict()
  row.update(arch=arch, dims=list(dims), bias=bool(bias), flow=flow, count_seconds=seconds,
             closed_form=expected, agrees=None if expected is None else counted.count == expected)
  return row


def _configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("action", nargs="?", choices=("count", "sweep"), default="count",
                      help="count: one network (default); sweep: many random networks against the "
                           "closed forms, with a table and a plot")
  parser.add_argument("--arch", default=None,
                      help="count: linear or relu; sweep: comma-separated (default for sweep: linear,relu)")
  parser.add_argument("--dims", type=_dims, help="layer widths from input to output, e.g. 3,4,2 (count)")
  parser.add_argument("--bias", action="store_true", help="ReLU network with biases")
  parser.add_argument("--flow", default=None,
                      help="gradient (default), momentum or mirror (NMF: theta' = -theta * grad E); sweep: "
                           "comma-separated")
  parser.add_argument("--tau", type=float, default=1.0, help="momentum time constant")
  parser.add_argument("--degree", type=int, default=0,
                      help="also find polynomial laws up to this degree (>= 1; 0 = count only)")
  parser.add_argument("--points", type=int, default=3, help="random points that must agree")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--nets", type=int, default=50, help="sweep: random networks per architecture family")
  parser.add_argument("--max-params", type=int, default=200, help="sweep: at most this many parameters")
  parser.add_argument("--layers", default="2,3,4", help="sweep: numbers of weight layers to draw from")
  parser.add_argument("--max-width", type=int, default=8, help="sweep: widths drawn from 1..this")
  parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
  parser.add_argument("--no-progress", action="store_true", help="sweep: hide the progress bar")
  parser.add_argument("--timeout", type=float, default=30.0,
                      help="sweep: seconds per network before its count is stopped and reported as failed (0: "
                           "no limit)")
  parser.add_argument("--max-memory", type=float, default=8.0,
                      help="GB of resident memory at which a count is stopped (a sweep reports the network "
                           "as failed; 0: no limit)")


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers the ``laws`` subcommand on an argparse subparsers object."""
  parser = subparsers.add_parser(
      "laws", help="count and find conservation laws of a network's training flow",
      description="Count the independent conservation laws D - dim Lie(W_phi) of gradient, mirror or "
                  "momentum flows (Marcotte, Gribonval & Peyre 2023/2024) and list the polynomial laws up "
                  "to a degree; 'riemod laws sweep' counts many random networks against the closed forms.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _configure(parser)
  parser.set_defaults(func=run)
  return parser


def random_architectures(count: int, arch: str, *, layers=(2, 3, 4), max_width: int = 8,
                         max_params: int = 200, seed: int = 0) -> list:
  """``count`` distinct random ``(arch, dims, bias)`` with at most ``max_params`` parameters.

  Example:
    >>> len(random_architectures(5, "relu", max_params=60))
    5
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  chosen, seen = [], set()
  for _ in range(200 * count):
    if len(chosen) == count:
      break
    depth = int(rng.choice(layers))
    dims = tuple(int(w) for w in rng.integers(1, max_width + 1, size=depth + 1))
    bias = arch == "relu" and bool(rng.integers(0, 2))
    size = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + (sum(dims[1:]) if bias else 0)
    if size > max_params or (dims, bias) in seen:
      continue
    seen.add((dims, bias))
    chosen.append((arch, dims, bias))
  if len(chosen) < count:
    raise ValueError(f"only {len(chosen)} distinct {arch} networks fit --max-params {max_params}; lower --nets "
                     "or raise --max-params/--max-width.")
  return chosen


def _sweep_table(rows) -> str:
  lines = ["| arch | dims | bias | flow | D | laws | closed form | agrees | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    dims = "-".join(map(str, r["dims"]))
    expected = "-" if r["closed_form"] is None else r["closed_form"]
    agrees = "-" if r["agrees"] is None else ("yes" if r["agrees"] else "**no**")
    count = r["count"] if r["count"] is not None else f"**{r.get('error', 'failed')}**"
    lines.append(f"| {r['arch']} | {dims} | {'yes' if r['bias'] else 'no'} | {r['flow']} | {r['parameters']} | "
                 f"{count} | {expected} | {agrees} | {r['count_seconds']:.2f} |")
  return "\n".join(lines)


def _sweep_plot(rows, path: str) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  markers = {"linear": "o", "relu": "s"}
  for arch in sorted({r["arch"] for r in rows}):
    for flow in sorted({r["flow"] for r in rows}):
      pts = [r for r in rows if r["arch"] == arch and r["flow"] == flow and r["closed_form"] is not None
             and r["count"] is not None]
      if pts:
        axes[0].scatter([r["closed_form"] for r in pts], [r["count"] for r in pts], marker=markers[arch],
                        label=f"{arch}, {flow}", alpha=0.7)
      pts = [r for r in rows if r["arch"] == arch and r["flow"] == flow]
      if pts:
        axes[1].scatter([r["parameters"] for r in pts], [r["count_seconds"] for r in pts],
                        marker=markers[arch], label=f"{arch}, {flow}", alpha=0.7)
  top = max([r["count"] for r in rows if r["count"] is not None] + [1])
  axes[0].plot([0, top], [0, top], "k:", lw=1)
  axes[0].set(xlabel="closed form", ylabel="counted (D - dim Lie)", title="law counts")
  axes[1].set(xlabel="parameters D", ylabel="seconds", yscale="log", title="time per network")
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def run_sweep(args) -> int:
  """``riemod laws sweep``: random architectures, counts against the closed forms, table and plot."""
  archs = _choices(("linear", "relu"))(args.arch or "linear,relu")
  flows = _choices(FLOWS)(args.flow or "gradient")
  layers = tuple(int(v) for v in args.layers.split(","))
  nets = [net for arch in archs for net in random_architectures(
      args.nets, arch, layers=layers, max_width=args.max_width, max_params=args.max_params, seed=args.seed)]
  jobs = [(arch, dims, bias, flow) for arch, dims, bias in nets for flow in flows]
  bar = None
  if not args.no_progress:
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=len(jobs), desc="counting", unit="net")
    except ImportError:
      pass
  rows, started, cpu_started = [], time.perf_counter(), time.process_time()
  try:
    for arch, dims, bias, flow in jobs:
      rows.append(_count_or_failure(arch, dims, bias, flow, args))
      if bar is not None:
        bar.set_postfix_str(f"{arch} {'-'.join(map(str, dims))} {flow}")
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  total = time.perf_counter() - started
  cpu_total = time.process_time() - cpu_started
  os.makedirs(args.out, exist_ok=True)
  checked = [r for r in rows if r["agrees"] is not None]
  summary = {"networks": len(rows), "with_closed_form": len(checked),
             "failed": sum(r["count"] is None for r in rows), "timeout": args.timeout,
             "agree": sum(bool(r["agrees"]) for r in checked), "seconds": total, "cpu_seconds": cpu_total,
             "ambiguous": sum(bool(r["ambiguous"]) for r in rows)}
  with open(os.path.join(args.out, "sweep.json"), "w") as handle:
    json.dump({"summary": summary, "rows": [{k: v for k, v in r.items() if k != "points"} for r in rows]},
              handle, indent=1, default=float)
  table = _sweep_table(rows)
  with open(os.path.join(args.out, "sweep.md"), "w") as handle:
    handle.write(table + "\n")
  plotted = _sweep_plot(rows, os.path.join(args.out, "sweep.png"))
  if args.json:
    print(json.dumps({"summary": summary}))
  else:
    print(table)
    print(f"{summary['agree']} of {summary['with_closed_form']} counts agree with the closed form "
          f"({summary['networks']} counts, {summary['ambiguous']} ambiguous, {summary['failed']} failed) in "
          f"{total:.1f} s")
    print(f"wrote {os.path.join(args.out, 'sweep.md')}, sweep.json" + (", sweep.png" if plotted else ""))
  return 0 if summary["agree"] == summary["with_closed_form"] and not summary["failed"] else 1


class _CountTimeout(BaseException):
  """Raised when a count passes ``--timeout`` or ``--max-memory`` (the message says which). A
  BaseException, like KeyboardInterrupt, so that library code's ``except Exception`` handlers let
  it through."""


def _resident_bytes() -> int:
  """This process's resident memory now (0 where ``/proc`` is not available)."""
  try:
    with open("/proc/self/statm") as handle:
      return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


@contextlib.contextmanager
def _limits(timeout: float | None, max_memory_gb: float | None):
  """Stops the enclosed count with :class:`_CountTimeout` past ``timeout`` seconds or
  ``max_memory_gb`` GiB of resident memory (``None`` or 0: no limit), checked by a repeating alarm.

  Repeating: an alarm that lands where Python ignores exceptions (a garbage-collection callback
  such as JAX's _xla_gc_callback: seen in a test run) is raised again shortly after; and the
  memory check must run while the count grows (a deep linear network's gradient-flow count with a
  narrow bottleneck, 8-2-7-8-1, grows until the system kills the process instead of answering).
  """
  import signal  # pylint: disable=g-import-not-at-top
  timed = bool(timeout and timeout > 0)
  sized = bool(max_memory_gb and max_memory_gb > 0)
  if not hasattr(signal, "SIGALRM") or not (timed or sized):
    yield
    return
  started = time.perf_counter()

  def check(*_):
    if timed and time.perf_counter() - started >= timeout:
      raise _CountTimeout(f"stopped after {timeout:g} s")
    if sized and _resident_bytes() > max_memory_gb * 2**30:
      raise _CountTimeout(f"stopped at {max_memory_gb:g} GB of memory")

  interval = min(max(timeout, 0.01), 1.0) if timed else 1.0
  interval = min(interval, 0.25) if sized else interval
  previous = signal.signal(signal.SIGALRM, check)
  signal.setitimer(signal.ITIMER_REAL, min(timeout, interval) if timed else interval, interval)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _count_or_failure(arch, dims, bias, flow, args) -> dict:
  """``count_one``, or a row with ``count=None`` and the reason when it fails or passes ``--timeout``
  or ``--max-memory``."""
  started = time.perf_counter()
  try:
    with _limits(args.timeout, getattr(args, "max_memory", None)):
      row = count_one(arch, dims, bias, flow, tau=args.tau, points=args.points, seed=args.seed)
    # The alarm can be lost (raised inside a callback whose exceptions Python ignores, seen twice in CI,
    # and a repeat can come after a short count ends), so the limit is also checked on the clock: a
    # count that overran it is a failed row whether or not the alarm interrupted it.
    if args.timeout and args.timeout > 0 and time.perf_counter() - started > args.timeout:
      raise _CountTimeout(f"stopped after {args.timeout:g} s")
    return row
  except (ValueError, MemoryError, _CountTimeout) as err:
    reason = str(err) if isinstance(err, _CountTimeout) else type(err).__name__
    size = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + (sum(dims[1:]) if bias else 0)
    return dict(arch=arch, dims=list(dims), bias=bool(bias), flow=flow, parameters=size, count=None,
                closed_form=closed_form(arch, dims, bias, flow), agrees=None, ambiguous=False, error=reason,
                count_seconds=time.perf_counter() - started)


def run(args) -> int:
  """Runs ``riemod laws``; returns the exit status."""
  if args.action == "sweep":
    return run_sweep(args)
  # Imported here so that building the CLI parser stays cheap.
  from riemod import conservation  # pylint: disable=g-import-not-at-top

  flow = args.flow or "gradient"
  if args.arch not in ("linear", "relu") or args.dims is None:
    print("error: counting needs --arch linear|relu and --dims (e.g. --arch relu --dims 3,4,2)", file=sys.stderr)
    return 2
  if flow not in FLOWS:
    print(f"error: --flow {flow} is unknown; use one of {', '.join(FLOWS)}", file=sys.stderr)
    return 2
  if args.bias and args.arch != "relu":
    print("error: --bias applies to --arch relu only (a linear network with biases is affine; use relu)",
          file=sys.stderr)
    return 2
  if args.degree < 0:
    print(f"error: --degree {args.degree} must be >= 1 (or 0 to skip finding)", file=sys.stderr)
    return 2
  try:
    with _limits(None, args.max_memory):
      payload = count_one(args.arch, args.dims, args.bias, flow, tau=args.tau, points=args.points,
                          seed=args.seed)
  except _CountTimeout as err:
    print(f"error: the count of {args.arch} {'-'.join(map(str, args.dims))} ({flow} flow) {err}: "
          "its bracket terms outgrew the limit; raise --max-memory (0: no limit) or count a "
          "smaller network", file=sys.stderr)
    return 1
  found, find_seconds = None, 0.0
  if args.degree >= 1:
    started = time.perf_counter()
    rep = representation(args.arch, args.dims, args.bias, flow)
    found = conservation.find_polynomial_laws(
        rep, degree=args.degree, flow="gradient" if flow == "mirror" else flow,
        metric="entropic" if flow == "mirror" else None, tau=args.tau, seed=args.seed)
    find_seconds = time.perf_counter() - started
    payload.update(degree=args.degree, laws=[str(law) for law in found.laws],
                   independent_polynomial_laws=found.num_independent, find_seconds=find_seconds)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "count.json"), "w") as handle:
    json.dump(payload, handle, indent=1, default=float)
  if args.json:
    print(json.dumps(payload, default=float))
    return 0
  print(f"{payload['description']}")
  print(f"parameters D = {payload['parameters']}, dim Lie(W) = {payload['lie_dimension']}, "
        f"laws = {payload['count']}{'  (ambiguous rank!)' if payload['ambiguous'] else ''}"
        + ("" if payload["closed_form"] is None else f"  (closed form: {payload['closed_form']})"))
  print(f"rank per {'pushforward' if payload.get('method') == 'orbit' else 'bracket'} round "
        f"({payload.get('method')}): {payload['rank_history'][0]}  ({args.points} points agree: "
        f"{len({h[-1] for h in payload['rank_history']}) == 1})")
  print(f"rank gap: smallest kept singular value {min(payload['smallest_kept']):.1e}, largest dropped "
        f"{max(payload['largest_dropped']):.1e}")
  print(f"counting time: {payload['count_seconds']:.2f} s")
  if found is not None:
    print(f"polynomial laws of degree <= {args.degree}: {len(found)} "
          f"({found.num_independent} functionally independent), {find_seconds:.2f} s")
    for law in found.laws:
      print(f"  {law}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="riemod laws", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _configure(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
