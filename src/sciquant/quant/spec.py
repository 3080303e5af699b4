"""How one tensor is quantized (`QuantSpec`), the affine quantizer itself, and `Precision`.

This is the framework-independent core: NumPy only, shared by the PyTorch and Keras sides.

The affine quantizer
--------------------
A real tensor `x` is represented by integers `x_q` in `[qmin, qmax]` and two quantization
parameters, `scale > 0` (real units per integer step) and `zero_point` (the integer that
represents real 0, so that 0 is exact and zero padding costs nothing):

    x_q = clamp(round(x / scale) + zero_point, qmin, qmax)        quantize
    x̂   = (x_q - zero_point) * scale                              dequantize
    fake_quantize(x) = x̂                                          both, staying in floating point

`round` is round half to even (`np.rint`), as in `torch.fake_quantize_per_*_affine` and ONNX
`QuantizeLinear`. Values outside `[(qmin - zero_point) * scale, (qmax - zero_point) * scale]`
clip to its ends; inside it the error is at most `scale / 2`.

Integer range (`QuantSpec.qmin`, `QuantSpec.qmax`) for `bits = b`:

    signed:                 [-2^(b-1),      2^(b-1) - 1]     int8: [-128, 127]
    signed, narrow_range:   [-(2^(b-1) - 1), 2^(b-1) - 1]    int8: [-127, 127]  (TensorRT weights)
    unsigned:               [0,             2^b - 1]         uint8: [0, 255]
    unsigned, narrow_range: [1,             2^b - 1]         uint8: [1, 255]

`narrow_range` always drops the lowest code (TensorFlow's convention). `signed` defaults to
`symmetric`: symmetric specs are int (zero_point = 0), asymmetric ones uint (zero_point in
[qmin, qmax]); asymmetric signed int8 is TFLite's activation format, and symmetric unsigned
(zero_point 0, [0, 2^b - 1]) suits non-negative tensors such as ReLU outputs.

Granularity: `PerTensor()` uses one `scale`/`zero_point` (shape `[]`); `PerChannel(axis)` one per
index along `axis` (shape `[C]`, `C = x.shape[axis]`), broadcast along that axis. Scale constraint
(`scale_kind`): `"float"` is any positive float32, `"pow2"` a power of two (DPU-style shifts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sciquant.errors import SciquantError
from sciquant.vocabulary import section_with_defaults

__all__ = [
    "Granularity",
    "PerChannel",
    "PerTensor",
    "Precision",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "parse_precision",
    "quantize",
]

MIN_BITS, MAX_BITS = 2, 16
WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = range(4, 9)
_SCALE_KINDS = ("float", "pow2")
_INT_PRECISION = re.compile(r"w([1-9][0-9]*)a([1-9][0-9]*)")


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero_point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero_point per index along `axis` (negative counts from the end)."""

    axis: int

    def __post_init__(self) -> None:
        if not _is_int(self.axis):
            raise SciquantError(f"PerChannel.axis must be an int, got {self.axis!r}")


