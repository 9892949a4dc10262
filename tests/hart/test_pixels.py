"""hart/pixels.py: uint8 RGB <-> the models' [-1, 1] channels-first tensors."""

from __future__ import annotations

import numpy as np
import torch

from hart.pixels import to_model, to_uint8


def test_round_trip_and_range():
    images_BHW3 = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x_B3HW = to_model(images_BHW3)
    assert x_B3HW.shape == (2, 3, 5, 7) and x_B3HW.dtype == torch.float32
    assert x_B3HW.min() >= -1 and x_B3HW.max() <= 1
    expected = images_BHW3[0, 0, 0].astype(np.float32) / np.float32(127.5) - np.float32(1)  # float32 arithmetic
    assert x_B3HW[0, :, 0, 0].tolist() == expected.tolist()
    assert np.array_equal(to_uint8(x_B3HW), images_BHW3)
    assert torch.equal(to_model(torch.from_numpy(images_BHW3)), x_B3HW)  # tensors too


def test_to_uint8_clamps_and_rounds():
    x_B3HW = torch.tensor([-3.0, -1.0, 0.0, 0.004, 1.0, 7.0]).view(1, 3, 1, 2)  # R, G, B planes of 2 pixels
    assert to_uint8(x_B3HW).reshape(-1).tolist() == [0, 128, 255, 0, 128, 255]
