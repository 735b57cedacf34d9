"""The model factory named in ../train.toml as ``[model] factory = "mypkg.models:build"``."""

from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """dpengine passes ``input_shape`` and ``num_classes`` (because they are named here) and ``width`` from
    ``[model.options]``. A factory that needs nothing can be a plain ``def build(): return MyNet()``."""
    (d_in,) = input_shape
    return nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, num_classes))
