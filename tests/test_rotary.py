"""RoPE as multipliers (mlx_linear/rotary.py) against the RoPE module it is read from, the oracle:
at fixed positions (the tables) and at a decode step's array position, for every module kind."""

import mlx.core as mx
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from mlx_linear.rotary import Rotation, RotaryTables

SCALINGS = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
}


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_rotations_equal_the_module(traditional, scaling):
    rope = initialize_rope(64, 10000.0, traditional, SCALINGS[scaling], 131072)
    tables = RotaryTables.of(rope, 64, 140)
    x = mx.random.normal((2, 3, 5, 64), key=mx.random.key(0))
    for position in (0, 7, 139):  # every token at one position, as the sinks' and cache's queries
        expected = rope(x[..., None, :], offset=position)[..., 0, :]
        assert mx.allclose(tables.fixed[position].rotate(x), expected, rtol=0, atol=1e-6).item()
    rows = tables.fixed[3:8].rotate(x)  # tokens from a position, as a block's keys
    assert mx.allclose(rows, rope(x, offset=3), rtol=0, atol=1e-6).item()
    for position in (0, 5, 100_000):  # a decode step's position, an array
        expected = rope(x[:, :, :1], offset=mx.array(position))
        assert mx.allclose(tables.at(mx.array(position)).rotate(x[:, :, :1]), expected, rtol=0, atol=1e-6).item()


def test_several_positions_in_one_op():
    rope = initialize_rope(16, 10000.0, False, None, 4096)
    tables = RotaryTables.of(rope, 16, 20)
    q = mx.random.normal((1, 2, 1, 16), key=mx.random.key(1))
    stacked = Rotation(mx.stack([tables.fixed.multipliers[p] for p in (2, 9, 19)]), False).rotate(q[..., None, :])
    for row, position in enumerate((2, 9, 19)):
        assert mx.allclose(stacked[:, :, :, row], rope(q, offset=position), atol=1e-6).item()


def test_no_tables_where_the_rotation_depends_on_more_than_the_position():
    dynamic = initialize_rope(64, 10000.0, False, {"rope_type": "dynamic", "factor": 2.0}, 4096)
    partial = initialize_rope(32, 10000.0, False, None, 4096)
    assert RotaryTables.of(dynamic, 64, 10) is None and RotaryTables.of(partial, 64, 10) is None
