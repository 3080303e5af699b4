"""sciquant.data."""
