"""veil.laplace (issue 31, Deliver 5): the Gaussian at the mode with the inverse negative
Hessian as covariance, checked where it is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import veil

COV = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 0.5]])
MU = np.array([1.0, -2.0, 0.5])
PREC = jnp.asarray(np.linalg.inv(COV))


def test_exact_on_a_gaussian_target():
    # On a Gaussian the Laplace approximation is the target itself: L-BFGS reaches the mean
    # to float32 round-off of the gradient (~1e-4 here), the Hessian is -PREC exactly; the
    # verdict trusts it and k-hat reads an exact fit.
    t = veil.Target.from_logdensity(lambda z: -0.5 * (z - MU) @ PREC @ (z - MU), dim=3)
    res = veil.laplace(t, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(res.q.mean), MU, atol=1e-3)
    np.testing.assert_allclose(np.asarray(res.q.cov), COV, rtol=1e-4, atol=1e-5)
    assert res.stop_reason.startswith("converged") and res.summary().trustworthy
    assert isinstance(res, veil.Result) and res.khat < 0.5


def test_the_mode_and_curvature_of_a_skewed_target():
    # log p(u) = a u - b e^u (a Gamma(a, b) in log space): mode log(a / b), curvature -a there,
    # so the Laplace sd is 1 / sqrt(a). Skewed: k-hat says the Gaussian misses some of it.
    a, b = 3.0, 2.0
    t = veil.Target.from_logdensity(lambda u: a * u[0] - b * jnp.exp(u[0]), dim=1)
    res = veil.laplace(t, key=jax.random.key(0))
    assert float(res.q.mean[0]) == pytest.approx(np.log(a / b), abs=1e-4)
    assert float(res.q.stddev[0]) == pytest.approx(1 / np.sqrt(a), rel=1e-4)


def test_no_strict_maximum_is_an_error():
    # z1 does not enter the log density: its direction is flat, no Laplace approximation exists
    # (the target's own check already warns at construction).
    with pytest.warns(UserWarning, match="does not change along coordinate"):
        t = veil.Target.from_logdensity(lambda z: -0.5 * z[0] ** 2 + 0.0 * z[1], dim=2)
    with pytest.raises(ValueError, match=r"not a strict local maximum of the log density: 1 direction"):
        veil.laplace(t, key=jax.random.key(0))


def test_bad_input():
    t = veil.Target.from_logdensity(lambda z: -0.5 * jnp.sum(z**2), dim=2)
    with pytest.raises(ValueError, match=r"init must have shape \(2,\)"):
        veil.laplace(t, key=jax.random.key(0), init=jnp.zeros(3))
    with pytest.raises(ValueError, match="not finite at the start"):
        veil.laplace(veil.Target.from_logdensity(lambda z: jnp.log(z[0]), dim=1), key=jax.random.key(0),
                     init=jnp.array([-1.0]))
