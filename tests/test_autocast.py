"""`gatedmoe.autocast.outside_autocast`: a linear layer's input dtype, autocast off inside."""

import torch

from gatedmoe.autocast import outside_autocast


def _seen(x, extra):
    return x.dtype, torch.is_autocast_enabled("cpu"), extra


def test_plain_call_without_autocast():
    assert outside_autocast(_seen, torch.ones(2), 7) == (torch.float32, False, 7)


def test_under_autocast_casts_x_and_turns_autocast_off_inside():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert outside_autocast(_seen, torch.ones(2), 7) == (torch.bfloat16, False, 7)
        assert torch.is_autocast_enabled("cpu")  # restored after the call
