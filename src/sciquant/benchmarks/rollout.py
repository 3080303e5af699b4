"""`sciquant bench rollout`: one rollout step of the blood-flow MeshGraphNet on every runtime.

Variants, timed interleaved (round robin: every repeat runs each variant once on the same
inputs, so load drifts hit all alike), medians of wall time per step:

    fp32-torch     the FP32 model, eager PyTorch (inference mode)
    fp32-ort       its ONNX export (`export_onnx`) on ONNX Runtime's CPU EP (`OrtStep`)
    int8-ort       a W8A8 fake-quant model (target cpu-x86, ptq-minmax, calibrated with
                   `quant.pytorch.calibrate`) exported as QDQ ONNX (`export_qdq_onnx`)
    trt-fp16/int8  TensorRT (`runtime.tensorrt.TrtStep`; INT8 from a trt-rtx3090 QDQ export),
                   only where `runtime.tensorrt.available()`
    ov-fp32        OpenVINO's CPU plugin (`runtime.openvino.OvStep`) on the FP32 export,
                   compiled for the case's graph size (static shapes, as a rollout deploys it)
    ov-bf16        the same graph under OpenVINO's bf16 hint, where the CPU has AMX-BF16 or
                   AVX-512-BF16 (elsewhere left out: OpenVINO would run FP32 and call it bf16)
    ov-int8        OpenVINO on a QDQ graph with int8 weights (our scales; its FakeQuantize
                   fusion): quantized for openvino-cpu where the CPU has VNNI, else for
                   openvino-avx2 (7-bit weights: full-range ones saturate there)

Per variant: median step time, the full-rollout equivalent (median x the rollout's steps; the
state update between steps, identical for all, is not included), speedups vs FP32 torch, vs
FP32 ORT and vs its own runtime's FP32 (the paired speed-up a study's report shows for that
target) side by side, each variant's speed-up paired with FP32 ORT (the two alone, interleaved,
each turn a block of consecutive steps as a rollout runs them: `_pair_variants`) and the
deployment goals it is judged by (`verdicts`), agreement with its reference (FP32 torch; for
INT8 the fake-quant model it was exported from, in output quantization steps, see
`_int8_agreement`), and for the ORT variants the time split by operator from ONNX Runtime's
profiler (`operator_split`).

Extras (``extras=True``; on the first case only, which is the test-set-sized one):

- ``fp32-ort-textbook``: the FP32 model exported with ``concat_trick=False``. The QDQ export
  cannot use the concat trick (a quantized Linear is not a plain ``nn.Linear``), so INT8 runs
  Concat + a [E, 3H] GEMM where FP32 gathers [N, H] projections; this row is FP32 on INT8's
  graph structure, separating "integer kernels" from "more work".
- ORT levers, each on FP32 and INT8: gather aggregation (`rewrite_scatter_add`, the TensorRT
  form), two intra-op threads (with gather aggregation: ONNX Runtime's ScatterND with
  reduction=add races between threads and returns wrong sums, microsoft/onnxruntime#18048,
  #23396), spinning off, graph optimization level basic / extended, IO binding (static inputs
  bound once). A lever "helps" when it is >= 5 % faster than its precision's base row and its
  outputs still agree; the table lists those as rows and the others in a footnote.

Without ``prepared`` / ``checkpoint``: random weights (bloodflow hyper-parameters) on random
trees: ``test-batch`` = 13 trees of 60-120 nodes as one disjoint graph (the size of a batched
test set) and ``big`` = 20,000 nodes; rollouts of `DEFAULT_ROLLOUT_STEPS` steps. With them: the
trained FP32 model on the real batched test graph at its first step (``test-set``, rollouts of
the test set's own length) and on a 20,000-node random tree (``big``), calibration on training
samples as in the quantize stage.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.export import export_qdq_onnx
from sciquant.quant.pytorch import QuantizedModel, calibrate, quantize_model
from sciquant.runtime.onnxruntime import OrtStep, cpu_has_vnni
from sciquant.runtime.paired import cpu_name
from sciquant.runtime.tensorrt import INCOMING_EDGES, incoming_edges, rewrite_scatter_add

__all__ = [
    "DEFAULT_ROLLOUT_STEPS",
    "GOAL_FASTEST",
    "GOAL_INT8_LARGEST",
    "cpu_name",
    "format_table",
    "operator_split",
    "rollout_block",
    "run",
    "verdicts",
]

DEFAULT_ROLLOUT_STEPS = 100  # random-graph mode: a test simulation has ~80-120 steps
DEFAULT_CASES: dict[str, Sequence[int]] = {
    "test-batch": tuple(int(n) for n in np.random.default_rng(0).integers(60, 121, 13)),
    "big": (20000,),
}
_HELPS = 0.95  # a lever helps when its median is below 95 % of the base row's
_FP32_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}  # relative to max |reference output|
_INT8_MEDIAN_STEPS = 1e-3  # INT8 vs its fake-quant model, in output steps (`_int8_agreement`)
_INT8_WITHIN_STEP = 0.99
#: The pairs against FP32 ONNX Runtime time each turn as this many ms or more of consecutive
#: steps of one variant (at most `_MAX_BLOCK` steps), as a rollout calls one model step after
#: step: its weights stay in cache between steps. One call per turn between other models
#: (the round robin) evicts them, which costs a small graph's fast variants most.
_BLOCK_MS = 20.0
_MAX_BLOCK = 8
#: Deployment goals the table's verdict lines measure against: the fastest variant that
#: agrees with its reference, and the best INT8 one on the largest case, paired with FP32 ORT.
GOAL_FASTEST = 2.0
GOAL_INT8_LARGEST = 1.3
Inputs = tuple[Tensor, Tensor, Tensor]


# -- host facts --------------------------------------------------------------------------------


# -- ONNX Runtime sessions, profiles -----------------------------------------------------------


def _session(
    path: Path,
    threads: int,
    spinning: bool = True,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    profile_prefix: Path | None = None,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, inputs: Inputs) -> dict[str, np.ndarray]:
    """Numpy feeds by input name, converted to the session's dtypes; incoming_edges if needed."""
    x, e, edge_index = inputs
    values = {"node_features": x, "edge_features": e, "edge_index": edge_index}
    feeds = {}
    for value in session.get_inputs():
        if value.name == INCOMING_EDGES:
            array = incoming_edges(edge_index, x.shape[0]).numpy()
        else:
            array = values[value.name].detach().cpu().numpy()
        dtype = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}.get(value.type, np.float32)
        feeds[value.name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return feeds


def operator_split(
    onnx_path: str | Path,
    inputs: Inputs,
    runs: int = 3,
    threads: int = 1,
    top: int = 8,
    work_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Share of ONNX Runtime kernel time per op type, largest first; the rest as ``other``.

    One warm-up run, then `runs` profiled runs (SessionOptions.enable_profiling) on `inputs`;
    the profiler's ``*_kernel_time`` events are summed per ``op_name`` (op types after graph
    optimization, e.g. QGemm, FusedGemm). Each entry: ``op``, ``pct`` (of summed kernel time;
    the entries add up to 100), ``ms`` (per run).
    """
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        session = _session(Path(onnx_path), threads, profile_prefix=Path(folder) / "profile")
        feeds = _feeds(session, inputs)
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[1] if len(starts) > 1 else 0  # drop the warm-up run
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if (
            event.get("cat") == "Node"
            and event.get("name", "").endswith("_kernel_time")
            and event["ts"] >= cutoff
        ):
            totals[event.get("args", {}).get("op_name", "?")] += event["dur"]
    total = sum(totals.values())
    if total <= 0:
        raise SciquantError(f"ONNX Runtime's profile of {onnx_path} holds no kernel times")
    ranked = totals.most_common()
    shown = ranked[:top] + ([("other", sum(d for _, d in ranked[top:]))] if ranked[top:] else [])
    count = max(len(starts) - 1, 1)
    return [
        {"op": op, "pct": 100.0 * duration / total, "ms": duration / 1e3 / count}
        for op, duration in shown
    ]


class _BoundStep:
    """An ONNX model as a StepFunction through IO binding: static inputs bound once as
    OrtValues (re-bound when another tensor object comes), output into a reused buffer."""

    STATIC = ("edge_features", "edge_index", INCOMING_EDGES)

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.output = session.get_outputs()[0].name
        self._bound: dict[str, Any] = {}
        self._buffer: np.ndarray | None = None

    def __call__(self, x: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        key = (id(e), e._version, id(edge_index), edge_index._version)
        if self._bound.get("key") != key:
            feeds = _feeds(self.session, (x, e, edge_index))
            for name in self.STATIC:
                if name in feeds:
                    value = ort.OrtValue.ortvalue_from_numpy(feeds[name])
                    self._bound[name] = value  # keep it alive while bound
                    self.binding.bind_ortvalue_input(name, value)
            self._bound["key"] = key
            self._bound["sources"] = (e, edge_index)  # ids stay unique while referenced
        nodes = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        self.binding.bind_cpu_input("node_features", nodes)
        rows = nodes.shape[0]
        if self._buffer is None or self._buffer.shape[0] != rows:
            width = self.session.get_outputs()[0].shape[1]
            self._buffer = np.empty((rows, width), dtype=np.float32)
        self.binding.bind_output(
            self.output, "cpu", 0, np.float32, self._buffer.shape, self._buffer.ctypes.data
        )
        self.session.run_with_iobinding(self.binding)
        return torch.from_numpy(self._buffer.copy())


class _SessionStep:
    """An ONNX Runtime session as a StepFunction (feeds rebuilt per call, as OrtStep does)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self._table: tuple[Tensor, int, np.ndarray] | None = None

    def __call__(self, x: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        feeds = {}
        for value in self.session.get_inputs():
            if value.name == INCOMING_EDGES:
                feeds[value.name] = self._incoming(edge_index, x.shape[0])
            elif value.name == "edge_index":
                dtype = np.int32 if value.type == "tensor(int32)" else np.int64
                feeds[value.name] = edge_index.numpy().astype(dtype, copy=False)
            else:
                feeds[value.name] = (x if value.name == "node_features" else e).numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def _incoming(self, edge_index: Tensor, num_nodes: int) -> np.ndarray:
        # computed once per graph (static during a rollout), as TrtStep does
        if self._table is None or self._table[0] is not edge_index:
            self._table = (edge_index, num_nodes, incoming_edges(edge_index, num_nodes).numpy())
        return self._table[2]


# -- variants and artifacts --------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    runtime: str
    precision: str
    step: Callable[[Tensor, Tensor, Tensor], Tensor]
    reference: str  # "fp32" (the FP32 torch output) or a fake-quant model key
    lever: str | None = None
    base: str | None = None  # the base variant a lever is compared with
    onnx: Path | None = None  # profiled for the operator split when set
    threads: int = 1
    note: str = ""
    outputs: dict[str, Tensor] = field(default_factory=dict)


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Mapping):
            for key in sorted(part):
                value = part[key]
                digest.update(key.encode())
                if isinstance(value, Tensor):
                    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
                else:  # e.g. a QuantLinear's extra state (mode, calibrated)
                    digest.update(repr(value).encode())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def _export_fp32(model: MeshGraphNet, folder: Path, concat_trick: bool) -> Path:
    """The FP32 export, reused from `folder` when the same weights were exported before."""
    from sciquant.models.meshgraphnet import export_onnx

    key = _digest(model.state_dict(), model.config, concat_trick)
    path = folder / f"fp32-{'trick' if concat_trick else 'textbook'}-{key}.onnx"
    if not path.is_file():
        export_onnx(model, path.with_suffix(".partial.onnx"), concat_trick=concat_trick)
        os.replace(path.with_suffix(".partial.onnx"), path)
    return path


def _export_qdq(qmodel: QuantizedModel, folder: Path, example: Inputs) -> Path:
    key = _digest(qmodel.state_dict(), qmodel.target.name, str(qmodel.precision), cpu_has_vnni())
    path = folder / f"w8a8-{qmodel.target.name}-{key}.onnx"
    if not path.is_file():
        # int8 storage for TensorRT and OpenVINO (uint8 weights are decompressed to FP32 there)
        weight_dtype = "int8" if qmodel.target.backend in ("tensorrt", "openvino") else None
        partial = path.with_suffix(".partial.onnx")
        export_qdq_onnx(qmodel, partial, example, weight_dtype=weight_dtype)
        os.replace(partial, path)
    return path


def _one_output_step(qmodel: QuantizedModel) -> Tensor:
    """Per output column j: s_in * sum_k |W_hat[j, k]| of the last quantized decoder Linear.

    How far output j moves when every input code of that layer moves by one step: the bound
    for two runtimes that do the same integer arithmetic with the same qparams and differ in
    float rounding only (summation order, x/s vs x*(1/s)), which can flip single codes.
    """
    decoder = [
        layer for name, layer in qmodel.quant_linears().items() if name.startswith("decoder")
    ]
    if not decoder:
        raise SciquantError("the quantized model has no quantized decoder layer to bound with")
    last = decoder[-1]
    with torch.no_grad():
        scale, _ = last.input_qparams()
        return scale * last.fake_quantize_weight().abs().sum(dim=1)


def _int8_agreement(steps: Tensor) -> dict[str, float]:
    """How an INT8 runtime's outputs differ from its fake-quant model, in output steps.

    Both do the same integer arithmetic with the same qparams and integer weights; they differ
    in float rounding (summation order, x/s vs x*(1/s)), which flips activation codes that lie
    within float rounding of a tie. A flip moves an output by up to one step
    (`_one_output_step`) when it happens in the last layer; earlier, it propagates through the
    blocks behind it and can flip more codes there, so a few outputs move by more than a step
    (measured on 1.1 k and 20 k node graphs with the bloodflow model: 0.04-0.09 % beyond one
    step, at most 2.4 steps; the quantization error itself is 0.28 steps median, 3 max). The
    check is therefore statistical: the median output agrees to float rounding (<= 1e-3 step:
    a systematic difference, e.g. a wrong scale, zero point or rounding mode, moves every
    output) and at least 99 % of outputs lie within one step.
    """
    flat = steps.flatten().double()
    return {
        "median_error_steps": float(flat.median()),
        "frac_within_step": float((flat <= 1.0).double().mean()),
        "max_error_steps": float(flat.max()),
    }


def _random_case(sizes: Sequence[int], seed: int, config: MeshGraphNetConfig) -> Inputs:
    """Random trees of the given node counts as one disjoint graph."""
    xs, es, indices, offset = [], [], [], 0
    for i, n in enumerate(sizes):
        x, e, edge_index = random_tree_graph(
            int(n), seed + i, config.node_features, config.edge_features
        )
        xs.append(x)
        es.append(e)
        indices.append(edge_index + offset)
        offset += int(n)
    return torch.cat(xs), torch.cat(es), torch.cat(indices, dim=1)


def _prepared_setup(
    prepared: Path, checkpoint: Path, calibration_samples: int = 8, steps: int = 16
) -> tuple[MeshGraphNet, dict[str, tuple[Inputs, int]], list[Inputs]]:
    """The trained model, the batched test graph at step 0 (+ its steps), calibration inputs."""
    from sciquant.workloads.bloodflow.data import load_index
    from sciquant.workloads.bloodflow.evaluate import test_graphs
    from sciquant.workloads.bloodflow.features import Normalizer, merge_graphs, true_state_inputs
    from sciquant.workloads.bloodflow.quantize import calibration_inputs, is_quantized
    from sciquant.workloads.bloodflow.train import load_graphs, load_model

    if is_quantized(checkpoint):
        raise SciquantError(
            f"{checkpoint} is a quantized model; bench rollout takes the FP32 checkpoint.pt and "
            "quantizes it itself"
        )
    model, state = load_model(checkpoint)
    norm = Normalizer.of_checkpoint(state)
    merged, _ = merge_graphs(test_graphs(prepared, norm))
    x, _, _ = true_state_inputs(merged, 0, norm)
    train = load_index(prepared)["samples"]["train"][:calibration_samples]
    calibration = list(calibration_inputs(load_graphs(prepared, train, norm), steps, norm))
    cases = {"test-set": ((x, merged.edge_features, merged.edge_index), merged.num_steps - 1)}
    # The deployment-size case: the trained weights on a 20,000-node random tree (random
    # features: its time, not its accuracy, is what this case measures).
    config = model.config
    cases["big"] = (_random_case(DEFAULT_CASES["big"], 0, config), DEFAULT_ROLLOUT_STEPS)
    return model.eval(), cases, calibration


# -- timing ------------------------------------------------------------------------------------


def _time_interleaved(
    variants: Sequence[_Variant], inputs: Inputs, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall-clock ms per step; the variants take turns, so slow drifts hit all of them."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for variant in variants:
                start = time.perf_counter()
                variant.step(*inputs)
                elapsed = (time.perf_counter() - start) * 1e3
                if round_ >= warmup:
                    times[variant.name].append(elapsed)
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _torch_step(model: torch.nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def step(x: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x, e, edge_index)

    return step


def _ort_levers(
    fp32: Path, int8: Path, threads: int, folder: Path
) -> list[tuple[str, str, Callable[[], Any]]]:
    """(lever, precision, step factory) for every lever, FP32 and INT8."""
    other = 2 if threads == 1 else 1
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    gathered = {
        "fp32": rewrite_scatter_add(fp32, folder / f"{fp32.stem}-gather.onnx"),
        "int8": rewrite_scatter_add(int8, folder / f"{int8.stem}-gather.onnx"),
    }
    plain = {"fp32": fp32, "int8": int8}
    levers = []
    for precision in ("fp32", "int8"):
        g, p = gathered[precision], plain[precision]
        levers += [
            ("gather aggregation", precision, lambda g=g: _SessionStep(_session(g, threads))),
            (f"{other} threads + gather", precision, lambda g=g: _SessionStep(_session(g, other))),
            (
                f"{other} threads + gather, no spinning",
                precision,
                lambda g=g: _SessionStep(_session(g, other, spinning=False)),
            ),
            (
                "opt level basic",
                precision,
                lambda p=p: _SessionStep(_session(p, threads, level=basic)),
            ),
            (
                "opt level extended",
                precision,
                lambda p=p: _SessionStep(_session(p, threads, level=extended)),
            ),
            ("IO binding", precision, lambda p=p: _BoundStep(_session(p, threads))),
        ]
    return levers


def _trt_variants(
    fp32: Path, trt_int8: Path, inputs: Inputs, cache_dir: Path | None
) -> list[_Variant]:
    from sciquant.runtime.tensorrt import TrtStep, graph_dims

    x, e, edge_index = inputs
    dims = graph_dims(edge_index, x.shape[0])
    variants = []
    for precision, path, reference in (("fp16", fp32, "fp32"), ("int8", trt_int8, "trt")):
        for resident in (False, True):
            step = TrtStep.from_onnx(
                path, precision=precision, cache_dir=cache_dir, keep_on_device=resident, **dims
            )
            name = f"trt-{precision}"
            variants.append(
                _Variant(
                    name=name + ("-resident" if resident else ""),
                    runtime="tensorrt",
                    precision=precision,
                    step=_resident(step) if resident else step,
                    reference=reference,
                    lever="device-resident state" if resident else None,
                    base=name if resident else None,
                )
            )
    return variants


def _openvino_variants(
    fp32: Path, int8: Path, int8_target: str, inputs: Inputs, threads: int
) -> list[_Variant]:
    """ov-fp32, ov-bf16 (bf16 hosts only) and ov-int8 (`int8`, quantized for `int8_target`),
    compiled for these inputs' shapes."""
    from sciquant.runtime.openvino import OvStep, available, bf16_native

    if not available()[0]:
        return []
    names = ("node_features", "edge_features", "edge_index")
    shapes = {name: tuple(value.shape) for name, value in zip(names, inputs, strict=True)}
    chosen = [("ov-fp32", fp32, "fp32", "fp32"), ("ov-int8", int8, "w8a8", int8_target)]
    if bf16_native():
        chosen.insert(1, ("ov-bf16", fp32, "bf16", "fp32"))
    return [
        _Variant(
            name,
            "openvino",
            precision,
            OvStep(path, precision, threads, shapes=shapes),
            reference,
            threads=threads,
            note=f"quantized for {reference}" if precision == "w8a8" else "",
        )
        for name, path, precision, reference in chosen
    ]


def _resident(step: Callable) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Inputs already on the GPU and the output kept there (a GPU-resident rollout state)."""
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def run(x: Tensor, e: Tensor, edge_index: Tensor) -> Tensor:
        if id(x) not in cache:  # moved once, outside the timed region of later calls
            cache.clear()
            cache[id(x)] = (x, x.cuda())
            cache[id(e)] = (e, e.cuda())
            cache[id(edge_index)] = (edge_index, edge_index.cuda())
        return step(cache[id(x)][1], cache[id(e)][1], cache[id(edge_index)][1])

    return run


# -- the bench ---------------------------------------------------------------------------------


def run(
    prepared: Path | None = None,
    checkpoint: Path | None = None,
    repeats: int = 10,
    threads: int = 1,
    work_dir: Path | None = None,
    *,
    cases: Mapping[str, Sequence[int]] | None = None,
    config: MeshGraphNetConfig | None = None,
    extras: bool = True,
    warmup: int = 2,
    profile_runs: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time every variant on every case; one row per (case, variant) (module docstring).

    prepared, checkpoint: the prepared dataset and an FP32 checkpoint.pt (both or neither).
    threads: intra-op threads of torch and ONNX Runtime. work_dir: where the ONNX files (and
    TensorRT engines) go; reused between runs; default a temporary folder. cases (random mode
    only): name -> node counts of the trees merged into that case's graph. config: model
    hyper-parameters in random mode (default: bloodflow's). extras: the textbook-FP32 row and
    the ORT levers on the first case. Row keys: see `format_table` and the tests.
    """
    if (prepared is None) != (checkpoint is None):
        raise SciquantError("bench rollout takes --prepared and --checkpoint together, or neither")
    if repeats < 1:
        raise SciquantError(f"repeats must be at least 1, got {repeats}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    temporary = tempfile.TemporaryDirectory() if work_dir is None else None
    folder = Path(temporary.name if temporary else work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run(
            prepared,
            checkpoint,
            repeats,
            threads,
            folder,
            temporary is None,
            cases,
            config,
            extras,
            warmup,
            profile_runs,
            seed,
        )
    finally:
        torch.set_num_threads(previous_threads)
        if temporary is not None:
            temporary.cleanup()


def _run(
    prepared: Path | None,
    checkpoint: Path | None,
    repeats: int,
    threads: int,
    folder: Path,
    keep_engines: bool,
    cases: Mapping[str, Sequence[int]] | None,
    config: MeshGraphNetConfig | None,
    extras: bool,
    warmup: int,
    profile_runs: int,
    seed: int,
) -> list[dict[str, Any]]:
    """`run` in its work folder (arguments as there)."""
    from sciquant.runtime.tensorrt import available

    if prepared is not None:
        model, graphs, calibration = _prepared_setup(Path(prepared), Path(checkpoint))
        source = f"trained model {checkpoint}, test set of {prepared}"
    else:
        config = config or MeshGraphNetConfig()
        torch.manual_seed(seed)
        model = MeshGraphNet(config).eval()
        chosen = dict(cases or DEFAULT_CASES)
        graphs = {
            name: (_random_case(sizes, seed + 1000 * i, config), DEFAULT_ROLLOUT_STEPS)
            for i, (name, sizes) in enumerate(chosen.items())
        }
        calibration = [
            random_tree_graph(300, seed + 100 + i, config.node_features, config.edge_features)
            for i in range(4)
        ]
        source = (
            f"random weights (hidden {config.hidden}, {config.processor_size} processor blocks), "
            "random trees"
        )
    config = model.config
    example = random_tree_graph(64, seed, config.node_features, config.edge_features)
    qmodels = {"cpu-x86": calibrate(quantize_model(model, "cpu-x86", "w8a8"), calibration)}
    fp32_path = _export_fp32(model, folder, concat_trick=True)
    int8_path = _export_qdq(qmodels["cpu-x86"], folder, example)
    # OpenVINO INT8 from int8 weights: full range where the CPU has VNNI, else the 7-bit range
    # of openvino-avx2 (full-range weights saturate there, `sciquant.runtime.openvino`)
    ov_target = "openvino-cpu" if cpu_has_vnni() else "openvino-avx2"
    qmodels[ov_target] = calibrate(quantize_model(model, ov_target, "w8a8"), calibration)
    ov_int8_path = _export_qdq(qmodels[ov_target], folder, example)
    gpu, gpu_reason = available()
    trt_int8_path = None
    if gpu:
        qmodels["trt"] = calibrate(quantize_model(model, "trt-rtx3090", "w8a8"), calibration)
        trt_int8_path = _export_qdq(qmodels["trt"], folder, example)

    rows: list[dict[str, Any]] = []
    from sciquant.runtime.paired import cpu_features, int8_class

    features = cpu_features()
    host = {
        "cpu": cpu_name(),
        "cpu_features": features,
        "int8_class": int8_class(features),
        "vnni": cpu_has_vnni(),
        "gpu": gpu_reason,
        "source": source,
        "int8_weight_storage": "int8" if cpu_has_vnni() else "uint8",
    }
    for index, (case, (inputs, steps)) in enumerate(graphs.items()):
        variants = [
            _Variant("fp32-torch", "torch", "fp32", _torch_step(model), "fp32", threads=threads),
            _Variant(
                "fp32-ort",
                "onnxruntime",
                "fp32",
                OrtStep(fp32_path, threads),
                "fp32",
                onnx=fp32_path,
                threads=threads,
            ),
            _Variant(
                "int8-ort",
                "onnxruntime",
                "w8a8",
                OrtStep(int8_path, threads),
                "cpu-x86",
                onnx=int8_path,
                threads=threads,
            ),
        ]
        if extras and index == 0:
            textbook = _export_fp32(model, folder, concat_trick=False)
            variants.append(
                _Variant(
                    "fp32-ort-textbook",
                    "onnxruntime",
                    "fp32",
                    OrtStep(textbook, threads),
                    "fp32",
                    onnx=textbook,
                    threads=threads,
                    note="FP32 with concat then Linear: INT8's graph structure",
                )
            )
            for lever, precision, factory in _ort_levers(fp32_path, int8_path, threads, folder):
                base = "fp32-ort" if precision == "fp32" else "int8-ort"
                variants.append(
                    _Variant(
                        f"{base} [{lever}]",
                        "onnxruntime",
                        "fp32" if precision == "fp32" else "w8a8",
                        factory(),
                        "fp32" if precision == "fp32" else "cpu-x86",
                        lever=lever,
                        base=base,
                        threads=2 if "2 threads" in lever else threads,
                    )
                )
        if gpu:
            cache = folder / "trt" if keep_engines else None
            variants += _trt_variants(fp32_path, trt_int8_path, inputs, cache)
        variants += _openvino_variants(fp32_path, ov_int8_path, ov_target, inputs, threads)
        rows += _measure_case(
            case, inputs, steps, model, qmodels, variants, repeats, warmup, profile_runs, folder
        )
    for row in rows:
        row.update(host)
    return rows


def rollout_block(fp32_ort_ms: float) -> int:
    """Consecutive steps per turn in the pairs against FP32 ORT (see `_BLOCK_MS`)."""
    return int(min(_MAX_BLOCK, max(1, np.ceil(_BLOCK_MS / max(fp32_ort_ms, 1e-6)))))


def _pair_variants(
    variants: Sequence[_Variant],
    rows: list[dict[str, Any]],
    inputs: Inputs,
    repeats: int,
    warmup: int,
) -> None:
    """The paired speed-ups of every base variant (not a lever), each pair timed alone,
    interleaved (ABBA, `sciquant.runtime.paired`):

    - `paired_vs_own_fp32` (+ `_ci`), for a variant that is not an FP32 itself: beside its
      runtime's FP32, one step per turn, as a study's evaluation times a run beside its
      target's FP32 (what the study's report compares with). The round robin over every
      variant (`speedup_vs_own_fp32`) runs each step between many others, its caches cold.
    - `paired_vs_fp32_ort` (+ `_ci`, `paired_block_steps`), for every variant but fp32-ort:
      beside FP32 ONNX Runtime, each turn a block of consecutive steps (`rollout_block`), as a
      rollout runs them: the deployment comparison the goals (`verdicts`) are judged by.
    """
    by_name = {variant.name: variant for variant in variants}
    medians = {row["variant"]: row["median_ms"] for row in rows}
    ort_fp32 = by_name.get("fp32-ort")
    block = rollout_block(medians["fp32-ort"]) if ort_fp32 is not None else 1
    for row, variant in zip(rows, variants, strict=True):
        if variant.lever is not None:
            continue
        own = by_name.get(_own_fp32(variant, medians))
        if own is not None and own is not variant:
            speedup, ci = _paired(variant, own, inputs, repeats, warmup, steps=1)
            row["paired_vs_own_fp32"], row["paired_vs_own_fp32_ci"] = speedup, ci
        if ort_fp32 is not None and variant is not ort_fp32:
            speedup, ci = _paired(variant, ort_fp32, inputs, repeats, warmup, steps=block)
            row["paired_vs_fp32_ort"], row["paired_vs_fp32_ort_ci"] = speedup, ci
            row["paired_block_steps"] = block


def _paired(
    variant: _Variant, baseline: _Variant, inputs: Inputs, repeats: int, warmup: int, steps: int
) -> tuple[float, tuple[float, float]]:
    """Paired speed-up of `variant` over `baseline` and its 95 % CI, `steps` steps a turn."""
    from sciquant.runtime.paired import paired_timing

    def turn(chosen: _Variant) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                chosen.step(*inputs)

        return run

    with torch.inference_mode():
        paired = paired_timing(
            turn(variant), turn(baseline), repeats, warmup=max(warmup, 1), threads=variant.threads
        )
    return paired["paired_speedup"], (
        paired["paired_speedup_ci_low"],
        paired["paired_speedup_ci_high"],
    )


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, the deployment goals: the fastest variant whose outputs agree (by
    `paired_vs_fp32_ort`) against `GOAL_FASTEST`, and on the largest case the best INT8
    variant against `GOAL_INT8_LARGEST`. One dict per verdict (case, goal, variant, paired
    ratio and CI, met); nothing for a case without pairs."""
    out: list[dict[str, Any]] = []
    cases = list(dict.fromkeys(row["case"] for row in rows))
    largest = max(cases, key=lambda c: next(r["num_nodes"] for r in rows if r["case"] == c))
    for case in cases:
        paired = [
            row
            for row in rows
            if row["case"] == case and row["agrees"] and row.get("paired_vs_fp32_ort")
        ]
        checks = [("fastest", GOAL_FASTEST, paired)]
        if case == largest:
            int8 = [row for row in paired if row["precision"] == "w8a8"]
            checks.append(("int8", GOAL_INT8_LARGEST, int8))
        for kind, goal, candidates in checks:
            if not candidates:
                continue
            best = max(candidates, key=lambda row: row["paired_vs_fp32_ort"])
            out.append(
                {
                    "case": case,
                    "num_nodes": best["num_nodes"],
                    "kind": kind,
                    "goal": goal,
                    "variant": best["variant"],
                    "paired_vs_fp32_ort": best["paired_vs_fp32_ort"],
                    "ci": best["paired_vs_fp32_ort_ci"],
                    "met": best["paired_vs_fp32_ort"] >= goal,
                }
            )
    return out


def _own_fp32(variant: _Variant, medians: Mapping[str, float]) -> str:
    """The FP32 variant of the variant's own runtime (its target's paired baseline)."""
    own = {"torch": "fp32-torch", "onnxruntime": "fp32-ort", "openvino": "ov-fp32",
           "tensorrt": "trt-fp32"}.get(variant.runtime, "fp32-ort")  # fmt: skip
    return own if own in medians else "fp32-ort"


def _measure_case(
    case: str,
    inputs: Inputs,
    steps: int,
    model: MeshGraphNet,
    qmodels: Mapping[str, QuantizedModel],
    variants: list[_Variant],
    repeats: int,
    warmup: int,
    profile_runs: int,
    folder: Path,
) -> list[dict[str, Any]]:
    x, _, edge_index = inputs
    with torch.inference_mode():
        references = {"fp32": model(*inputs)}
        bounds = {}
        for key, qmodel in qmodels.items():
            references[key] = qmodel(*inputs)
            bounds[key] = _one_output_step(qmodel)
    load_before = os.getloadavg()[0]
    times = _time_interleaved(variants, inputs, repeats, warmup)
    load_after = os.getloadavg()[0]
    medians = {name: _quartiles(values)[1] for name, values in times.items()}
    rows = []
    for variant in variants:
        with torch.inference_mode():
            output = variant.step(*inputs).detach().float().cpu()
        reference = references[variant.reference]
        error = (output - reference).abs()
        steps_off: dict[str, float] = {}  # INT8 only
        if variant.reference == "fp32":
            tolerance = _FP32_TOLERANCE.get(variant.precision, _FP32_TOLERANCE["fp32"])
            bound = tolerance * float(reference.abs().max())
            agrees = bool(error.max() <= bound)
        else:
            per_column = bounds[variant.reference]
            bound = float(per_column.min())
            steps_off = _int8_agreement(error / per_column)
            steps_off["reference_error_vs_fp32_rel"] = float(
                (reference - references["fp32"]).norm() / references["fp32"].norm()
            )
            agrees = (
                steps_off["median_error_steps"] <= _INT8_MEDIAN_STEPS
                and steps_off["frac_within_step"] >= _INT8_WITHIN_STEP
            )
        relative = float((output - references["fp32"]).norm() / references["fp32"].norm())
        q1, median, q3 = _quartiles(times[variant.name])
        row = {
            "case": case,
            "num_nodes": int(x.shape[0]),
            "num_edges": int(edge_index.shape[1]),
            "variant": variant.name,
            "runtime": variant.runtime,
            "precision": variant.precision,
            "lever": variant.lever,
            "base": variant.base,
            "threads": variant.threads,
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "repeats": len(times[variant.name]),
            "warmup": warmup,
            "rollout_steps": steps,
            "rollout_s": median * steps / 1e3,
            "speedup_vs_fp32_torch": medians["fp32-torch"] / median,
            "speedup_vs_fp32_ort": medians["fp32-ort"] / median,
            "speedup_vs_own_fp32": medians[_own_fp32(variant, medians)] / median,
            "reference": "fp32-torch"
            if variant.reference == "fp32"
            else f"fake-quant torch ({variant.reference})",
            "max_abs_error": float(error.max()),
            "error_bound": bound,
            "agrees": agrees,
            **steps_off,
            "error_vs_fp32_rel": relative,
            "note": variant.note,
            "loadavg_1min": (load_before, load_after),
            "op_split": None,
        }
        if variant.base is not None:
            row["speedup_vs_base"] = medians[variant.base] / median
            row["helps"] = agrees and median < _HELPS * medians[variant.base]
        if variant.onnx is not None and profile_runs > 0:
            row["op_split"] = operator_split(
                variant.onnx, inputs, profile_runs, variant.threads, work_dir=folder
            )
        rows.append(row)
    _pair_variants(variants, rows, inputs, repeats, warmup)
    by_name = {row["variant"]: row for row in rows}
    for row in rows:  # INT8 vs FP32 under the same lever: does INT8 pay off there?
        if row["precision"] == "w8a8" and row["lever"] is not None:
            twin = by_name.get(f"fp32-ort [{row['lever']}]")
            if twin is not None:
                row["speedup_vs_same_lever_fp32"] = twin["median_ms"] / row["median_ms"]
    return rows


# -- the table ---------------------------------------------------------------------------------


def _split_text(split: list[dict[str, Any]] | None) -> str:
    return ", ".join(f"{entry['op']} {entry['pct']:.0f}%" for entry in split or [])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per case: base variants and helping levers (median, IQR, rollout, speedups, agreement),
    the operator split of the ORT variants, and the levers that did not help."""
    if not rows:
        return "no rows"
    first = rows[0]
    vnni = (
        "has VNNI: U8S8 integer GEMMs run natively"
        if first["vnni"]
        else "AVX2 without VNNI: ONNX Runtime emulates U8S8 int8 GEMMs; the QDQ export stores "
        "weights as uint8 (U8U8, exact)"
    )
    lines = [
        f"bench rollout: {first['source']}",
        f"CPU: {first['cpu']} ({vnni}); int8/bf16 flags: "
        + (", ".join(k for k, v in first.get("cpu_features", {}).items() if v) or "none")
        + f"; threads {first['threads']}; GPU: {first['gpu']}",
    ]
    header = (
        f"{'variant':<44} {'median':>10} {'IQR':>8} {'rollout':>9} {'x torch':>8} "
        f"{'x ORT':>7} {'x own':>7} {'paired':>7} {'max|err|':>9} {'bound':>9} {'ok':>3}"
    )
    for case in dict.fromkeys(row["case"] for row in rows):
        block = [row for row in rows if row["case"] == case]
        shown = [row for row in block if row["lever"] is None or row.get("helps")]
        quiet = [row for row in block if row["lever"] is not None and not row.get("helps")]
        lines += [
            "",
            f"case {case}: {block[0]['num_nodes']} nodes, {block[0]['num_edges']} edges; "
            f"rollout = median x {block[0]['rollout_steps']} steps; "
            f"{block[0]['repeats']} repeats after {block[0]['warmup']} warm-up rounds, interleaved",
            header,
            "-" * len(header),
        ]
        for row in shown:
            paired = row.get("paired_vs_own_fp32")
            paired_text = f"{paired:>6.2f}x" if paired is not None else f"{'-':>7}"
            lines.append(
                f"{row['variant'][:44]:<44} {row['median_ms']:>7.2f} ms {row['iqr_ms']:>5.2f} ms "
                f"{row['rollout_s']:>7.2f} s {row['speedup_vs_fp32_torch']:>7.2f}x "
                f"{row['speedup_vs_fp32_ort']:>6.2f}x {row['speedup_vs_own_fp32']:>6.2f}x "
                f"{paired_text} {row['max_abs_error']:>9.2e} "
                f"{row['error_bound']:>9.2e} {'yes' if row['agrees'] else 'NO':>3}"
            )
        for row in block:
            if row["op_split"]:
                lines.append(f"  ops {row['variant']}: {_split_text(row['op_split'])}")
        if quiet:
            lines.append("  levers that did not help (speedup vs their base; INT8 vs FP32 there):")
            for row in quiet:
                twin = row.get("speedup_vs_same_lever_fp32")
                extra = f"; INT8/FP32 {twin:.2f}x" if twin else ""
                wrong = "" if row["agrees"] else "; WRONG OUTPUTS"
                lines.append(
                    f"    {row['variant']}: {row['median_ms']:.2f} ms, "
                    f"{row['speedup_vs_base']:.2f}x{extra}{wrong}"
                )
    goals = verdicts(rows)
    if goals:
        lines += ["", "deployment goals (paired with fp32-ort, consecutive steps per turn):"]
        for v in goals:
            what = "fastest variant that agrees" if v["kind"] == "fastest" else "best INT8"
            lines.append(
                f"  {v['case']} ({v['num_nodes']} nodes): {what}: {v['variant']} "
                f"{v['paired_vs_fp32_ort']:.2f}x (95 % CI {v['ci'][0]:.2f}-{v['ci'][1]:.2f}), "
                f"goal {v['goal']:.1f}x: {'met' if v['met'] else 'MISSED'}"
            )
    loads = [v for row in rows for v in row.get("loadavg_1min", ())]
    lines += [
        "",
        "x torch / x ORT / x own: speedup over fp32-torch / fp32-ort / the FP32 of the variant's "
        "own runtime (their median / this median, in the round robin over all variants); "
        "paired: the variant and its own FP32 timed alone together, interleaved, as a study's "
        "evaluation measures that target's paired speed-up; the goals pair each variant with "
        "fp32-ort the same way, each turn a block of consecutive steps (as a rollout runs).",
        "max|err|: vs fp32-torch (ok: below the bound, 1e-4 x max|output| for FP32, 1e-2 x for "
        "FP16); INT8 vs the fake-quant model it came from, bound = one output quantization step "
        "(ok: median error <= 1e-3 step and >= 99 % of outputs within one step; code flips at "
        "rounding ties propagate, so single outputs may exceed it).",
        "ops: share of ONNX Runtime kernel time per op type (profiler), top 8 + other.",
    ]
    if loads:
        lines.append(
            f"1-min load average during the run: {min(loads):.2f}-{max(loads):.2f} on "
            f"{os.cpu_count()} CPUs (above the core count: contended timings)."
        )
    return "\n".join(lines)
