"""sciquant.models."""
