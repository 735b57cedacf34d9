"""Renyi DP accounting (numpy/scipy only; never imports torch). Installed as ``dpengine.accounting``."""
