"""A user's own model and data for `dpengine train` (see ../train.toml)."""
