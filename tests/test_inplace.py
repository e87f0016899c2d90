import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.inplace import update_in_dim, update_row
from jaxmoe.offload import pack_expert, write_slot


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_update_in_dim_matches_reference(dtype):
    rng = np.random.default_rng(0)
    buffer = jnp.asarray(rng.normal(size=(2, 9, 3)) * 100, dtype)
    update = jnp.asarray(rng.normal(size=(2, 4, 3)) * 100, jnp.float32)
    got = update_in_dim(buffer, update, jnp.int32(3), axis=1)
    want = np.asarray(buffer).copy()
    want[:, 3:7] = np.asarray(update.astype(dtype))
    assert got.dtype == buffer.dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bfloat16_row_update_keeps_special_values():
    buffer = jnp.zeros((4, 3), jnp.bfloat16)
    row = jnp.asarray([np.nan, -0.0, np.inf], jnp.bfloat16)
    got = np.asarray(update_row(buffer, row, jnp.int32(2)), np.float32)
    assert np.isnan(got[2, 0]) and np.signbit(got[2, 1]) and np.isinf(got[2, 2])
    assert not got[[0, 1, 3]].any()


def test_write_slot_unpacks_into_the_donated_buffers():
    slots = {"w_gate": jnp.zeros((8, 16, 4), jnp.bfloat16), "w_up": jnp.zeros((8, 16, 4), jnp.bfloat16),
             "w_down": jnp.zeros((8, 4, 16), jnp.bfloat16)}
    rng = np.random.default_rng(0)
    expert = {n: rng.normal(size=slots[n].shape[1:]).astype(np.float32) for n in slots}
    pointer = slots["w_gate"].unsafe_buffer_pointer()
    out = jax.block_until_ready(write_slot(slots, 5, jnp.asarray(pack_expert(expert, jnp.bfloat16))))
    assert slots["w_gate"].is_deleted()
    assert out["w_gate"].unsafe_buffer_pointer() == pointer  # in place, not a copy of the buffer
    for name in slots:
        np.testing.assert_array_equal(np.asarray(out[name][5]), expert[name].astype(jnp.bfloat16))
        assert not np.asarray(out[name][:5], np.float32).any() and not np.asarray(out[name][6:], np.float32).any()


def test_write_slot_compiles_without_widening_the_buffer():
    """XLA:CPU widens a bf16 dynamic-update-slice to f32 over the whole buffer (a full copy per write)."""
    slots = {n: jnp.zeros((8, 16, 4), jnp.bfloat16) for n in ("w_gate", "w_up", "w_down")}
    hlo = write_slot.lower(slots, 1, jnp.ones((3 * 16 * 4,), jnp.bfloat16)).compile().as_text()
    assert "f32[8,16,4]" not in hlo
