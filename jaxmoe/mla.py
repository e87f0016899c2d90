"""Multi-head latent attention (DeepSeek-V2/V3). Being written: see the DeepSeek adapter work."""

from flax import nnx


class MLAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs):
        raise NotImplementedError("MLA attention is not implemented yet")