Granularity = PerTensor | PerChannel


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bits, symmetry, granularity, scale constraint, range.

    `signed=None` resolves to `symmetric` at construction, so `spec.signed` is always a bool.
    """

    bits: int
    symmetric: bool
    granularity: Granularity
    scale_kind: Literal["float", "pow2"] = "float"
    narrow_range: bool = False
    signed: bool | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise SciquantError(
                f"QuantSpec.bits must be an int in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}"
            )
        for field in ("symmetric", "narrow_range"):
            if not isinstance(getattr(self, field), bool):
                raise SciquantError(
                    f"QuantSpec.{field} must be True or False, got {getattr(self, field)!r}"
                )
        if not isinstance(self.granularity, PerTensor | PerChannel):
            raise SciquantError(
                "QuantSpec.granularity must be PerTensor() or PerChannel(axis), "
                f"got {self.granularity!r}"
            )
        if self.scale_kind not in _SCALE_KINDS:
            raise SciquantError(
                f"QuantSpec.scale_kind must be one of {', '.join(_SCALE_KINDS)}, "
                f"got {self.scale_kind!r}"
            )
        if self.signed is None:
            object.__setattr__(self, "signed", self.symmetric)
        elif not isinstance(self.signed, bool):
            raise SciquantError(
                f"QuantSpec.signed must be True, False or None, got {self.signed!r}"
            )

    @property
    def qmin(self) -> int:
        """Lowest integer code (see the module docstring for the four conventions)."""
        lowest = -(2 ** (self.bits - 1)) if self.signed else 0
        return lowest + 1 if self.narrow_range else lowest

    @property
    def qmax(self) -> int:
        """Highest integer code: 2^(b-1) - 1 signed, 2^b - 1 unsigned."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """`x_q = clamp(round(x / scale) + zero_point, qmin, qmax)`, as int32.

    x: float array, any shape; scale, zero_point: shape [] (PerTensor) or [C] (PerChannel,
    C = x.shape[axis]). Computed in x's float dtype (float32 stays float32, like the runtimes).
    """
    x = _as_float(x)
    scale_b, zero_point_b = _broadcast_qparams(x, scale, zero_point, spec)
    x_q = np.rint(x / scale_b.astype(x.dtype)) + zero_point_b
    return np.clip(x_q, spec.qmin, spec.qmax).astype(np.int32)


def dequantize(
    x_q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """`x̂ = (x_q - zero_point) * scale`, in scale's float dtype (float32 or float64).

    x_q: integer array, any shape; scale, zero_point: as for `quantize`.
    """
    x_q = np.asarray(x_q)
    scale_b, zero_point_b = _broadcast_qparams(x_q, scale, zero_point, spec)
    dtype = np.result_type(scale_b.dtype, np.float32)
    return (x_q.astype(np.int64) - zero_point_b).astype(dtype) * scale_b.astype(dtype)


def fake_quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """`dequantize(quantize(x))`: the value x takes on the integer grid, in x's float dtype.

    x: float array, any shape; scale, zero_point: as for `quantize`.
    """
    x = _as_float(x)
    scale_b, zero_point_b = _broadcast_qparams(x, scale, zero_point, spec)
    scale_b, zero_point_b = scale_b.astype(x.dtype), zero_point_b.astype(x.dtype)
    x_q = np.clip(np.rint(x / scale_b) + zero_point_b, spec.qmin, spec.qmax)
    return (x_q - zero_point_b) * scale_b


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _broadcast_qparams(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Reshape scale and zero_point so they broadcast against x along spec's channel axis."""
    scale = np.asarray(scale)
    zero_point = np.asarray(zero_point)
    if scale.shape != zero_point.shape:
        raise ValueError(
            f"scale shape {scale.shape} and zero_point shape {zero_point.shape} differ"
        )
    if not np.issubdtype(scale.dtype, np.floating):
        scale = scale.astype(np.float64)
    if not np.all(scale > 0):
        raise ValueError("scale must be positive everywhere")
    if isinstance(spec.granularity, PerTensor):
        if scale.size != 1:
            raise ValueError(f"PerTensor needs one scale, got shape {scale.shape}")
        return scale.reshape(()), zero_point.reshape(()).astype(np.int64)
    axis = spec.granularity.axis
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"PerChannel axis {axis} is out of range for a {x.ndim}-d tensor")
    channels = x.shape[axis]
    if scale.shape != (channels,):
        raise ValueError(
            f"PerChannel(axis={axis}) needs scale of shape ({channels},), got {scale.shape}"
        )
    shape = [1] * x.ndim
    shape[axis] = channels
    return scale.reshape(shape), zero_point.reshape(shape).astype(np.int64)


