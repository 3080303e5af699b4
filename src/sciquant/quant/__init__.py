"""sciquant.quant."""
