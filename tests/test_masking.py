"""optax.masked / optax.multi_transform around riemod's transforms: the curvature of the selected
parameters only, checked against dense references (jax.jacrev rows of the selected leaves, an
explicit solve) and against the same model with the other parameters closed over as constants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import riemod

MASS, LR, B = 1e-2, 0.5, 6


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 4)
  return {"body": {"kernel": jax.random.normal(k[0], (3, 5)), "bias": 0.1 * jnp.ones(5)},
          "head": {"kernel": jax.random.normal(k[1], (5, 2)), "bias": jnp.zeros(2)}}


def _data():
  k = jax.random.split(jax.random.key(7), 2)
  return jax.random.normal(k[0], (B, 3)), jax.random.normal(k[1], (B, 2))


def _structured(p, x):  # riemod.nn.dense: Gram-Hadamard factors
  return riemod.nn.dense(p["head"], jnp.tanh(riemod.nn.dense(p["body"], x)))


def _generic(p, x):  # plain matmuls: materialised rows
  h = jnp.tanh(x @ p["body"]["kernel"] + p["body"]["bias"])
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def _loss(t):
  return lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))


def _measure(f, params):
  x, t = _data()
  _, g, curv = riemod.value_grad_and_curvature(f, x, _loss(t), riemod.metrics.identity(),
                                               params=params)
  return x, g, curv


def _dense_step(f, params, x, g, selected, structure):
  """``-lr (K_S^T K_S + mass I)^{-1} g_S`` from jax.jacrev rows of the selected leaves.

  ``selected``: (module, leaf) pairs; layerwise blocks are the selected leaves' modules."""
  jac = jax.jacrev(f)(params, x)  # {module: {leaf: (B, out, *leaf)}}
  blocks = {}
  for module, leaf in selected:
    blocks.setdefault(module if structure == "layerwise" else "all", []).append((module, leaf))
  out = {}
  for members in blocks.values():
    rows = np.concatenate([np.asarray(jac[m][n]).reshape(B * 2, -1) for m, n in members], 1)
    rows = rows / np.sqrt(B)  # identity output metric, batch-mean loss
    grad = np.concatenate([np.asarray(g[m][n]).reshape(-1) for m, n in members])
    step = -LR * np.linalg.solve(rows.T @ rows + MASS * np.eye(rows.shape[1]), grad)
    start = 0
    for m, n in members:
      size = params[m][n].size
      out[(m, n)] = step[start:start + size].reshape(params[m][n].shape)
      start += size
  return out


@pytest.mark.parametrize("f", [_structured, _generic], ids=["dense", "generic"])
@pytest.mark.parametrize("structure", ["layerwise", "full"])
@pytest.mark.parametrize("selected", [
    (("head", "kernel"), ("head", "bias")),                      # frozen backbone
    (("body", "kernel"), ("head", "kernel")),                    # kernels only (bias masked)
    (("body", "bias"), ("head", "kernel"), ("head", "bias")),    # a module's bias alone
], ids=["head", "kernels", "mixed"])
def test_masked_step_is_the_selected_block_solve(f, structure, selected):
  with jax.enable_x64(True):
    params = _params()
    x, g, curv = _measure(f, params)
    mask = {m: {n: (m, n) in selected for n in params[m]} for m in params}
    tx = optax.masked(riemod.natural_gradient(LR, MASS) if structure == "full"
                      else riemod.layerwise_natural_gradient(LR, MASS), mask)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params, curvature=curv)
    reference = _dense_step(f, params, x, g, selected, structure)
    for m in params:
      for n in params[m]:
        if (m, n) in selected:
          np.testing.assert_allclose(updates[m][n], reference[(m, n)], rtol=1e-9, atol=1e-12)
        else:  # optax.masked passes the other leaves through untouched
          np.testing.assert_array_equal(updates[m][n], g[m][n])


