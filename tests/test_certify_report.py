"""certify end to end: report contents, JSON, table; clear errors for bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import riemod
from riemod.certify import CertificateReport, certify, guarded


def _setup():
  model = riemod.nn.Sequential(riemod.nn.Dense(4, 6, rngs=nnx.Rngs(0)), jnp.tanh,
                               riemod.nn.Dense(6, 3, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (10, 4))
  y = jax.random.randint(jax.random.key(1), (10,), 0, 3)
  loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return model, x, y, loss_fn


def test_report_with_trained_guarded_state():
  model, x, y, loss_fn = _setup()
  mass, lr = 0.1, 0.5
  metric = riemod.metrics.softmax_fisher()
  geometry = riemod.Geometry(mass=mass)
  tx = guarded(riemod.layerwise_natural_gradient(lr, geometry=geometry), geometry)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_of = lambda p: loss_fn(nnx.merge(graphdef, p, rest)(x))

  @jax.jit
  def step(p, state):
    loss, grads, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, p, rest), x, loss_fn,
                                                        metric)
    u, state = tx.update(grads, state, p, curvature=curv, value=loss, value_fn=loss_of)
    return optax.apply_updates(p, u), state

  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  model = nnx.merge(graphdef, params, rest)
  report = certify(model, x, loss_fn, metric, learning_rate=lr, opt_state=state,
                   geometry=geometry, dataset_size=100)
  # The guard's mass scale lives in the inner transform's geometry state.
  mass_scale = float(riemod.find_state(state, riemod.MetricState).geometry.mass_scale)
  assert isinstance(report, CertificateReport)
  d = json.loads(report.to_json())
  for key in ("modules", "contraction_factor", "max_stable_learning_rate", "action_gap",
              "stability_bound", "verdict"):
    assert key in d
  assert [m["name"] for m in d["modules"]] == ["layers/0", "layers/1", "layers/2"]
  assert d["settings"]["mass_scale"] == pytest.approx(mass_scale)
  assert d["action"] is not None and d["action"]["num_steps"] == 5 - 1 - int(state.rejected_steps)
  net = d["network"]
  assert net["contraction_factor"] == pytest.approx(
      max(abs(1 - lr * net["lam_min"]), abs(1 - lr * net["lam_max"])), rel=1e-6)
  b = d["bound"]
  c = b["constants"]
  assert b["value"] == pytest.approx(
      c["kappa"] ** 2 * c["L"] / (c["xi"] * c["mu"] * np.sqrt(100)), rel=1e-6)
  assert c["mu"] == pytest.approx(mass * mass_scale, rel=1e-5)
  # Softmax cross-entropy: the per-sample logit Hessian diag(p) - p p^T has norm <= 1/2.
  assert 0 < c["L"] <= 0.5 + 1e-6
  table = report.table()
  assert "layers/0" in table and "verdict" in table and "stability" in table
  assert isinstance(report.verdict, str) and report.verdict


def test_bad_input_gives_clear_errors():
  model, x, y, loss_fn = _setup()
  metric = riemod.metrics.softmax_fisher()
  kw = dict(learning_rate=0.5)
  with pytest.raises(FloatingPointError, match="x contains NaN"):
    certify(model, x.at[0, 0].set(jnp.nan), loss_fn, metric, **kw)
  y_other = jnp.zeros((7,), jnp.int32)
  wrong = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y_other).mean()
  with pytest.raises(ValueError, match="loss_fn fails"):
    certify(model, x, wrong, metric, **kw)
  with pytest.raises(ValueError, match="x matches the model"):
    certify(model, jnp.ones((10, 5)), loss_fn, metric, **kw)
  other = riemod.nn.Sequential(riemod.nn.Dense(4, 3, rngs=nnx.Rngs(0)))
  other_state = riemod.layerwise_natural_gradient(0.5).init(nnx.state(other, nnx.Param))
  with pytest.raises(ValueError, match="does not belong to this model"):
    certify(model, x, loss_fn, metric, opt_state=other_state, **kw)
  with pytest.raises(ValueError, match="MetricState"):
    certify(model, x, loss_fn, metric, opt_state=optax.sgd(0.1).init(nnx.state(model, nnx.Param)),
            **kw)
  with pytest.raises(ValueError, match="learning_rate"):
    certify(model, x, loss_fn, metric, learning_rate=-1.0)
  with pytest.raises(ValueError, match="dataset_size"):
    certify(model, x, loss_fn, metric, dataset_size=3, **kw)
  with pytest.raises(TypeError, match="output_metric"):
    certify(model, x, loss_fn, "fisher", **kw)
  with pytest.raises(ValueError, match="params="):
    certify(lambda p, v: v, x, loss_fn, metric, **kw)
  bad_params = jax.tree.map(lambda a: a.at[..., 0].set(jnp.inf), nnx.state(model, nnx.Param))
  nnx.update(model, bad_params)
  with pytest.raises(FloatingPointError, match="parameters"):
    certify(model, x, loss_fn, metric, **kw)


@pytest.mark.slow
def test_cli_certify_json(tmp_path, capsys):
  from riemod.cli.main import main

  assert main(["certify", "--steps", "4", "--every", "2", "--json", "--no-progress", "--out",
               str(tmp_path)]) == 0
  out = json.loads(capsys.readouterr().out)
  for key in ("modules", "contraction_factor", "max_stable_learning_rate", "action_gap",
              "stability_bound", "verdict_detail"):
    assert key in out
  # The default run converges: no verdict along it says "unstable".
  assert [h["status"] for h in out["history"]] and all(
      h["status"] != "unstable" for h in out["history"])
  assert out["network"]["gauss_newton"]["lam_max"] > 0
  measured = out["bound"]["measured_stability"]
  assert measured["num_steps"] == 4 and measured["parameter_distance"] > 0
  assert (tmp_path / "certificate.png").exists() and (tmp_path / "certificate.md").exists()


def test_cli_certify_help_shows_defaults(capsys, monkeypatch):
  from riemod.cli.main import main

  monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside the default path
  with pytest.raises(SystemExit):
    main(["certify", "--help"])
  text = capsys.readouterr().out
  assert "riemod-output/certify" in text and "(default: 20)" in text and "``" not in text


def test_state_of_the_certified_default_optimizer_and_its_smallest_mass():
  """The Kronecker mass (the certified aliases' default) keeps per-module statistics, not
  parameter-shaped moments, and is not diagonal: its state belongs to its model (it was refused as
  another model's), mu is lam_min(D_a) from a dense eigh of D_a (it was the smallest row sum of
  D, negative after one step), and another model's state is still refused."""
  if True:  # float32, as the model's parameters
    model, x, y, loss_fn = _setup()
    metric = riemod.metrics.softmax_fisher()
    tx = riemod.certify.certified_layerwise_natural_gradient()
    geometry = riemod.certify.certified_geometry()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = tx.init(params)
    for _ in range(3):
      loss, grads, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, params, rest), x,
                                                          loss_fn, metric)
      u, state = tx.update(grads, state, params, curvature=curv, value=loss,
                           apply_fn=lambda p: nnx.merge(graphdef, p, rest)(x), loss_fn=loss_fn)
      params = optax.apply_updates(params, u)
    nnx.update(model, params)
    report = certify(model, x, loss_fn, metric, learning_rate=float(state.learning_rate),
                     opt_state=state, geometry=geometry)
    # Dense D from the geometry's own mass product, its smallest eigenvalue per module.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    composed = geometry.compose(curv, riemod.find_state(state, riemod.MetricState).geometry)
    dense = np.stack([np.asarray(jax.flatten_util.ravel_pytree(
        composed.mass_times(unravel(e)))[0]) for e in np.eye(flat.shape[0])], 1)
    sizes = [int(np.prod(np.shape(v))) for v in jax.tree.leaves(params)]
    starts = np.cumsum([0] + sizes)
    expected = []
    for module in curv.modules:
      index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in module.leaf_indices])
      expected.append(np.linalg.eigvalsh(dense[np.ix_(index, index)])[0])
    assert min(expected) > 0
    np.testing.assert_allclose(report.bound["constants"]["mu"], min(expected), rtol=1e-4)
    other = riemod.nn.Sequential(riemod.nn.Dense(4, 3, rngs=nnx.Rngs(0)))
    other_state = tx.init(nnx.state(other, nnx.Param))
    with pytest.raises(ValueError, match="does not belong to this model"):
      certify(model, x, loss_fn, metric, learning_rate=0.1, opt_state=other_state,
              geometry=geometry)
