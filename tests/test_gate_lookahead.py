import numpy as np
import pytest

from predictors.base import GateLookaheadPredictor


@pytest.mark.parametrize("num_layers,horizon", [(2, 4), (3, 1), (8, 4)])
def test_gate_lookahead_equals_routers_applied_to_the_normed_hidden_state(num_layers, horizon):
    rng = np.random.default_rng(num_layers)
    d, E, eps = 16, 8, 1e-6
    kernels = rng.normal(size=(num_layers, d, E)).astype(np.float32)
    scales = rng.normal(size=(num_layers, d)).astype(np.float32)
    predictor = GateLookaheadPredictor(kernels, scales, eps)
    hidden = rng.normal(size=d).astype(np.float32) * 3
    normed = hidden / np.sqrt(np.mean(hidden**2) + eps)
    for pos in range(num_layers):
        want = np.stack([(normed * scales[(pos + j) % num_layers]) @ kernels[(pos + j) % num_layers]
                         for j in range(1, horizon + 1)])
        np.testing.assert_allclose(predictor.predict(pos, hidden, None, horizon), want, rtol=1e-5, atol=1e-5)
