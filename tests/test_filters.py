"""The filter images: tile i is unit i, min-max scaled, in a white frame."""

import numpy as np
import pytest
import torch

from sda.filters import filter_grid, tile


def test_unit_i_is_tile_i_scaled_to_its_own_range_in_a_white_frame():
    weight = torch.arange(5 * 9, dtype=torch.float32).reshape(5, 9)
    weight[3] = -weight[3]  # another range and orientation: scaled on its own
    pixels = filter_grid(weight, count=5, scale=1)
    # 5 tiles of 3 x 3 in rows of 3: 2 rows, 1-pixel frames.
    assert pixels.shape == (2 * 4 + 1, 3 * 4 + 1) and pixels.dtype == np.uint8
    ramp = np.round(np.arange(9).reshape(3, 3) / 8 * 255).astype(np.uint8)
    for unit, (top, left) in enumerate([(1, 1), (1, 5), (1, 9), (5, 1), (5, 5)]):
        expected = ramp[::-1, ::-1] if unit == 3 else ramp
        assert np.array_equal(pixels[top : top + 3, left : left + 3], expected), unit
    frame = np.ones_like(pixels, dtype=bool)
    for top, left in [(1, 1), (1, 5), (1, 9), (5, 1), (5, 5)]:
        frame[top : top + 3, left : left + 3] = False
    assert (pixels[frame] == 255).all()  # the frames and the empty sixth place
    assert filter_grid(weight, count=5, scale=2).shape == (18, 26)


def test_tile_lays_out_rows_left_to_right_and_filters_must_be_square():
    images = np.stack([np.full((2, 2), k, dtype=np.float32) for k in range(3)])
    grid = tile(images, per_row=3, padding=2, pad_value=-1.0)
    assert grid.shape == (6, 14)
    assert [grid[2, 2 + 4 * k] for k in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="not square"):
        filter_grid(torch.zeros(4, 10))
