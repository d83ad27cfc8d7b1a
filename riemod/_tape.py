"""The recording tape behind ``value_grad_and_curvature``.

While a tape is active, every recognised layer (dense or conv structure) records the input it saw
and adds a zero "tap" to its output. Differentiating the network output with respect to the taps
gives the cotangent at every layer output in one backward pass; with the recorded inputs this is all
the Gram-Hadamard kernel needs, so the rows of ``K_a`` are never formed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Hashable

import jax

_ACTIVE: contextvars.ContextVar["Tape | None"] = contextvars.ContextVar("riemod_tape", default=None)


@dataclasses.dataclass
class Tape:
  """Per forward pass: which objects are tapped, and what they recorded.

  ``owners`` maps ``id(layer object)`` to the layer's key. In "shape" mode the tape records output
  shapes only; in "record" mode it adds ``taps[key][call]`` to each output.
  """

  owners: dict[int, Hashable]
  taps: dict[Hashable, list[jax.Array]] | None = None
  inputs: dict[Hashable, list[Any]] = dataclasses.field(default_factory=dict)
  output_shapes: dict[Hashable, list[jax.ShapeDtypeStruct]] = dataclasses.field(default_factory=dict)
  structures: dict[Hashable, Any] = dataclasses.field(default_factory=dict)

  def key_of(self, obj: Any) -> Hashable | None:
    return self.owners.get(id(obj))


@contextlib.contextmanager
def recording(tape: Tape):
  token = _ACTIVE.set(tape)
  try:
    yield tape
  finally:
    _ACTIVE.reset(token)


def active_tape() -> Tape | None:
  return _ACTIVE.get()


def tapped_call(layer: Any, key: Hashable | None, x: Any, forward: Callable[[Any], jax.Array]):
  """Runs ``forward(x)``; under an active tape records ``x`` and adds the layer's tap."""
  tape = _ACTIVE.get()
  if tape is None:
    return forward(x)
  if key is None:
    key = tape.key_of(layer)
  if key is None or (tape.taps is not None and key not in tape.taps):
    return forward(x)
  y = forward(x)
  calls = tape.inputs.setdefault(key, [])
  index = len(calls)
  calls.append(x)
  if tape.taps is None:
    tape.output_shapes.setdefault(key, []).append(jax.ShapeDtypeStruct(y.shape, y.dtype))
    return y
  return y + tape.taps[key][index]
