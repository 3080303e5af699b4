"""sciquant.evaluate."""
