"""Range estimators (observers): see a tensor's values, then give its scale and zero_point.

    observer = make_observer("mse", PerChannel(0))       # or MinMaxObserver(PerChannel(0)), ...
    observer.update(x)                                    # any number of times (batches)
    scale, zero_point = observer.qparams(spec)            # shape [] per tensor, [C] per channel

Per channel, every axis but the channel axis is reduced. Each observer estimates a range
`[lo, hi]` (per channel); one rule turns a range into quantization parameters for a `QuantSpec`
(`qparams_from_range`):

    lo, hi     ← min(lo, 0), max(hi, 0)          the range always holds 0, so 0 stays exact
    symmetric:   scale = max(-lo, hi) / qmax                   zero_point = 0
    asymmetric:  scale = (hi - lo) / (qmax - qmin)
                 zero_point = clamp(round(qmin - lo / scale), qmin, qmax)
    pow2:        scale ← 2^round(log2(scale))                  before zero_point is computed
    zero range:  scale = 1.0 where scale would be 0 (or below float32's smallest normal)

Symmetric scales divide by qmax in both range conventions, so narrow int8 [-127, 127] and full
int8 [-128, 127] both map max|x| to 127 (TensorRT's amax / 127). A zero range (a channel that
was all zeros) gets scale 1.0: any scale represents 0 exactly, and 1.0 keeps exported scales
ordinary numbers instead of denormals. scale is float32 (what torch, ONNX and TFLite store),
zero_point int32; the zero_point is computed from the float32 scale.

Power-of-two scales round in the log2 domain, i.e. to the nearest power of two by ratio, as
MQBench's `pot_quantization` does by default (its alternative mode is floor). Rounding keeps the
mismatch within a factor √2 either way; ceil (never clip) can make the step up to 2× coarser,
a whole bit lost, which costs more than clipping the top of a range (the very reason percentile,
MSE and entropy calibration clip). `MSEObserver` under pow2 does not round at all: it searches the
powers of two from ceil downwards directly, like the fix-position searches of Vitis-style tools.

Observers: `MinMaxObserver` (exact running min/max), `PercentileObserver` and `MSEObserver`
(on stored samples, a uniform reservoir sample above `max_samples` per channel),
`EntropyObserver` (TensorRT-style KL calibration on a histogram of |x|, 2048 bins at first).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sciquant.errors import SciquantError
from sciquant.quant.spec import Granularity, PerChannel, PerTensor, QuantSpec, fake_quantize
from sciquant.quant.targets import TARGETS, get_target

__all__ = [
    "DYNAMIC_METHODS",
    "METHODS",
    "METHOD_OBSERVERS",
    "MODES",
    "DEFAULT_QAT_INIT",
    "DynamicMethod",
    "OBSERVERS",
    "QAT_INITS",
    "check_lsq_specs",
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
    "method_observers",
    "qparams_from_range",
]

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_PER_TENSOR = PerTensor()
DEFAULT_MAX_SAMPLES = 1 << 20


#: Modes of a fake-quantized layer, on every framework: float (pass-through), observe (collect
#: ranges), quantize (fake-quant with frozen qparams), lsq (learned step sizes).
MODES = ("float", "observe", "quantize", "lsq", "tqt")

#: Where quantization-aware training starts (config ``quantize.qat.init``) → (activation
#: observer, weight observer) of the calibration before the fine-tuning. ``mse`` (the default):
#: the MSE-optimal clipping of `MSEObserver` for activations and weights; at 4-bit activations
#: a min/max start spends most of its 16 levels on rare outliers, and a short fine-tuning does
#: not recover from it. ``minmax``: the full observed range (the start of studies
#: run with sciquant 0.1.0 before this option; for comparison with them).
QAT_INITS: dict[str, tuple[str, str]] = {"mse": ("mse", "mse"), "minmax": ("minmax", "minmax")}
DEFAULT_QAT_INIT = "mse"  # the schema's default of quantize.qat.init

#: Method → (activation observer, weight observer), shared by the PyTorch and Keras sides.
#: Weights keep min/max except under `ptq-mse`, whose MSE-optimal clipping also suits weights.
#: QAT methods start from `QAT_INITS[DEFAULT_QAT_INIT]` (`method_observers` picks another).
METHOD_OBSERVERS: dict[str, tuple[str, str]] = {
    "ptq-minmax": ("minmax", "minmax"),
    "ptq-percentile": ("percentile", "minmax"),
    "ptq-mse": ("mse", "mse"),
    "ptq-entropy": ("entropy", "minmax"),
    "ptq-adaround": ("mse", "mse"),
    "ptq-biascorr": ("mse", "mse"),
    "ptq-cle": ("minmax", "minmax"),
    "qat-ste": QAT_INITS[DEFAULT_QAT_INIT],
    "qat-lsq": QAT_INITS[DEFAULT_QAT_INIT],
    "qat-tqt": QAT_INITS[DEFAULT_QAT_INIT],
    "qat-degree": QAT_INITS[DEFAULT_QAT_INIT],
}


def method_observers(method: str, qat_init: str | None = None) -> tuple[str, str]:
    """(activation observer, weight observer) of `method` (a `METHOD_OBSERVERS` key); for QAT
    methods `qat_init` (a `QAT_INITS` key; None: `DEFAULT_QAT_INIT`) picks the start."""
    observers = METHOD_OBSERVERS[method]
    if qat_init is None or not method.startswith("qat-"):
        return observers
    if qat_init not in QAT_INITS:
        raise SciquantError(
            f"quantize.qat.init: unknown start {qat_init!r}; use one of {', '.join(QAT_INITS)}"
        )
    return QAT_INITS[qat_init]


@dataclass(frozen=True)
class MethodLimits:
    """Where a calibrated method runs: the model frameworks it is built for and, for methods
    made for one scale grid, the targets' scale kind (e.g. TQT learns power-of-two scales);
    for simulation-only methods (e.g. more than one scale per tensor, which no QDQ graph
    carries), the target backends that run fake-quant (`eager`, `simulated`)."""

    frameworks: frozenset[str]
    scale_kind: str | None = None
    description: str = ""
    backends: frozenset[str] | None = None
    instead: str = "qat-lsq"  # what to use where it does not run


#: Calibrated methods that do not run everywhere (all others take every framework and target).
METHOD_LIMITS: dict[str, MethodLimits] = {
    "ptq-adaround": MethodLimits(
        frameworks=frozenset({"torch", "keras"}),
        description="AdaRound, layer-wise learned rounding",
    ),
    "ptq-biascorr": MethodLimits(
        frameworks=frozenset({"torch", "keras"}), description="empirical bias correction"
    ),
    "ptq-cle": MethodLimits(
        frameworks=frozenset({"torch"}),
        description="cross-layer equalization of MeshGraphNet's MLPs",
        instead="ptq-mse",
    ),
    "qat-lsq": MethodLimits(
        frameworks=frozenset({"torch", "keras"}),
        scale_kind="float",
        description="LSQ, learned step sizes, which leave any power-of-two grid",
        instead="qat-tqt (PyTorch models) or qat-ste",
    ),
    "qat-tqt": MethodLimits(
        frameworks=frozenset({"torch"}),
        scale_kind="pow2",
        description="TQT, trained power-of-two thresholds",
    ),
    "qat-degree": MethodLimits(
        frameworks=frozenset({"torch"}),
        backends=frozenset({"eager", "simulated"}),
        description="Degree-Quant protection and per-node-type activation scales",
    ),
}


def check_method_limits(method: str, target: str, framework: str) -> None:
    """SciquantError unless calibrated `method` runs for a `framework` model on `target`."""
    limits = METHOD_LIMITS.get(method)
    if limits is None:
        return
    if framework not in limits.frameworks:
        raise SciquantError(
            f"method {method} ({limits.description}) takes "
            f"{' and '.join(sorted(limits.frameworks))} models only, not a {framework} model; "
            f"use ptq-mse, ptq-minmax, qat-lsq, ... for it"
        )
    if limits.scale_kind is not None:
        if get_target(target).weight_scheme.scale_kind != limits.scale_kind:
            allowed = sorted(
                name
                for name, row in TARGETS.items()
                if row.weight_scheme.scale_kind == limits.scale_kind
            )
            raise SciquantError(
                f"method {method} ({limits.description}) is for targets with {limits.scale_kind} "
                f"scales ({', '.join(allowed)}), not {target!r}; use {limits.instead} there"
            )
    if limits.backends is not None:
        backend = get_target(target).backend
        if backend not in limits.backends:
            allowed = sorted(
                name for name, row in TARGETS.items() if row.backend in limits.backends
            )
            raise SciquantError(
                f"method {method} ({limits.description}) runs only as fake-quant on targets "
                f"with backend {' or '.join(sorted(limits.backends))} ({', '.join(allowed)}), "
                f"not {target!r} (backend {backend}), whose deployed graph has one scale per "
                f"tensor; use {limits.instead} there"
            )


@dataclass(frozen=True)
class DynamicMethod:
    """A method with no calibration: an engine's kernels take each batch's activation range at
    run time. It exists only where such kernels run: target backends and precisions."""

    description: str
    backends: frozenset[str]
    precisions: frozenset[str]
    frameworks: frozenset[str] = frozenset({"torch"})

    def targets(self) -> list[str]:
        """The targets it runs on (those with one of its backends)."""
        return sorted(name for name, target in TARGETS.items() if target.backend in self.backends)

    def check(self, method: str, target: str, precision: str, framework: str) -> None:
        """SciquantError unless the method runs natively for (target, precision, framework)."""
        if framework not in self.frameworks:
            raise SciquantError(
                f"method {method} ({self.description}) takes "
                f"{' and '.join(sorted(self.frameworks))} models only, not a {framework} model"
            )
        plan = get_target(target).plan(precision, framework)
        if plan.target.backend not in self.backends or str(plan.precision) not in self.precisions:
            raise SciquantError(
                f"method {method} ({self.description}) runs natively only on target "
                f"{', '.join(self.targets())} at precision {', '.join(sorted(self.precisions))}, "
                f"not on {target!r} at {precision}: there is nothing to simulate it with; use a "
                f"calibrated method (ptq-minmax, ...) there"
            )


#: Methods whose activation ranges come from each batch at run time (no observers, no
#: calibration data): `ptq-dynamic` is ONNX Runtime's dynamic INT8
#: (`sciquant.workloads.bloodflow.dynamic`), the seed study's PyTorch `quantize_dynamic` on a
#: maintained engine.
DYNAMIC_METHODS: dict[str, DynamicMethod] = {
    "ptq-dynamic": DynamicMethod(
        description="ONNX Runtime dynamic INT8",
        backends=frozenset({"onnxruntime"}),
        precisions=frozenset({"w8a8"}),
    ),
}

#: Every quantization method of a sweep, in display order: post-training (calibrated, then
#: dynamic), then quantization-aware training. The schema's enum, the cube's order and the
#: workflow's wildcards list these (a test checks that they agree).
METHODS: tuple[str, ...] = (
    *(m for m in METHOD_OBSERVERS if m.startswith("ptq-")),
    *DYNAMIC_METHODS,
    *(m for m in METHOD_OBSERVERS if not m.startswith("ptq-")),
)


def check_lsq_specs(*specs: QuantSpec) -> None:
    """LSQ learns float scales: SciquantError for power-of-two specs (use qat-ste there)."""
    if any(spec.scale_kind == "pow2" for spec in specs):
        raise SciquantError(
            "LSQ learns float scales and would move power-of-two scales off their grid; "
            "use qat-ste for pow2 targets (npu-pow2)"
        )


def qparams_from_range(
    lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero_point (int32) that quantize [lo, hi] under spec.

    lo, hi: real range ends, same shape (any); the outputs have that shape.
    """
    lo, hi = _with_zero(lo, hi)
    scale = _float_scale(lo, hi, spec)
    scale = np.where(scale < _FLOAT32_TINY, 1.0, scale)
    if spec.scale_kind == "pow2":
        scale = np.exp2(np.round(np.log2(scale)))
    scale = scale.astype(np.float32)
    if spec.symmetric:
        zero_point = np.zeros(scale.shape, dtype=np.int32)
    else:
        zero_point = np.clip(np.rint(spec.qmin - lo / scale), spec.qmin, spec.qmax)
        zero_point = zero_point.astype(np.int32)
    return scale, zero_point


