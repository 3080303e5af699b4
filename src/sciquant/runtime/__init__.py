"""sciquant.runtime: one runner per backend, each a rollout StepFunction that records timings.

`sciquant.runtime.onnxruntime.OrtStep` runs an ONNX model (FP32 or QDQ INT8) on ONNX Runtime's CPU
execution provider; every runner reports per-call timings ``h2d``, ``compute``, ``d2h`` (ms).
"""