def test_multi_transform_per_group_optimizers():
  with jax.enable_x64(True):
    params = _params()
    x, g, curv = _measure(_structured, params)
    labels = {"body": {"kernel": "sgd", "bias": "sgd"}, "head": {"kernel": "ng", "bias": "ng"}}
    tx = optax.multi_transform(
        {"ng": riemod.layerwise_natural_gradient(LR, MASS), "sgd": optax.sgd(0.1)}, labels)
    updates, state = tx.update(g, tx.init(params), params, curvature=curv)
    reference = _dense_step(_structured, params, x, g, [("head", "kernel"), ("head", "bias")],
                            "layerwise")
    for n in ("kernel", "bias"):
      np.testing.assert_allclose(updates["head"][n], reference[("head", n)], rtol=1e-9,
                                 atol=1e-12)
      np.testing.assert_allclose(updates["body"][n], -0.1 * g["body"][n], rtol=1e-12)
    # One diagnostics slot: the one selected module.
    report = riemod.find_state(state, riemod.MetricState).report
    assert report.condition.shape == (1,) and np.isfinite(report.condition[0])


def test_masked_equals_the_submodel_with_constants():
  """Adaptive mass and SPRING momentum over several steps: inside optax.masked the head trains
  exactly as the model whose body is closed over as constants."""
  with jax.enable_x64(True):
    params = _params()
    x, t = _data()
    geometry = riemod.Geometry(mass=MASS, mass_policy=riemod.masses.adaptive(0.9))
    make = lambda: riemod.layerwise_natural_gradient(LR, geometry=geometry, momentum=0.5)
    tx = optax.masked(make(), {"body": False, "head": True})
    sub_tx = make()
    sub_f = lambda head, xb: _structured({"body": params["body"], "head": head}, xb)
    state, sub_state, head = tx.init(params), sub_tx.init(params["head"]), params["head"]
    p = params
    for _ in range(3):
      _, g, curv = riemod.value_grad_and_curvature(_structured, x, _loss(t),
                                                   riemod.metrics.identity(), params=p)
      u, state = tx.update(g, state, p, curvature=curv)
      _, sub_g, sub_curv = riemod.value_grad_and_curvature(sub_f, x, _loss(t),
                                                           riemod.metrics.identity(), params=head)
      sub_u, sub_state = sub_tx.update(sub_g, sub_state, head, curvature=sub_curv)
      np.testing.assert_allclose(u["head"]["kernel"], sub_u["kernel"], rtol=1e-10, atol=1e-13)
      np.testing.assert_allclose(u["head"]["bias"], sub_u["bias"], rtol=1e-10, atol=1e-13)
      p = {"body": p["body"], "head": optax.apply_updates(p["head"], u["head"])}
      head = optax.apply_updates(head, sub_u)


