"""Conservation laws of gradient/momentum flows and computational inertia (see docs/conservation.md)."""

from riemod.conservation.flows import (FieldFamily, gradient_fields, integrate_gradient_flow,
                                       integrate_momentum_flow, momentum_lift)
from riemod.conservation.lie import AmbiguousRankWarning, LawCount, count_laws, lie_rank
from riemod.conservation.reparametrizations import (Reparametrization, as_reparametrization, factorization,
                                                    homogeneous_neuron, linear_network, relu_network,
                                                    residual_block, two_layer_relu)
from riemod.conservation.polynomial import (PolynomialLaw, PolynomialLaws, find_polynomial_laws,
                                            monomial_exponents, verify_laws)
from riemod.conservation.monitors import (ChargeMonitorState, DriftMonitorState, charge_monitor, drift_monitor,
                                          find_state)
from riemod.conservation.inertia import (HeavyBallState, Mass, diagonal_mass, heavy_ball, identity_mass,
                                         operator_mass, scale_by_heavy_ball, stationary_velocity_sq)
