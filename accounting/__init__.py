"""Renyi DP accounting for DP-SGD (numpy/scipy only; never imports torch).

Installed as ``dpengine.accounting``. The mechanism accounted for is the Poisson-subsampled
Gaussian (add/remove-one adjacency, noise std ``noise_multiplier * C`` for clipping norm ``C``).

>>> from dpengine.accounting import RDPAccountant, get_noise_multiplier
>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14063)
>>> round(acc.get_epsilon(delta=1e-5), 4)
2.5966
"""

from .accountants import ACCOUNTANTS, Accountant, PLDAccountant, PRVAccountant, RDPAccountant, create_accountant, register_accountant
from .calibration import epochs_to_steps, get_epsilon, get_max_steps, get_noise_multiplier, get_sample_rate
from .rdp import DEFAULT_ORDERS, classic_epsilon, compute_epsilon, compute_rdp, epsilon_from_rdp, rdp_subsampled_gaussian

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "Accountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "classic_epsilon",
    "compute_epsilon",
    "compute_rdp",
    "create_accountant",
    "epochs_to_steps",
    "epsilon_from_rdp",
    "get_epsilon",
    "get_max_steps",
    "get_noise_multiplier",
    "get_sample_rate",
    "rdp_subsampled_gaussian",
    "register_accountant",
]
