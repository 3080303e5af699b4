"""The ICNNMD convolutional classifier of per-frame pixel maps (Li et al., JCIM 2022).

The layer sequence follows the paper's network (the Keras CIFAR-10 example layout), as written
in REFERENCE.md:

    Conv2D 32 3×3 same → Conv2D 32 3×3 valid → ReLU → MaxPool 2 → Dropout 0.25
    → Conv2D 64 3×3 same → ReLU → Conv2D 64 3×3 valid → ReLU → MaxPool 2 → Dropout 0.25
    → Flatten → Dense 512 → ReLU → Dropout 0.5 → Dense n_classes → softmax

The first convolution has no activation of its own (as in the reference). Activations are
separate `Activation` layers, so the model is made only of `Conv2D`, `MaxPooling2D`, `Dropout`,
`Flatten`, `Dense`, `Activation` (what the Keras quantization code wraps generically).

Every kernel initializer and every dropout layer gets its own seed derived from `seed`, so the
initial weights and the dropout masks do not depend on any global random state.
"""

from __future__ import annotations

import keras
import numpy as np

from sciquant.errors import SciquantError

__all__ = [
    "MIN_GRID",
    "build_icnnmd",
    "count_parameters",
    "icnnmd_parameters",
    "model_bytes",
    "spatial_sizes",
]

#: The smallest pixel-map side length: two valid 3×3 convolutions and two 2×2 poolings must
#: leave at least one pixel.
MIN_GRID = 10


def spatial_sizes(grid: int) -> tuple[int, int]:
    """Side lengths after the first and after the second pooling stage."""
    first = (grid - 2) // 2
    second = (first - 2) // 2
    return first, second


def build_icnnmd(grid: int, channels: int = 3, n_classes: int = 2, *, seed: int = 0) -> keras.Model:
    """The ICNNMD CNN for (grid, grid, channels) pixel maps with softmax over `n_classes`.

    Raises SciquantError if `grid` is below MIN_GRID (the pixel map of a molecule with fewer
    than 82 atoms); the message says what to change.
    """
    if grid < MIN_GRID:
        raise SciquantError(
            f"pixel-map grid {grid}×{grid} is too small for the ICNNMD network (needs at least "
            f"{MIN_GRID}×{MIN_GRID}, i.e. {(MIN_GRID - 1) ** 2 + 1} atoms); select more atoms in "
            "the dataset's preparation settings"
        )
    if channels < 1 or n_classes < 2:
        raise SciquantError(f"ICNNMD needs channels >= 1 and n_classes >= 2 (got {channels}, "
                            f"{n_classes}); check the prepared data's labels")  # fmt: skip
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def conv(filters: int, padding: str, name: str) -> keras.layers.Conv2D:
        return keras.layers.Conv2D(
            filters,
            (3, 3),
            padding=padding,
            kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
            name=name,
        )

    def dense(units: int, name: str) -> keras.layers.Dense:
        return keras.layers.Dense(
            units, kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)), name=name
        )

    def dropout(rate: float, name: str) -> keras.layers.Dropout:
        return keras.layers.Dropout(rate, seed=next(seeds), name=name)

    inputs = keras.Input((grid, grid, channels), name="pixelmap")
    x = conv(32, "same", "conv1")(inputs)
    x = conv(32, "valid", "conv2")(x)
    x = keras.layers.Activation("relu", name="relu2")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool1")(x)
    x = dropout(0.25, "dropout1")(x)
    x = conv(64, "same", "conv3")(x)
    x = keras.layers.Activation("relu", name="relu3")(x)
    x = conv(64, "valid", "conv4")(x)
    x = keras.layers.Activation("relu", name="relu4")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool2")(x)
    x = dropout(0.25, "dropout2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = dense(512, "dense1")(x)
    x = keras.layers.Activation("relu", name="relu5")(x)
    x = dropout(0.5, "dropout3")(x)
    x = dense(n_classes, "logits")(x)
    outputs = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inputs, outputs, name="icnnmd")


def icnnmd_parameters(grid: int, channels: int = 3, n_classes: int = 2) -> int:
    """The parameter count of `build_icnnmd(grid, channels, n_classes)`, computed by hand."""
    _, side = spatial_sizes(grid)
    conv = (9 * channels + 1) * 32 + (9 * 32 + 1) * 32 + (9 * 32 + 1) * 64 + (9 * 64 + 1) * 64
    dense = (side * side * 64 + 1) * 512 + (512 + 1) * n_classes
    return conv + dense


def count_parameters(model: keras.Model) -> int:
    """Trainable plus non-trainable weights (ICNNMD has only trainable ones)."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def model_bytes(model: keras.Model) -> int:
    """Bytes the model's weights take in memory at their dtypes (float32: 4 per parameter)."""
    total = 0
    for weight in model.weights:
        total += int(np.prod(weight.shape)) * np.dtype(weight.dtype).itemsize
    return total