def _with_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    return lo, hi


def _float_scale(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The scale before any pow2 rounding or zero-range guard; lo <= 0 <= hi."""
    if spec.symmetric:
        return np.maximum(-lo, hi) / spec.qmax
    return (hi - lo) / (spec.qmax - spec.qmin)


class Observer:
    """Base class: tracks exact per-channel min/max; subclasses estimate the range in `_range`.

    granularity: PerTensor() or PerChannel(axis); `qparams` only accepts specs with the same one.
    """

    def __init__(self, granularity: Granularity = _PER_TENSOR):
        if not isinstance(granularity, PerTensor | PerChannel):
            raise SciquantError(
                f"observer granularity must be PerTensor() or PerChannel(axis), got {granularity!r}"
            )
        self.granularity = granularity
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Add the values of x (float array; per channel its channel axis must keep its size)."""
        rows = _channel_rows(x, self.granularity)
        if rows.shape[1] == 0:
            return
        if not np.all(np.isfinite(rows)):
            raise SciquantError(
                "calibration data holds NaN or inf values; check the checkpoint and the inputs"
            )
        if self.min_val is None:
            self.min_val = rows.min(axis=1).astype(np.float64)
            self.max_val = rows.max(axis=1).astype(np.float64)
        elif rows.shape[0] != self.min_val.shape[0]:
            raise ValueError(
                f"{self.granularity} observer saw {self.min_val.shape[0]} channels before, "
                f"now {rows.shape[0]}"
            )
        else:
            self.min_val = np.minimum(self.min_val, rows.min(axis=1))
            self.max_val = np.maximum(self.max_val, rows.max(axis=1))
        self._accumulate(rows)

    def qparams(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32, zero_point int32), shape [] per tensor or [C] per channel."""
        if spec.granularity != self.granularity:
            raise ValueError(
                f"spec granularity {spec.granularity} differs from the observer's "
                f"{self.granularity}"
            )
        if self.min_val is None:
            raise RuntimeError("the observer has seen no data; call update() first")
        lo, hi = self._range(spec)
        scale, zero_point = qparams_from_range(lo, hi, spec)
        if isinstance(self.granularity, PerTensor):
            return scale.reshape(()), zero_point.reshape(())
        return scale, zero_point

    def _accumulate(self, rows: np.ndarray) -> None:
        """Keep what `_range` needs from rows [C, N]; min/max are already tracked."""

    def _range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """The estimated range (lo [C], hi [C]) for spec."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The exact running minimum and maximum: no clipping."""

    def _range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        return self.min_val, self.max_val


class PercentileObserver(Observer):
    """Clip at a percentile: of |x| when symmetric, at (100 - p, p) of x when asymmetric.

    Exact (np.percentile, linear interpolation) on up to `max_samples` values per channel; beyond
    that on a uniform reservoir sample of that size (for p = 99.99 and 2^20 samples, about 100
    values lie above the estimate).
    """

    def __init__(
        self,
        granularity: Granularity = _PER_TENSOR,
        percentile: float = 99.99,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ):
        super().__init__(granularity)
        if not 50.0 < percentile <= 100.0:
            raise SciquantError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self._samples = _Reservoir(max_samples)

    def _accumulate(self, rows: np.ndarray) -> None:
        self._samples.add(rows)

    def _range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        samples = self._samples.samples()
        if spec.symmetric:
            amax = np.percentile(np.abs(samples), self.percentile, axis=1)
            return -amax, amax
        lo = np.percentile(samples, 100.0 - self.percentile, axis=1)
        hi = np.percentile(samples, self.percentile, axis=1)
        return lo, hi


class MSEObserver(Observer):
    """The clipping range minimizing the mean squared fake-quantization error on the data.

    Candidates are fractions f of the full range (min/max, with 0 included): (f·lo, f·hi),
    f = 1.00, 0.99, ..., 0.01, each judged by the spec's own quantizer on the stored samples
    (as `PercentileObserver`: all values up to `max_samples` per channel, a reservoir sample
    beyond). Under pow2 the candidates are the powers of two from 2^ceil(log2 s) (no clipping)
    down to 1 % of s, s the min/max scale. Ties go to the wider range. Per channel, each channel
    picks its own.

    Cost: a channel with many more samples than grid levels is sorted once; each candidate's
    error then follows from prefix sums of x and x² over the runs of sorted values that round
    to the same level (bin k holds n values with sums S1, S2: its squared error is
    S2 - 2·c·S1 + n·c², c its grid value), so a candidate costs O(levels · log N) instead of a
    fake-quantization of all N samples. Channels with few samples are fake-quantized per
    candidate. Both give the same errors up to float rounding.
    """

    fractions = np.linspace(1.0, 0.01, 100)
    #: Sorted prefix sums are used where a channel has more than this many samples per level.
    sorted_threshold = 4

    def __init__(
        self, granularity: Granularity = _PER_TENSOR, max_samples: int = DEFAULT_MAX_SAMPLES
    ):
        super().__init__(granularity)
        self._samples = _Reservoir(max_samples)

    def _accumulate(self, rows: np.ndarray) -> None:
        self._samples.add(rows)

    def _range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        samples = self._samples.samples()
        lo, hi = _with_zero(self.min_val, self.max_val)
        rows_spec = replace(spec, granularity=PerChannel(0))
        candidates = self._candidates(lo, hi, spec)  # [F] or [F, C]
        fractions = np.broadcast_to(
            candidates.reshape(len(candidates), -1), (len(candidates), lo.size)
        )
        qparams = [qparams_from_range(f * lo, f * hi, rows_spec) for f in fractions]
        scales = np.stack([scale for scale, _ in qparams])  # [F, C] float32
        zero_points = np.stack([zero_point for _, zero_point in qparams])  # [F, C] int32
        levels = spec.qmax - spec.qmin + 1
        if samples.shape[1] > self.sorted_threshold * levels:
            mse = np.stack(
                [
                    _grid_mse_sorted(row, scales[:, c], zero_points[:, c], spec)
                    for c, row in enumerate(samples)
                ],
                axis=1,
            )
        else:
            mse = np.stack(
                [
                    np.mean(
                        np.square(
                            fake_quantize(samples, scale, zero_point, rows_spec) - samples,
                            dtype=np.float64,
                        ),
                        axis=1,
                    )
                    for scale, zero_point in qparams
                ]
            )
        best = np.argmin(mse, axis=0)  # the first minimum: the widest of tied candidates
        best_fraction = fractions[best, np.arange(lo.size)]
        return best_fraction * lo, best_fraction * hi

    def _candidates(self, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
        """Fractions of the full range, widest first: [F] (float) or [F, C] (pow2)."""
        if spec.scale_kind != "pow2":
            return self.fractions
        scale = _float_scale(lo, hi, spec)
        scale = np.where(scale < _FLOAT32_TINY, 1.0, scale)
        exponent = np.ceil(np.log2(scale))
        steps = int(np.ceil(-np.log2(self.fractions[-1]))) + 1
        powers = np.exp2(exponent[None, :] - np.arange(steps)[:, None])
        return powers / scale


def _grid_mse_sorted(
    values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """Mean squared fake-quantization error of `values` (one channel, [N]) under each of F
    candidate grids (scales [F], zero points [F]): [F] float64.

    Value x lands on level k = clip(rint(x / s) + z, qmin, qmax), grid value c_k = (k - z)·s;
    the boundary between levels k and k + 1 is (k - z + 1/2)·s. With x sorted, each level's
    values are one run, and its error is S2 - 2·c_k·S1 + n·c_k² from prefix sums (float64).
    A value exactly on a boundary has the same error on either side.
    """
    x = np.sort(values.astype(np.float64))
    first = np.concatenate(([0.0], np.cumsum(x)))
    second = np.concatenate(([0.0], np.cumsum(x * x)))
    scales = scales.astype(np.float64)[:, None]  # the float32 scales, exactly
    offsets = np.arange(spec.qmin, spec.qmax + 1, dtype=np.float64)[None, :] - zero_points[
        :, None
    ].astype(np.float64)  # k - z: [F, L]
    centers = offsets * scales
    bounds = np.searchsorted(x, (offsets[:, :-1] + 0.5) * scales)  # [F, L - 1]
    count = len(x)
    starts = np.concatenate((np.zeros((len(scales), 1), dtype=bounds.dtype), bounds), axis=1)
    ends = np.concatenate((bounds, np.full((len(scales), 1), count, dtype=bounds.dtype)), axis=1)
    n = ends - starts
    s1 = first[ends] - first[starts]
    s2 = second[ends] - second[starts]
    squared = np.maximum(s2 - 2.0 * centers * s1 + n * centers * centers, 0.0)
    return squared.sum(axis=1) / max(count, 1)


class EntropyObserver(Observer):
    """TensorRT-style calibration: the |x| threshold minimizing KL(P || Q) on a histogram of |x|.

    Histogram (per channel; exact zeros left out, they are exact under every scale): the first
    nonzero batch sets the bin width to max|x| / `bins` (2048); larger values later add bins of
    that width, as TensorRT's calibrator does, so outliers arriving later do not coarsen the
    bulk. Beyond `max_bins` (32 × 2048) neighbouring bins merge pairwise and the width doubles,
    an exact re-binning. A first batch that already holds far outliers leaves the bulk in few
    bins, as in TensorRT; the search then cannot clip inside the bulk.

    Search: for a threshold of i bins (i = levels .. last occupied bin), P = the first i bins
    with all counts beyond added to bin i - 1, normalized by the total; Q = the first i bins
    merged into `levels` groups (bin j in group floor(j · levels / i)), each group's count
    spread evenly over its nonempty bins, normalized. KL(P || Q) is infinite where P > 0 = Q
    (clipping into an empty bin). The smallest KL wins (ties: the larger threshold); the
    threshold is i bin widths, never beyond max|x|. levels = qmax + 1 for symmetric specs (128
    for int8). Asymmetric specs search |x| with levels = (qmax - qmin + 1) // 2 (128 for uint8)
    and clip [min x, max x] to [-threshold, threshold]. Cost per channel: O(candidates · levels)
    with prefix sums, well under a second.
    """

    def __init__(
        self, granularity: Granularity = _PER_TENSOR, bins: int = 2048, max_bins: int = 1 << 16
    ):
        super().__init__(granularity)
        if bins < 2 or bins % 2 or max_bins < bins or max_bins % bins:
            raise SciquantError(
                "EntropyObserver needs an even bins >= 2 and max_bins a multiple of bins, "
                f"got bins={bins!r}, max_bins={max_bins!r}"
            )
        self._histogram = _MagnitudeHistogram(bins, max_bins)

    def _accumulate(self, rows: np.ndarray) -> None:
        self._histogram.add(rows)

    def _range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        if spec.symmetric:
            levels = spec.qmax + 1
        else:
            levels = (spec.qmax - spec.qmin + 1) // 2
        histogram = self._histogram
        kept_bins = np.array([_kl_threshold_bins(counts, levels) for counts in histogram.counts])
        amax = np.maximum(np.abs(self.min_val), np.abs(self.max_val))
        threshold = np.minimum(kept_bins * histogram.width, amax)
        if spec.symmetric:
            return -threshold, threshold
        return np.maximum(self.min_val, -threshold), np.minimum(self.max_val, threshold)


#: Calibration method name → observer class (config methods `ptq-<name>`).
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(method: str, granularity: Granularity, **options: object) -> Observer:
    """A new observer for `method` (`minmax`, `percentile`, `mse`, `entropy`, or `ptq-<name>`)."""
    name = method.removeprefix("ptq-") if isinstance(method, str) else method
    if name not in OBSERVERS:
        known = ", ".join(OBSERVERS)
        raise SciquantError(
            f"unknown calibration method {method!r}; known: {known} (also as ptq-<name>)"
        )
    return OBSERVERS[name](granularity, **options)


def _channel_rows(x: np.ndarray, granularity: Granularity) -> np.ndarray:
    """x as [C, N]: C channels (1 per tensor), N values each."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    axis = granularity.axis
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"PerChannel axis {axis} is out of range for a {x.ndim}-d tensor")
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


class _Reservoir:
    """A uniform sample of at most `capacity` columns of all [C, N] rows added (Algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise SciquantError(f"max_samples must be a positive int, got {capacity!r}")
        self.capacity = int(capacity)
        self.seen = 0
        self._chunks: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        room = self.capacity - self.seen
        if room > 0:
            self._chunks.append(np.array(rows[:, :room]))
            self.seen += min(room, rows.shape[1])
            rows = rows[:, room:]
        if rows.shape[1] == 0:
            return
        samples = self.samples()
        position = self.seen + np.arange(rows.shape[1])
        slot = self._rng.integers(0, position + 1)
        kept = slot < self.capacity
        samples[:, slot[kept]] = rows[:, kept]
        self.seen += rows.shape[1]

    def samples(self) -> np.ndarray:
        """The stored sample, [C, min(seen, capacity)]."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks, axis=1)]
        return self._chunks[0]


class _MagnitudeHistogram:
    """Counts of nonzero |x| in bins [k·width, (k+1)·width) per channel: counts [C, n], width [C].

    A channel's largest value so far lies in its last needed bin (closed at the top).
    """

    def __init__(self, bins: int, max_bins: int):
        self.bins = bins
        self.max_bins = max_bins
        self.counts: np.ndarray | None = None
        self.width: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        magnitude = np.abs(rows.astype(np.float64))
        amax = magnitude.max(axis=1)
        channels = magnitude.shape[0]
        if self.counts is None:
            self.counts = np.zeros((channels, self.bins))
            self.width = np.zeros(channels)
        fresh = (self.width == 0) & (amax > 0)
        self.width[fresh] = amax[fresh] / self.bins
        needed = self._fit(amax)
        width = np.where(self.width > 0, self.width, 1.0)[:, None]
        index = np.minimum(np.floor(magnitude / width), np.maximum(needed, 1)[:, None] - 1)
        flat = np.arange(channels)[:, None] * self.counts.shape[1] + index.astype(np.int64)
        flat = flat[magnitude > 0]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def _fit(self, amax: np.ndarray) -> np.ndarray:
        """Make room for values up to amax [C]; returns the bins each channel needs for them."""
        needed = self._bins_for(amax)
        while np.any(crowded := needed > self.max_bins):
            merged = self.counts[crowded].reshape(crowded.sum(), -1, 2).sum(axis=2)
            self.counts[crowded] = np.concatenate([merged, np.zeros_like(merged)], axis=1)
            self.width[crowded] *= 2.0
            needed = self._bins_for(amax)
        columns = self.counts.shape[1]
        if needed.max() > columns:
            wanted = min(self.max_bins, -(-int(needed.max()) // self.bins) * self.bins)
            padding = np.zeros((self.counts.shape[0], wanted - columns))
            self.counts = np.concatenate([self.counts, padding], axis=1)
        return needed

    def _bins_for(self, amax: np.ndarray) -> np.ndarray:
        """ceil(amax / width), with ratios within rounding error of an integer taken as it."""
        ratio = amax / np.where(self.width > 0, self.width, 1.0)
        nearest = np.rint(ratio)
        exact = np.abs(ratio - nearest) <= 1e-9 * nearest
        return np.where(exact, nearest, np.ceil(ratio)).astype(np.int64)


def _kl_threshold_bins(counts: np.ndarray, levels: int) -> int:
    """How many bins of `counts` [n] to keep so that KL(P || Q) is smallest (ties: more)."""
    occupied = np.flatnonzero(counts)
    if occupied.size == 0:
        return 0
    used = int(occupied[-1]) + 1
    if used <= levels:
        return used
    kept, divergence = _kl_divergences(counts[:used], levels)
    best = divergence.size - 1 - int(np.argmin(divergence[::-1]))
    return int(kept[best])


def _kl_divergences(
    counts: np.ndarray, levels: int, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate i = levels .. n kept bins: (i [m], divergence [m]).

    With c the counts, N their total, S = c[0] + ... + c[i-1], and groups g of m_g counts over
    n_g nonempty bins, Q = m_g / (n_g · S) on every nonempty bin of group g, and without the
    outliers folded into bin i - 1:
        KL = sum_j (c_j / N) log(c_j / N) - sum_g (m_g / N) log(m_g / (n_g · S)),
    both sums from prefix sums, O(levels) per candidate; the last bin is then corrected for the
    N - S outliers P gains there.
    """
    total = counts.sum()
    mass = np.concatenate([[0.0], np.cumsum(counts)])
    nonempty = np.concatenate([[0], np.cumsum(counts > 0)])
    c_log_c = np.concatenate([[0.0], np.cumsum(counts * np.log(np.where(counts > 0, counts, 1)))])
    candidates = np.arange(levels, counts.size + 1)
    divergence = [
        _kl_block(counts, mass, nonempty, c_log_c, candidates[start : start + block], levels, total)
        for start in range(0, candidates.size, block)
    ]
    return candidates, np.concatenate(divergence)


def _kl_block(
    counts: np.ndarray,
    mass: np.ndarray,
    nonempty: np.ndarray,
    c_log_c: np.ndarray,
    kept: np.ndarray,
    levels: int,
    total: float,
) -> np.ndarray:
    """`_kl_divergences` for the candidates `kept` [m], from the prefix sums."""
    start = (np.arange(levels + 1)[None, :] * kept[:, None] + levels - 1) // levels
    group_mass = np.diff(mass[start], axis=1)
    group_size = np.diff(nonempty[start], axis=1)
    kept_mass = mass[kept]
    outliers = total - kept_mass
    last = counts[kept - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = group_mass / (group_size * kept_mass[:, None])
        p_log_q = np.where(group_mass > 0, group_mass * np.log(q), 0.0).sum(axis=1)
        p_log_p = c_log_c[kept] - kept_mass * np.log(total)
        divergence = (p_log_p - p_log_q) / total
        q_last = q[:, -1] * total
        folded = (last + outliers) * np.log((last + outliers) / q_last)
        correction = (folded - last * np.log(last / q_last)) / total
        divergence = np.where(outliers > 0, divergence + correction, divergence)
    divergence = np.where((outliers > 0) & (last == 0), np.inf, divergence)
    return np.where(np.isfinite(divergence), divergence, np.inf)
