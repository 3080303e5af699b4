"""Keras 3 (TensorFlow backend) as a classifier runner, with batch-1 latency split into parts.

    runner = KerasRunner("model.keras", threads=2)
    probabilities = runner.predict(x)        # (N, n_classes) float32
    runner.time_batch1(x, repeats=50)        # {"h2d_ms": ..., "compute_ms": ..., ...}

Inference runs through one `tf.function` (a traced graph, no XLA) instead of eager
`model(x)`: eager execution dispatches every layer from Python, which for a small CNN costs
more than the arithmetic and would make the latency mostly Python overhead. The graph is traced
once per input shape (batch 1 and the prediction batch size), during warm-up.

The runner has the same interface as `sciquant.runtime.litert.LiteRTRunner`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError
from sciquant.runtime.latency import batch1_latency

__all__ = ["KerasRunner", "configure_threads", "load_keras_model"]


def configure_threads(threads: int | None) -> None:
    """Limit TensorFlow's intra-op pool to `threads` (inter-op to 1); None leaves TF's default.

    TensorFlow fixes its thread pools when its runtime starts (the first op); after that the
    setting cannot change, and this prints a note instead of failing.
    """
    if not threads:
        return
    import tensorflow as tf

    try:
        if tf.config.threading.get_intra_op_parallelism_threads() != threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        if tf.config.threading.get_inter_op_parallelism_threads() != 1:
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        print(f"TensorFlow already started; keeping its {current or 'default'} threads")


def load_keras_model(path: Path) -> Any:
    """Load a `.keras` file (FP32 or fake-quantized); errors name the file and the fix.

    A fake-quantized file holds sciquant's own layers, which Keras finds once
    `sciquant.quant.keras` is imported (it registers them): the callers that load such files
    import it (this runtime layer does not reach up into the quantization code).
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise SciquantError(f"{path}: Keras model not found; run the stage that writes it first")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # zipfile, h5py, json and Keras all raise their own types
        first = (str(error).splitlines() or [""])[0][:200]
        if "sciquant" in str(error) and "sciquant.quant.keras" not in sys.modules:
            raise SciquantError(
                f"{path}: a fake-quantized Keras model; its layers are registered by "
                "sciquant.quant.keras: import it before loading the file"
            ) from error
        raise SciquantError(
            f"{path}: not a readable Keras model ({type(error).__name__}: {first}); delete it "
            "and rerun the stage that writes it"
        ) from error


class KerasRunner:
    """Runs a Keras classifier on CPU through a traced `tf.function`.

    model_or_path: a `keras.Model` or the path of a `.keras` file; threads: TensorFlow's
    intra-op threads (only effective before TensorFlow's runtime has started).
    """

    name = "keras"

    def __init__(self, model_or_path: Any, threads: int | None = None) -> None:
        configure_threads(threads)
        import tensorflow as tf

        if isinstance(model_or_path, str | os.PathLike):
            self.path: Path | None = Path(model_or_path)
            self.model = load_keras_model(self.path)
        else:
            self.path = None
            self.model = model_or_path
        self.threads = threads
        model = self.model
        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model.inputs[0].shape[1:])

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, n_classes) float32, computed `batch_size` frames at a time."""
        import tensorflow as tf

        x = np.asarray(x, dtype=np.float32)
        outputs = []
        for start in range(0, len(x), batch_size):
            batch = tf.convert_to_tensor(x[start : start + batch_size])
            outputs.append(np.asarray(self._call(batch), dtype=np.float32))
        if not outputs:
            n_classes = int(self.model.outputs[0].shape[-1])
            return np.zeros((0, n_classes), np.float32)
        return np.concatenate(outputs)

    def time_batch1(self, x: np.ndarray, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
        """Batch-1 latency over `repeats` single frames (cycling through `x`) after `warmup` runs.

        Medians in milliseconds of, on CPU:
          - h2d_ms: `tf.convert_to_tensor` of the numpy frame (a copy into a TensorFlow-owned
            buffer; there is no device transfer on CPU),
          - compute_ms: the traced graph's execution up to its output tensor (eager TensorFlow
            on CPU runs synchronously, so the call returns when the result is computed),
          - d2h_ms: output tensor → numpy (`.numpy()`, a small copy on CPU),
          - total_ms: the three together, timed as one interval; total_ms_min / total_ms_max its
            spread, repeats the number of timed runs.
        """
        import tensorflow as tf

        def time_one(frame: np.ndarray) -> dict[str, float]:
            t0 = time.perf_counter()
            tensor = tf.convert_to_tensor(frame)
            t1 = time.perf_counter()
            output = self._call(tensor)
            t2 = time.perf_counter()
            output.numpy()
            t3 = time.perf_counter()
            return {
                "h2d_ms": (t1 - t0) * 1e3,
                "compute_ms": (t2 - t1) * 1e3,
                "d2h_ms": (t3 - t2) * 1e3,
            }

        return batch1_latency(time_one, np.asarray(x, dtype=np.float32), repeats, warmup)
