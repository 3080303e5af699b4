"""sciquant.report."""
