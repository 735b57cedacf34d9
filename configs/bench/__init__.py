"""Default configs for ``dpengine train`` and ``dpengine bench`` (installed as ``dpengine.configs``)."""
