"""LiteRT (TFLite) as a classifier runner, with batch-1 latency split into parts.

    runner = LiteRTRunner("model.tflite", threads=1)
    probabilities = runner.predict(x)        # (N, n_classes) float32
    runner.time_batch1(x, repeats=50)        # {"h2d_ms": ..., "compute_ms": ..., ...}

The interpreter is ``ai_edge_litert.interpreter.Interpreter`` (``tf.lite.Interpreter`` is
deprecated). With ``xnnpack=True`` (default) it applies its default delegate, XNNPACK, which runs
FP32, FP16-weight and INT8 (QS8) convolutions and fully-connected layers; ``xnnpack=False`` uses
the built-in kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``). Integer models: a float input
is quantized with the input tensor's (scale, zero_point) (the arithmetic of
`sciquant.quant.spec.quantize`: round half to even, clamped to the int8 range) and an integer
output is dequantized with the output tensor's; float models take and return float32 directly.
The batch dimension is resized per call (``resize_tensor_input``), so models converted with a
dynamic batch serve any batch size.

Same interface as `sciquant.runtime.keras.KerasRunner`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError
from sciquant.runtime.latency import batch1_latency

__all__ = ["LiteRTRunner"]

_INTEGER_TYPES = {
    np.dtype(np.int8): (8, True),
    np.dtype(np.uint8): (8, False),
    np.dtype(np.int16): (16, True),
}


class _Endpoint:
    """One input or output tensor: its index, dtype, and (scale, zero_point, spec) if integer."""

    def __init__(self, detail: dict[str, Any]) -> None:
        self.index = int(detail["index"])
        self.dtype = np.dtype(detail["dtype"])
        self.shape = tuple(int(v) for v in detail["shape"])
        self.signature = tuple(int(v) for v in detail.get("shape_signature", detail["shape"]))
        scale, zero_point = detail.get("quantization", (0.0, 0))
        self.integer = self.dtype in _INTEGER_TYPES
        if self.integer:
            if not scale:
                raise SciquantError(
                    f"tensor {detail['name']!r} is {self.dtype.name} without a scale; not a "
                    "quantized TFLite model this runner understands"
                )
            limits = np.iinfo(self.dtype)  # the full range of the tensor's integer type
            self.qmin, self.qmax = int(limits.min), int(limits.max)
            self.scale = np.float32(scale)
            self.zero_point = np.int32(zero_point)

    def to_tensor(self, x: np.ndarray) -> np.ndarray:
        """Float → the tensor's dtype: `sciquant.quant.spec.quantize`'s arithmetic (x / scale in
        float32, round half to even, + zero_point, clamp), in place to keep batch-1 cheap."""
        if not self.integer:
            return np.asarray(x, dtype=self.dtype)
        q = np.divide(x, self.scale, dtype=np.float32)
        np.rint(q, out=q)
        q += np.float32(self.zero_point)
        np.clip(q, self.qmin, self.qmax, out=q)
        return q.astype(self.dtype)

    def from_tensor(self, y: np.ndarray) -> np.ndarray:
        """The tensor → float32: `sciquant.quant.spec.dequantize`, (y - zero_point) · scale."""
        if not self.integer:
            return np.asarray(y, dtype=np.float32)
        out = y.astype(np.float32)
        out -= np.float32(self.zero_point)
        out *= self.scale
        return out

    def summary(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"dtype": self.dtype.name, "shape": list(self.signature)}
        if self.integer:
            entry.update(scale=float(self.scale), zero_point=int(self.zero_point))
        return entry


class LiteRTRunner:
    """Runs a .tflite classifier with the LiteRT interpreter on CPU.

    path: the .tflite file; threads: the interpreter's threads (None: its default);
    xnnpack: apply the default XNNPACK delegate (see the module docstring).
    """

    name = "litert"

    def __init__(self, path: Path, threads: int | None = None, *, xnnpack: bool = True) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.path = Path(path)
        self.threads = threads
        self.xnnpack = xnnpack
        if not self.path.is_file():
            raise SciquantError(f"{self.path}: TFLite model not found; run the quantize stage")
        with self.path.open("rb") as handle:
            head = handle.read(8)
        if len(head) < 8 or head[4:8] != b"TFL3":
            raise SciquantError(
                f"{self.path}: not a TFLite flatbuffer (no TFL3 identifier); delete it and rerun "
                "the quantize stage"
            )
        resolver = (
            OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
        try:
            self.interpreter = Interpreter(
                model_path=str(self.path),
                num_threads=threads,
                experimental_op_resolver_type=resolver,
            )
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise SciquantError(
                f"{self.path}: LiteRT cannot load the model ({str(error).strip()[:300]}); delete "
                "it and rerun the quantize stage"
            ) from error
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise SciquantError(
                f"{self.path}: expected one input and one output tensor, found {len(inputs)} and "
                f"{len(outputs)}"
            )
        self._input = _Endpoint(inputs[0])
        self._output = _Endpoint(outputs[0])
        self._batch = self._input.shape[0]
        self._precision = self._detect_precision()

    # description

    @property
    def precision(self) -> str:
        """``int8`` (integer input), ``fp16`` (float16 weights) or ``fp32``."""
        return self._precision

    @property
    def input_details(self) -> dict[str, Any]:
        """The input tensor: dtype, shape (-1 = dynamic), scale and zero_point if integer."""
        return self._input.summary()

    @property
    def output_details(self) -> dict[str, Any]:
        return self._output.summary()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input.signature[1:]

    def _detect_precision(self) -> str:
        if self._input.integer:
            return "int8" if self._input.dtype == np.int8 else self._input.dtype.name
        dtypes = {np.dtype(d["dtype"]) for d in self.interpreter.get_tensor_details()}
        return "fp16" if np.dtype(np.float16) in dtypes else "fp32"

    # running

    def _resize(self, batch: int) -> None:
        if batch == self._batch:
            return
        shape = [batch, *self._input.shape[1:]]
        try:
            self.interpreter.resize_tensor_input(self._input.index, shape, strict=False)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise SciquantError(
                f"{self.path}: cannot run a batch of {batch} ({str(error).strip()[:200]}); was "
                "the model converted with a fixed batch size?"
            ) from error
        self._batch = batch

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != len(self._input.shape) or tuple(x.shape[1:]) != self._input.shape[1:]:
            raise SciquantError(
                f"{self.path}: input of shape {x.shape} does not fit the model's "
                f"{('N', *self._input.shape[1:])}"
            )
        return x

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, n_classes) float32, computed `batch_size` frames at a time."""
        x = self._check_input(x)
        if batch_size < 1:
            raise SciquantError(f"batch_size must be at least 1 (got {batch_size})")
        outputs = []
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            self._resize(len(batch))
            self.interpreter.set_tensor(self._input.index, self._input.to_tensor(batch))
            self.interpreter.invoke()
            outputs.append(
                self._output.from_tensor(self.interpreter.get_tensor(self._output.index))
            )
        if not outputs:
            return np.zeros((0, *self._output.shape[1:]), np.float32)
        return np.concatenate(outputs)

    def time_batch1(self, x: np.ndarray, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
        """Batch-1 latency over `repeats` single frames (cycling through `x`) after `warmup` runs.

        Medians in milliseconds of:
          - h2d_ms: quantizing the float frame (integer models) and ``set_tensor`` (a copy into
            the interpreter's input buffer; there is no device on CPU),
          - compute_ms: ``invoke``,
          - d2h_ms: ``get_tensor`` (a copy) and dequantizing (integer models),
          - total_ms: the three together, timed as one interval; total_ms_min / total_ms_max its
            spread, repeats the number of timed runs.
        """
        self._resize(1)
        interpreter, source, sink = self.interpreter, self._input, self._output

        def time_one(frame: np.ndarray) -> dict[str, float]:
            t0 = time.perf_counter()
            interpreter.set_tensor(source.index, source.to_tensor(frame))
            t1 = time.perf_counter()
            interpreter.invoke()
            t2 = time.perf_counter()
            sink.from_tensor(interpreter.get_tensor(sink.index))
            t3 = time.perf_counter()
            return {
                "h2d_ms": (t1 - t0) * 1e3,
                "compute_ms": (t2 - t1) * 1e3,
                "d2h_ms": (t3 - t2) * 1e3,
            }

        return batch1_latency(time_one, self._check_input(x), repeats, warmup)
