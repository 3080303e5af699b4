"""sciquant.benchmarks: micro-benchmarks of the model implementations."""
