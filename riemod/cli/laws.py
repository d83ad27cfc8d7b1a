"""``riemod laws``: count and find the conservation laws of a linear or ReLU network.

Example:
  riemod laws --arch relu --dims 3,4,2 --bias --degree 2
  riemod laws --arch linear --dims 2,3,2 --flow momentum --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _dims(text: str) -> tuple[int, ...]:
  try:
    dims = tuple(int(part) for part in text.split(","))
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"--dims '{text}' must be comma-separated integers, e.g. 3,4,2") from err
  if len(dims) < 2 or any(d < 1 for d in dims):
    raise argparse.ArgumentTypeError(f"--dims '{text}' needs at least two positive widths (input first)")
  return dims


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers the ``laws`` subcommand on an argparse subparsers object."""
  parser = subparsers.add_parser(
      "laws", help="count and find conservation laws of a network's training flow",
      description="Count the independent conservation laws D - dim Lie(W_phi) of gradient or momentum "
                  "flows (Marcotte, Gribonval & Peyre 2023/2024) and list the polynomial laws up to a "
                  "degree.")
  _configure(parser)
  parser.set_defaults(func=run)
  return parser


def _configure(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--arch", choices=("linear", "relu"), required=True, help="network family")
  parser.add_argument("--dims", type=_dims, required=True, help="layer widths from input to output, e.g. 3,4,2")
  parser.add_argument("--bias", action="store_true", help="ReLU network with biases")
  parser.add_argument("--flow", choices=("gradient", "momentum"), default="gradient")
  parser.add_argument("--tau", type=float, default=1.0, help="momentum time constant")
  parser.add_argument("--degree", type=int, default=0,
                      help="also find polynomial laws up to this degree (>= 1; 0 = count only)")
  parser.add_argument("--points", type=int, default=3, help="random points that must agree")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
  """Runs ``riemod laws``; returns the exit status."""
  # Imported here so that building the CLI parser stays cheap.
  from riemod import conservation  # pylint: disable=g-import-not-at-top

  if args.bias and args.arch != "relu":
    print("error: --bias applies to --arch relu only (a linear network with biases is affine; use relu)",
          file=sys.stderr)
    return 2
  if args.degree < 0:
    print(f"error: --degree {args.degree} must be >= 1 (or 0 to skip finding)", file=sys.stderr)
    return 2
  rep = (conservation.linear_network(args.dims) if args.arch == "linear"
         else conservation.relu_network(args.dims, bias=args.bias))
  started = time.perf_counter()
  counted = conservation.count_laws(rep, flow=args.flow, tau=args.tau, num_points=args.points, seed=args.seed)
  count_seconds = time.perf_counter() - started
  found, find_seconds = None, 0.0
  if args.degree >= 1:
    started = time.perf_counter()
    found = conservation.find_polynomial_laws(rep, degree=args.degree, flow=args.flow, tau=args.tau,
                                              seed=args.seed)
    find_seconds = time.perf_counter() - started
  if args.json:
    payload = counted.as_dict()
    payload.update(arch=args.arch, dims=list(args.dims), bias=args.bias, flow=args.flow,
                   count_seconds=count_seconds)
    if found is not None:
      payload.update(degree=args.degree, laws=[str(law) for law in found.laws],
                     independent_polynomial_laws=found.num_independent, find_seconds=find_seconds)
    print(json.dumps(payload))
    return 0
  print(f"{counted.description}")
  print(f"parameters D = {counted.dimension}, dim Lie(W) = {counted.lie_dimension}, "
        f"laws = {counted.count}{'  (ambiguous rank!)' if counted.ambiguous else ''}")
  print(f"rank per bracket round: {counted.rank_history[0]}  ({len(counted.points)} points agree: "
        f"{len({h[-1] for h in counted.rank_history}) == 1})")
  print(f"counting time: {count_seconds:.2f} s")
  if found is not None:
    print(f"polynomial laws of degree <= {args.degree}: {len(found)} "
          f"({found.num_independent} functionally independent), {find_seconds:.2f} s")
    for law in found.laws:
      print(f"  {law}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="riemod laws")
  _configure(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
