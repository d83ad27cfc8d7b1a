"""riemod benchmark suite: riemod against optax Adam/SGD, kfac-jax and dense Gauss-Newton."""
