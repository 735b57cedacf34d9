"""The data factory named in ../train.toml as ``[data] factory = "mypkg.data:load"``.

Two Gaussian blobs per class in ``dim`` dimensions, drawn from ``seed`` (nothing downloaded). Any
``torch.utils.data.Dataset`` of ``(input tensor, integer class)`` samples works the same way.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def load(seed: int, n: int = 2000, dim: int = 16, classes: int = 4):
    """Returns ``(train, test, loss)``; ``seed`` comes from ``[data] seed``, ``n``, ``dim``, ``classes`` from
    ``[data.options]``. The loss is optional (cross-entropy by default) and must return the batch mean."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.6 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    split = int(0.8 * n)
    train = TensorDataset(x[:split], y[:split])
    train.num_classes = classes  # optional: saves dpengine a pass over the labels
    return train, TensorDataset(x[split:], y[split:]), nn.CrossEntropyLoss(label_smoothing=0.05)
