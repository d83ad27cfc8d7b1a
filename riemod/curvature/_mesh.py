"""The curvature of the global batch inside ``jax.shard_map``: mapped axes, checks, gathers,
and the layerwise blocks spread over the devices with their rows sent to their owners.

Inside ``shard_map`` every device sees its shard of the batch. The metric is a mean over the whole
batch, so its factor rows are the rows of every shard stacked, each scaled by ``1 / sqrt(B)`` with
the global ``B``; the loss and gradient are means over shards. Everything here is a no-op when no
axis is named (one device, or ``jax.jit`` with sharded arrays, where XLA inserts the collectives).

JAX types every value inside ``shard_map`` (with ``check_vma=True``, the default) by the mesh axes it
varies over. Differentiating a varying output with respect to an invariant value (a replicated
parameter, or the zero taps riemod adds to layer outputs) sums the cotangent over the devices. That
is what a gradient of replicated parameters needs, but it would sum the factor rows of all devices
into each device's rows. So the taps (and, with ``axis_name``, the parameters) are made varying
first: every cotangent stays per device, and the sums riemod wants are taken explicitly.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import jax.numpy as jnp


def _varying(leaf: Any) -> frozenset:
  """The mapped axes ``leaf`` varies over (empty outside ``shard_map`` or with ``check_vma=False``)."""
  try:
    aval = jax.typeof(leaf)
  except TypeError:
    return frozenset()
  vma = getattr(aval, "vma", None)  # jax < 0.10
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", None)
  return frozenset(vma or ())


def varying_axes(tree: Any) -> frozenset:
  """The union of the mapped axes the leaves of ``tree`` vary over."""
  out = frozenset()
  for leaf in jax.tree.leaves(tree):
    out |= _varying(leaf)
  return out


def checks_vma() -> bool:
  """Whether the enclosing ``shard_map`` types values by the axes they vary over."""
  try:
    from jax._src import config
    return bool(config._check_vma.value)
  except (ImportError, AttributeError):
    return True


def _manual_axes() -> tuple:
  """The mesh axes of an enclosing ``shard_map`` (empty outside one)."""
  try:
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)
  except (AttributeError, TypeError):
    return ()


def _bound_axes() -> tuple:
  try:
    from jax._src import core
    return tuple(core.get_axis_env().axis_sizes)
  except (ImportError, AttributeError):
    return _manual_axes()


def resolve(axis_name: Hashable | tuple | None, x: Any, params: Any) -> tuple:
  """Checks ``axis_name`` against where the call runs; returns the axes to gather over (or ``()``).

  Raises:
    ValueError: ``axis_name`` names no mapped axis here, ``x`` is not split over it or the
      parameters vary over it; or, without ``axis_name``, ``x`` is split over a mapped axis the
      parameters are replicated over (each device's rows would be summed over the devices).
  """
  if axis_name is None:
    params_axes = varying_axes(params)
    split = sorted(map(str, varying_axes(x) - params_axes))
    if split:
      name = split[0] if len(split) == 1 else tuple(split)
      raise ValueError(
          f"x is split over the mapped axis {name!r} (inside jax.shard_map) and the parameters "
          f"are replicated over it, but value_grad_and_curvature has no axis_name: it would "
          f"return each device's factor rows summed over all devices. Pass axis_name={name!r} "
          "to get the curvature of the whole batch (rows gathered, loss and gradients "
          "averaged) on every device.")
    manual = _manual_axes()
    if manual and not checks_vma():
      name = manual[0] if len(manual) == 1 else tuple(manual)
      raise ValueError(
          f"value_grad_and_curvature runs inside jax.shard_map(..., check_vma=False) over mesh "
          f"axes {name!r}, where it cannot see whether x is split over them. Pass "
          f"axis_name={name!r} (the batch axis) to get the curvature of the whole batch, or "
          "leave check_vma=True (the default) when every device trains its own model.")
    return ()
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  bound = _bound_axes()
  missing = [a for a in axes if a not in bound]
  if missing:
    raise ValueError(
        f"axis_name={axis_name!r}: {missing[0]!r} is not a mapped axis here (bound axes: "
        f"{list(bound)}). Call value_grad_and_curvature inside jax.shard_map over a mesh with "
        "that axis and the batch split over it (in_specs P(axis) for x); on one device or under "
        "jax.jit with sharded arrays, leave axis_name=None.")
  if checks_vma():
    unsplit = [a for a in axes if a not in varying_axes(x)]
    if unsplit:
      raise ValueError(
          f"axis_name={axis_name!r}: x is not split over {unsplit[0]!r} (it is replicated "
          "there), so gathering it would repeat every sample. Split the batch over the axis "
          "(shard_map in_specs P(axis) for x), or leave axis_name=None.")
    shared = [a for a in axes if a in varying_axes(params)]
    if shared:
      raise ValueError(
          f"axis_name={axis_name!r}: the parameters vary over {shared[0]!r}, but a batch split "
          "over an axis needs the same parameters on every device: replicate them (shard_map "
          "in_specs P() for the parameters and the optimizer state).")
  return axes


def bound(axes: tuple) -> bool:
  """Whether every axis of ``axes`` is a mapped axis here (``False`` outside the ``shard_map``
  where a curvature was measured, e.g. when it is returned from it and used under ``jit``)."""
  present = _bound_axes()
  return bool(axes) and all(a in present for a in axes)


def size(axes: tuple) -> int:
  """The number of devices along ``axes`` (1 for none)."""
  return jax.lax.axis_size(axes) if axes else 1


def vary(tree: Any, axes: frozenset | tuple) -> Any:
  """``tree`` made varying over ``axes`` (where it is not already), so cotangents stay per device."""
  if not axes or not checks_vma():
    return tree

  def one(leaf):
    missing = tuple(a for a in axes if a not in _varying(leaf))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(one, tree)


def vary_like(tree: Any, *like: Any) -> Any:
  """``tree`` made varying over every axis that the leaves of ``like`` vary over."""
  axes = frozenset()
  for other in like:
    axes |= varying_axes(other)
  return vary(tree, tuple(sorted(axes, key=str)))


def mean(tree: Any, axes: tuple) -> Any:
  """The mean over the devices along ``axes``, the same on every device."""
  return jax.lax.pmean(tree, axes) if axes else tree


def gather(tree: Any, axes: tuple, axis: int) -> Any:
  """Every device's ``tree`` concatenated along ``axis`` (device order), the same on every device."""
  if not axes:
    return tree
  return jax.tree.map(
      lambda a: jax.lax.all_gather(a, axes, axis=axis, tiled=True, to="invarying"), tree)


def gather_samples(factor: Any, axes: tuple) -> Any:
  """The factor of every device's samples, in device order (the order of the batch), the same
  on every device."""
  if not axes:
    return factor
  return factor.map_samples(
      lambda a, axis: jax.lax.all_gather(a, axes, axis=axis, tiled=True, to="invarying"))


def fold_key(key: jax.Array | None, axes: tuple) -> jax.Array | None:
  """A different PRNG key on every device, so random rows are drawn independently per shard."""
  if key is None or not axes:
    return key
  return jax.random.fold_in(key, jax.lax.axis_index(axes))


def scaled(array: jax.Array, factor: int) -> jax.Array:
  return array if factor == 1 else array / jnp.asarray(factor, array.dtype)


# --- blocks spread over the devices of the batch axis ---------------------------------------------


def factorisation_flops(num_params: int, num_rows: int, space: str) -> float:
  """The leading FLOP count of factoring one block of ``n`` parameters and ``d`` rows.

  Sample space: the ``d x d`` capacitance assembled from ``n``-column rows (``n d^2``) and its
  Cholesky factorisation (``d^3 / 3``); parameter space: ``G`` (``d n^2``) and its factorisation
  (``n^3 / 3``). The spread step balances the devices by this count.

  Example:
    >>> factorisation_flops(num_params=100, num_rows=30, space="sample")
    99000.0
  """
  n, d = float(num_params), float(num_rows)
  if space == "parameter":
    return n ** 3 / 3 + d * n ** 2
  return d ** 3 / 3 + n * d ** 2


def assign(costs: tuple[float, ...] | list[float], devices: int) -> tuple[int, ...]:
  """The device of every block: greedy, the costliest block first to the least loaded device.

  Deterministic (ties go to the lower block index, then the lower device index) and computed from
  static shapes at trace time, so every device derives the same assignment without talking.
  Longest-processing-time-first keeps the largest load within ``4/3`` of the best possible one.

  Example:
    >>> assign([8.0, 1.0, 5.0, 4.0], devices=2)
    (0, 0, 1, 1)
  """
  owner = [0] * len(costs)
  load = [0.0] * devices
  for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
    device = min(range(devices), key=lambda j: (load[j], j))
    owner[b] = device
    load[device] += costs[b]
  return tuple(owner)


def spread(axes: tuple, costs: list[float], thunks: list, shards: list | None = None) -> list:
  """Every ``thunks[b]()``, each evaluated on one device only, returned on every device.

  Inside ``shard_map`` over ``axes``: block ``b`` goes to device ``assign(costs)[b]``; a
  ``lax.switch`` on the device's index runs that device's thunks and puts zeros in place of the
  others', so at run time every device computes only its own blocks. One ``psum`` then shares
  the results: each entry is one device's value plus exact zeros, so every device holds the
  same bits (``NaN`` included), those of the device that computed it.

  Args:
    axes: the mapped axes (from :func:`resolve`).
    costs: one cost per thunk (e.g. :func:`factorisation_flops`), for the balance.
    thunks: functions of no arguments returning pytrees of arrays; with ``shards``, functions of
      one argument, the block's factors of the whole batch.
    shards: per block, this device's factors (those with ``map_samples``): each block's are
      sent to its owner only (:func:`to_owners`) and handed to its thunk there.

  Returns:
    ``[thunk() for thunk in thunks]``, the same on every device.
  """
  devices = size(axes)
  owner = assign(costs, devices)
  if shards is not None:
    owned = to_owners(axes, owner, shards)
    shapes = [jax.eval_shape(thunk, _whole_shape(block, devices))
              for thunk, block in zip(thunks, shards)]
  else:
    shapes = [jax.eval_shape(thunk) for thunk in thunks]
  zeros = lambda shape: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

  def branch(device):
    def run():
      if shards is not None:
        mine = owned(device)
        results = [thunks[b](mine[b]) if owner[b] == device else zeros(shapes[b])
                   for b in range(len(thunks))]
      else:
        results = [thunk() if owner[b] == device else zeros(shapes[b])
                   for b, thunk in enumerate(thunks)]
      # Each device holds different values here: typed as varying, so the psum adds them.
      return vary(results, axes)
    return run

  results = jax.lax.switch(jax.lax.axis_index(axes), [branch(j) for j in range(devices)])
  return jax.lax.psum(results, axes)


def _whole_shape(factors: list, devices: int) -> list:
  """Abstract factors with ``devices`` times the samples (for ``eval_shape``)."""
  def grow(a, axis):
    shape = list(a.shape)
    shape[axis] *= devices
    return jax.ShapeDtypeStruct(tuple(shape), a.dtype)
  return [f.map_samples(grow) for f in factors]


def to_owners(axes: tuple, owner: tuple[int, ...], shards: list) -> Any:
  """Sends every block's per-device factors to the block's owner alone, in one ``all_to_all``
  per dtype; returns ``owned(device)``, to be called in ``device``'s branch of a switch: there it
  gives ``{block: that block's factors of the whole batch}`` for the blocks ``device`` owns.

  Each device packs, for every destination, the flattened sample arrays of the blocks that
  destination owns (padded to the largest destination's length) and the ``all_to_all`` hands
  destination ``j`` the ``j``-th pack of every device, in device order: the order of the batch.
  A device receives its own blocks' rows only, about ``1 / devices`` of what an all-gather of
  every block's rows sends it.

  Args:
    axes: the mapped axes.
    owner: the device of every block (:func:`assign`).
    shards: per block, a list of factors holding this device's samples.
  """
  devices = size(axes)
  # Every per-sample array, with its sample axis and its block, in a fixed order.
  entries: list[tuple[int, jax.Array, int]] = []
  for b, factors in enumerate(shards):
    for factor in factors:
      factor.map_samples(lambda a, axis, b=b: entries.append((b, a, axis)) or a)
  dtypes = sorted({jnp.result_type(a).name for _, a, _ in entries})
  received, offsets = {}, {}
  for dtype in dtypes:
    lengths = [0] * devices
    packs = [[] for _ in range(devices)]
    for n, (b, a, _) in enumerate(entries):
      if jnp.result_type(a).name == dtype:
        offsets[n] = lengths[owner[b]]
        lengths[owner[b]] += a.size
        packs[owner[b]].append(a.reshape(-1))
    width = max(lengths)
    buffer = jnp.stack([jnp.concatenate(p + [jnp.zeros(width - n, dtype)]) if p
                        else jnp.zeros(width, dtype) for p, n in zip(packs, lengths)])
    received[dtype] = jax.lax.all_to_all(buffer, axes, 0, 0)  # (devices, width): row i from i

  def owned(device: int) -> dict[int, list]:
    arrays = {}
    for n, (b, a, axis) in enumerate(entries):
      if owner[b] != device:
        continue
      rows = received[jnp.result_type(a).name][:, offsets[n]:offsets[n] + a.size]
      arrays[n] = jnp.concatenate([rows[i].reshape(a.shape) for i in range(devices)], axis=axis)
    out, n = {}, 0
    for b, factors in enumerate(shards):
      rebuilt = []
      for factor in factors:
        def take(a, axis, b=b):
          nonlocal n
          n += 1
          return arrays[n - 1] if owner[b] == device else a
        rebuilt.append(factor.map_samples(take))
      if owner[b] == device:
        out[b] = rebuilt
    return out

  return owned


# --- the one-block kernel assembled in slabs over the devices of the batch axis -------------------


def assembled_kernel(factors, inv_masses, axes: tuple) -> jax.Array:
  """``sum_a K_a D_a^{-1} K_a^T`` (``d x d``), each device of ``axes`` assembling only its slab.

  Every device holds every row (gathered by ``value_grad_and_curvature``), but the kernel's rows
  of sample ``s`` need only ``s``'s rows against all: device ``j`` computes the rows of the
  ``j``-th of ``devices`` equal chunks of the samples (``d / devices`` kernel rows, for every
  factor row ``r``; ``1 / devices`` of the assembly's FLOPs), and one all-gather puts the slabs
  together, so every device holds the same kernel (and factors it, replicated). Outside a
  ``shard_map`` binding ``axes``, with one device, or with a sample count the devices do not
  divide: the whole kernel, assembled in place.

  Args:
    factors: the block's factors (all with the same ``R x B`` rows).
    inv_masses: per factor ``{leaf name: 1 / mass}``.
    axes: the mapped axes the rows were gathered over (``curvature.axis_name``).

  Example:
    >>> import jax.numpy as jnp
    >>> from riemod.curvature.factors import RowsFactor
    >>> f = RowsFactor({"w": jnp.ones((1, 4, 3))})  # R = 1 factor row, B = 4 samples
    >>> assembled_kernel([f], [{"w": jnp.asarray(0.5)}], axes=()).tolist()[0]  # not mapped
    [1.5, 1.5, 1.5, 1.5]
  """
  whole = lambda: sum(f.gram(m) for f, m in zip(factors, inv_masses))
  if not bound(axes) or size(axes) < 2:
    return whole()
  devices, samples = size(axes), factors[0].num_samples
  if samples % devices:
    return whole()
  own = samples // devices
  start = jax.lax.axis_index(axes) * own
  slab = sum(f.gram(m, samples=(start, own)) for f, m in zip(factors, inv_masses))
  d = slab.shape[-1]
  # (R * own, d) r-major: the slabs interleave per factor row, so gather along the sample axis.
  slab = slab.reshape(d // samples, own, d)
  return gather(slab, axes, axis=1).reshape(d, d)
