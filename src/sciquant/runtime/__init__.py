"""sciquant.runtime."""