class _Net(nnx.Module):
  def __init__(self):
    self.backbone = nnx.Linear(3, 5, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    self.head = nnx.Linear(5, 2, rngs=nnx.Rngs(1), param_dtype=jnp.float64)

  def __call__(self, x):
    return self.head(jnp.tanh(self.backbone(x)))


def _nnx_reference(model, x, g):
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.as_pure(state)
  f = lambda p, xb: nnx.merge(graphdef, nnx.State(p), rest)(xb)
  params = {m: dict(pure[m]) for m in ("backbone", "head")}
  grads = {m: dict(nnx.as_pure(g)[m]) for m in ("backbone", "head")}
  return _dense_step(lambda p, xb: f(p, xb), params, x, grads,
                     [("head", "kernel"), ("head", "bias")], "layerwise")


@pytest.mark.parametrize("how", ["multi_transform", "wrt"])
def test_nnx_optimizer_frozen_backbone(how):
  with jax.enable_x64(True):
    model = _Net()
    x, t = _data()
    _, g, curv = riemod.value_grad_and_curvature(model, x, _loss(t), riemod.metrics.identity())
    reference = _nnx_reference(model, x, g)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    if how == "multi_transform":
      labels = lambda p: jax.tree_util.tree_map_with_path(
          lambda path, _: "ng" if path[0].key == "head" else "frozen", p)
      tx = optax.multi_transform({"ng": riemod.layerwise_natural_gradient(LR, MASS),
                                  "frozen": optax.set_to_zero()}, labels)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    else:  # an optimizer over the head's parameters only
      optimizer = nnx.Optimizer(model, riemod.layerwise_natural_gradient(LR, MASS),
                                wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    updates = optimizer.update(model, g, curvature=curv)
    for n in ("kernel", "bias"):
      np.testing.assert_allclose(updates["head"][n], reference[("head", n)], rtol=1e-9,
                                 atol=1e-12)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["backbone"]["kernel"], before["backbone"]["kernel"])


def test_unknown_parameters_are_named():
  params = _params()
  _, g, curv = _measure(_structured, params)
  tx = riemod.layerwise_natural_gradient(LR, MASS)
  renamed = {"trunk": g["body"], "head": {"kernel": g["head"]["kernel"]}}
  with pytest.raises(ValueError, match=r"trunk/bias.*does not have"):
    tx.update(renamed, tx.init(renamed), curvature=curv)


def test_restrict_needs_paths():
  params = _params()
  _, _, curv = _measure(_structured, params)
  import dataclasses
  with pytest.raises(ValueError, match="no parameter paths"):
    dataclasses.replace(curv, leaf_paths=None).restrict(["head/kernel"])


# -- module_diagnostics under a mask: the restricted blocks' values, by module.

def _diagnostics_close(actual, expected):
  assert set(actual) == set(expected)
  for module in expected:
    for name in ("condition", "jitter", "error"):
      np.testing.assert_allclose(actual[module][name], expected[module][name], rtol=1e-10,
                                 err_msg=f"{module} {name}")


def test_module_diagnostics_masked_layerwise_equal_unmasked():
  """A whole module selected: its layerwise block is the unmasked one, so are its values."""
  with jax.enable_x64(True):
    params = _params()
    _, g, curv = _measure(_structured, params)
    mask = {"body": {"kernel": False, "bias": False}, "head": {"kernel": True, "bias": True}}
    full_tx = riemod.layerwise_natural_gradient(LR, MASS)
    _, full_state = full_tx.update(g, full_tx.init(params), params, curvature=curv)
    unmasked = riemod.module_diagnostics(full_state, curv)
    assert unmasked["head"]["condition"] != unmasked["body"]["condition"]

    tx = optax.masked(riemod.layerwise_natural_gradient(LR, MASS), mask)
    _, state = tx.update(g, tx.init(params), params, curvature=curv)
    _diagnostics_close(riemod.module_diagnostics(state, curv, mask=mask),
                       {"head": unmasked["head"]})
    with pytest.raises(ValueError, match="mask="):  # read against the whole model: refused
      riemod.module_diagnostics(state, curv)

    labels = jax.tree.map(lambda keep: "ng" if keep else "sgd", mask)
    multi = optax.multi_transform({"ng": riemod.layerwise_natural_gradient(LR, MASS),
                                   "sgd": optax.sgd(0.1)}, labels)
    _, state = multi.update(g, multi.init(params), params, curvature=curv)
    selected = jax.tree.map(lambda label: label == "ng", labels)
    _diagnostics_close(riemod.module_diagnostics(state, curv, mask=selected),
                       {"head": unmasked["head"]})


@pytest.mark.parametrize("structure", ["layerwise", "full"])
def test_module_diagnostics_masked_equal_submodel(structure):
  """The selected block (the head, and the body's bias under "full") against the model whose
  other parameters are closed over as constants: the same block, the same diagnostics."""
  with jax.enable_x64(True):
    params = _params()
    x, t = _data()
    _, g, curv = _measure(_structured, params)
    mask = {"body": {"kernel": False, "bias": True}, "head": {"kernel": True, "bias": True}}
    make = lambda: (riemod.natural_gradient(LR, MASS) if structure == "full"
                    else riemod.layerwise_natural_gradient(LR, MASS))
    tx = optax.masked(make(), mask)
    _, state = tx.update(g, tx.init(params), params, curvature=curv)
    diag = riemod.module_diagnostics(state, curv, mask=mask)

    sub = {"body": {"bias": params["body"]["bias"]}, "head": params["head"]}
    sub_f = lambda q, xb: _structured(
        {"body": {"kernel": params["body"]["kernel"], "bias": q["body"]["bias"]},
         "head": q["head"]}, xb)
    _, sub_g, sub_curv = riemod.value_grad_and_curvature(sub_f, x, _loss(t),
                                                         riemod.metrics.identity(), params=sub)
    sub_tx = make()
    _, sub_state = sub_tx.update(sub_g, sub_tx.init(sub), sub, curvature=sub_curv)
    _diagnostics_close(diag, riemod.module_diagnostics(sub_state, sub_curv))


def test_module_diagnostics_nnx_narrower_wrt():
  """nnx.Optimizer(wrt=head only): mask= gives the head's values of the whole-model step."""
  with jax.enable_x64(True):
    model = _Net()
    x, t = _data()
    _, g, curv = riemod.value_grad_and_curvature(model, x, _loss(t), riemod.metrics.identity())
    whole_model = _Net()  # the same initial parameters, every module stepped
    whole = nnx.Optimizer(whole_model, riemod.layerwise_natural_gradient(LR, MASS), wrt=nnx.Param)
    whole.update(whole_model, g, curvature=curv)
    optimizer = nnx.Optimizer(model, riemod.layerwise_natural_gradient(LR, MASS),
                              wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    optimizer.update(model, g, curvature=curv)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "head",
                                            nnx.as_pure(g))
    diag = riemod.module_diagnostics(optimizer.opt_state, curv, mask=mask)
    reference = riemod.module_diagnostics(whole.opt_state, curv)
    assert reference["head"]["condition"] != reference["backbone"]["condition"]
    _diagnostics_close(diag, {"head": reference["head"]})


def test_module_diagnostics_refuses_a_narrower_layerwise_state():
  """A layerwise transform updated on two of three modules (as an nnx.Optimizer with a narrower
  wrt does): read against the whole curvature without mask=, refused."""
  k = jax.random.split(jax.random.key(1), 3)
  params = {f"l{i}": {"kernel": jax.random.normal(k[i], (3, 3)), "bias": jnp.zeros(3)}
            for i in range(3)}
  f = lambda p, xb: riemod.nn.dense(p["l2"], jnp.tanh(riemod.nn.dense(
      p["l1"], jnp.tanh(riemod.nn.dense(p["l0"], xb)))))
  x, t = jax.random.normal(k[0], (B, 3)), jax.random.normal(k[1], (B, 3))
  _, g, curv = riemod.value_grad_and_curvature(f, x, _loss(t), riemod.metrics.identity(),
                                               params=params)
  sub = {"l1": g["l1"], "l2": g["l2"]}
  tx = riemod.layerwise_natural_gradient(LR, MASS)
  _, state = tx.update(sub, tx.init(sub), curvature=curv)
  with pytest.raises(ValueError, match="diagnostics for 2 modules, the curvature has 3"):
    riemod.module_diagnostics(state, curv)
  mask = {"l0": {"kernel": False, "bias": False}, "l1": {"kernel": True, "bias": True},
          "l2": {"kernel": True, "bias": True}}
  assert set(riemod.module_diagnostics(state, curv, mask=mask)) == {"l1", "l2"}


def test_module_diagnostics_mask_must_match():
  params = _params()
  _, g, curv = _measure(_structured, params)
  tx = riemod.layerwise_natural_gradient(LR, MASS)
  _, state = tx.update(g, tx.init(params), params, curvature=curv)
  with pytest.raises(ValueError, match="mask has 2 leaves"):
    riemod.module_diagnostics(state, curv, mask={"body": True, "head": False})
  with pytest.raises(TypeError, match="pytree of bools itself"):
    riemod.module_diagnostics(state, curv, mask=lambda p: p)