@dataclass(frozen=True)
class Precision:
    """A run's precision: `fp32`, `fp16`, `bf16`, or `wXaY` (X-bit weights, Y-bit activations).

    kind "float": weight_bits == activation_bits in {16, 32}, `bfloat` True for bfloat16 (8
    exponent bits, 7 mantissa bits; `fp16` is IEEE half); kind "int": weight_bits in 2..8,
    activation_bits in 4..8. `str(precision)` gives back the string `parse_precision` reads.
    """

    kind: Literal["float", "int"]
    weight_bits: int
    activation_bits: int
    bfloat: bool = False

    def __post_init__(self) -> None:
        if not (_is_int(self.weight_bits) and _is_int(self.activation_bits)):
            raise SciquantError(
                "Precision.weight_bits and activation_bits must be ints, got "
                f"{self.weight_bits!r} and {self.activation_bits!r}"
            )
        if self.kind == "float":
            if self.weight_bits not in (16, 32) or self.activation_bits != self.weight_bits:
                raise SciquantError(
                    "a float Precision has weight_bits == activation_bits in {16, 32}, got "
                    f"{self.weight_bits} and {self.activation_bits}"
                )
            if self.bfloat and self.weight_bits != 16:
                raise SciquantError("bfloat is a 16-bit format (bf16)")
        elif self.kind == "int":
            if self.bfloat:
                raise SciquantError("an integer Precision is not bfloat")
            if self.weight_bits not in WEIGHT_BITS or self.activation_bits not in ACTIVATION_BITS:
                raise SciquantError(f"precision {self._name()!r} is out of range: {_ALLOWED}")
        else:
            raise SciquantError(f"Precision.kind must be 'float' or 'int', got {self.kind!r}")

    def _name(self) -> str:
        if self.kind == "float":
            return "bf16" if self.bfloat else f"fp{self.weight_bits}"
        return f"w{self.weight_bits}a{self.activation_bits}"

    def __str__(self) -> str:
        return self._name()


_ALLOWED = (
    f"allowed are fp32, fp16, bf16 and wXaY with weight bits X in {WEIGHT_BITS.start}.."
    f"{WEIGHT_BITS.stop - 1} and activation bits Y in {ACTIVATION_BITS.start}.."
    f"{ACTIVATION_BITS.stop - 1} (e.g. w8a8, w4a8)"
)


def parse_precision(text: str) -> Precision:
    """Read `fp32`, `fp16`, `bf16` or `wXaY` (lower case, no leading zeros) into a `Precision`."""
    if text == "bf16":
        return Precision(kind="float", weight_bits=16, activation_bits=16, bfloat=True)
    if text in ("fp32", "fp16"):
        bits = int(text[2:])
        return Precision(kind="float", weight_bits=bits, activation_bits=bits)
    match = _INT_PRECISION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise SciquantError(f"precision {text!r} is not understood: {_ALLOWED}")
    weight_bits, activation_bits = int(match[1]), int(match[2])
    if weight_bits not in WEIGHT_BITS or activation_bits not in ACTIVATION_BITS:
        raise SciquantError(f"precision {text!r} is out of range: {_ALLOWED}")
    return Precision(kind="int", weight_bits=weight_bits, activation_bits=activation_bits)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


#: The config key of Degree-Quant's protection probabilities (`sciquant.quant.degree`).
DEGREE_PROTECTION_KEY = "quantize.qat.degree_protection"


def protection_settings(qat: Mapping[str, Any] | None) -> tuple[float, float]:
    """(p_min, p_max) of the config's ``quantize.qat`` section, the schema's defaults for what it
    leaves out; SciquantError naming the key unless 0 <= p_min <= p_max <= 1."""
    section = dict((qat or {}).get("degree_protection") or {})
    unknown = sorted(set(section) - {"p_min", "p_max"})
    if unknown:
        raise SciquantError(
            f"config key {DEGREE_PROTECTION_KEY}: unknown setting(s) {', '.join(unknown)}; known: "
            "p_min, p_max"
        )
    filled = section_with_defaults({"qat": {"degree_protection": section}}, "quantize", "quantize")
    protection = filled["qat"]["degree_protection"]
    p_min, p_max = float(protection["p_min"]), float(protection["p_max"])
    if not 0.0 <= p_min <= p_max <= 1.0:
        raise SciquantError(
            f"config key {DEGREE_PROTECTION_KEY}: need 0 <= p_min <= p_max <= 1, got "
            f"p_min={p_min}, p_max={p_max}"
        )
    return p_min, p_max
