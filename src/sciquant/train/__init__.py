"""sciquant.train."""
