"""`ptq-dynamic` (sciquant.workloads.bloodflow.dynamic): ONNX Runtime dynamic INT8 against a float64
reference, the config checks that confine it to ONNX Runtime W8A8, the method lists that must agree,
and a quantize + evaluate run on the ci study's tiny data."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from torch import nn

from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph
from sciquant.quant.export import export_fp32_onnx
from sciquant.quant.observers import DYNAMIC_METHODS, METHOD_OBSERVERS, METHODS
from sciquant.runtime.onnxruntime import OrtStep, cpu_has_vnni, integer_kernels, kernel_summary
from sciquant.study import QUANTIZATION_METHODS, Study, load_config
from sciquant.workloads.bloodflow.dynamic import WEIGHT_SUFFIX, is_dynamic, quantize_dynamic_onnx

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "workflow" / "config" / "ci.yaml"
SMALL = MeshGraphNetConfig(hidden=16, processor_size=2)


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[MeshGraphNet, Path]:
    torch.manual_seed(0)
    model = MeshGraphNet(SMALL).eval()
    path = export_fp32_onnx(
        model, tmp_path_factory.mktemp("dynamic") / "fp32.onnx", concat_trick=False
    )
    return model, path


# -- the float64 reference of dynamic quantization ---------------------------------------------


class _ReferenceDynamicLinear(nn.Module):
    """One Linear as ONNX Runtime's dynamic INT8 computes it, in float64 NumPy: the input
    quantized to uint8 over its whole tensor, the integer weights and their scale and zero point
    as the quantized graph stores them."""

    def __init__(self, linear: nn.Linear, weights: tuple[np.ndarray, ...], quantize_input: bool):
        super().__init__()
        self.bias = linear.bias.detach().double().numpy()
        weight_q, weight_scale, weight_zero = weights  # B_q [in, out], per tensor or per column
        self.weight = (weight_q.astype(np.float64) - weight_zero) * weight_scale.astype(np.float64)
        self.quantize_input = quantize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().numpy()
        if self.quantize_input:
            # The input's scale and codes in float32, as ONNX Runtime computes them, so a value
            # on a rounding tie rounds the same way; the products and sums in float64.
            x = x.astype(np.float32)
            lo, hi = np.float32(min(x.min(), 0.0)), np.float32(max(x.max(), 0.0))
            scale = np.float32((hi - lo) / np.float32(255.0))
            zero_point = np.clip(np.rint(-lo / scale), 0, 255)
            x_q = np.clip(np.rint(x / scale) + zero_point, 0, 255)
            x = (x_q.astype(np.float64) - zero_point) * np.float64(scale)
        return torch.from_numpy(x.astype(np.float64) @ self.weight + self.bias)


def _graph_weights(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """Per Linear: (integers, scale, zero point) read from the quantized graph's initializers."""
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    suffix = ".weight" + WEIGHT_SUFFIX
    return {
        name.removesuffix(suffix + "_quantized"): tuple(
            tensors[name.replace("_quantized", part)]
            for part in ("_quantized", "_scale", "_zero_point")
        )
        for name in tensors
        if name.endswith(suffix + "_quantized")
    }


def _reference(model: MeshGraphNet, path: Path, inputs, quantize_input: bool = True) -> np.ndarray:
    reference = copy.deepcopy(model).double()
    weights = _graph_weights(path)
    linears = {n: m for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
    assert set(weights) == set(linears)  # every Linear, and nothing else, is quantized
    for name, linear in linears.items():
        parent, _, child = name.rpartition(".")
        layer = _ReferenceDynamicLinear(linear, weights[name], quantize_input)
        setattr(reference.get_submodule(parent), child, layer)
    x, edge_features, edge_index = inputs
    with torch.no_grad():
        return reference(x.double(), edge_features.double(), edge_index).numpy()


@pytest.mark.parametrize(
    ("per_channel", "weight_dtype"), [(False, "int8"), (False, "uint8"), (True, "int8")]
)
def test_ort_dynamic_int8_agrees_with_float64_reference(
    fp32_export, tmp_path: Path, per_channel: bool, weight_dtype: str
) -> None:
    model, fp32 = fp32_export
    path = quantize_dynamic_onnx(
        fp32, tmp_path / "dynamic.onnx", per_channel=per_channel, weight_dtype=weight_dtype
    )
    assert is_dynamic(path) and not is_dynamic(fp32)
    kernels = integer_kernels(kernel_summary(path))
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert kernels == {"DynamicQuantizeMatMul": linears}, kernels
    step = OrtStep(path)
    for seed in range(3):
        x, edge_features, edge_index = random_tree_graph(150, seed)
        x = x * 3.0 + 0.7  # an asymmetric range: the zero point matters
        inputs = (x, edge_features, edge_index)
        ort = step(*inputs).numpy().astype(np.float64)
        reference = _reference(model, path, inputs)
        with torch.no_grad():
            fp32_out = model(*inputs).numpy().astype(np.float64)
        weights_only = _reference(model, path, inputs, quantize_input=False)
        quantization_error = np.abs(ort - fp32_out).max()
        activation_error = np.abs(weights_only - reference).max()
        mismatch = np.abs(ort - reference)
        # ORT's float32 against the float64 sums: ~5e-6 of the activations' own error where no
        # code flips. A deeper layer's input differs from the reference's in its last float32
        # bit, so now and then one lands on the other side of a rounding tie: one code flips
        # and the few outputs it reaches move (2 of 300 outputs in one of these graphs). A wrong
        # zero point, 7-bit, per-row or float activations, or other weights move nearly every
        # output by the size of the activations' error itself.
        assert activation_error > 0.1 * quantization_error
        flipped = mismatch > 1e-3 * activation_error
        if weight_dtype == "int8" and not cpu_has_vnni():
            # Without VNNI, ORT's U8S8 kernel saturates int16 pair sums (measured on an AMD
            # EPYC: every output moved, by ~5x the activations' error): why `weight_dtype`
            # defaults to uint8 there. The reference still tells the kernel's error apart.
            assert flipped.mean() > 0.5, (int(flipped.sum()), mismatch.max(), activation_error)
            continue
        assert flipped.mean() < 0.02, (int(flipped.sum()), mismatch.max(), activation_error)


def test_gemm_that_is_not_a_linear_is_refused(fp32_export, tmp_path: Path) -> None:
    _, fp32 = fp32_export
    proto = onnx.load(str(fp32))
    gemm = next(node for node in proto.graph.node if node.op_type == "Gemm")
    gemm.attribute.append(onnx.helper.make_attribute("alpha", 2.0))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(SciquantError, match="is not a Linear layer"):
        quantize_dynamic_onnx(bad, tmp_path / "out.onnx")


# -- the config: one method list, ptq-dynamic only where ONNX Runtime runs it -------------------


def test_every_method_list_agrees() -> None:
    from sciquant.report.cube import METHOD_ORDER

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    sweeps = schema["$defs"]["quantize"]["properties"]["sweeps"]["items"]["properties"]
    assert set(METHODS) == set(METHOD_OBSERVERS) | set(DYNAMIC_METHODS)
    assert QUANTIZATION_METHODS == METHODS
    assert sweeps["methods"]["items"]["enum"] == ["none", *METHODS]
    assert METHOD_ORDER == ("none", *METHODS)
    common = (ROOT / "rules/common.smk").read_text()
    assert 'method=alternatives(("none",) + QUANTIZATION_METHODS)' in common


def _ci_config(tmp_path: Path, entry: dict) -> Path:
    config = yaml.safe_load(CI_CONFIG.read_text())
    config.setdefault("quantize", {})["sweeps"] = [entry]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


DYNAMIC_ENTRY = {
    "models": ["meshgraphnet"], "targets": ["cpu-x86"], "methods": ["ptq-dynamic"],
    "precisions": ["w8a8"],
}  # fmt: skip


def test_config_accepts_dynamic_on_cpu_x86_w8a8(tmp_path: Path) -> None:
    study = Study(load_config(_ci_config(tmp_path, DYNAMIC_ENTRY)))
    runs = [r for r in study.runs() if r.method == "ptq-dynamic"]
    assert [(r.target, r.precision) for r in runs] == [("cpu-x86", "w8a8")]
    plan = study.plan(runs[0])
    assert plan.runtime == "onnxruntime" and not plan.simulated


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"targets": ["reference"]}, "'reference' at w8a8"),
        ({"targets": ["npu-pow2"]}, "'npu-pow2' at w8a8"),
        ({"precisions": ["w4a8"]}, "'cpu-x86' at w4a8"),
    ],
)
def test_config_rejects_dynamic_where_onnx_runtime_does_not_run_it(
    tmp_path: Path, change: dict, named: str
) -> None:
    with pytest.raises(SciquantError) as error:
        load_config(_ci_config(tmp_path, {**DYNAMIC_ENTRY, **change}))
    message = str(error.value)
    assert message.startswith("config key quantize.sweeps.0.methods: method ptq-dynamic")
    assert named in message and "cpu-x86" in message


# -- the stages: sciquant quantize + sciquant evaluate on the ci study's tiny data --------------


def _sciquant(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sciquant.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def ci_training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The ci study's embedded data, prepared, and its FP32 MeshGraphNet (fewer steps)."""
    config = load_config(CI_CONFIG)
    root = tmp_path_factory.mktemp("ci")
    dataset = config["datasets"]["bloodflow"]
    model = {k: v for k, v in config["models"]["meshgraphnet"].items() if k != "datasets"}
    model["train"].update(epochs=1, steps_per_epoch=3)
    _sciquant("synthesize", "bloodflow", "--settings", json.dumps(dataset["source"]["embedded"]),
              "--out", str(root / "raw"))  # fmt: skip
    _sciquant("prepare", "bloodflow", "--raw", str(root / "raw"), "--settings",
              json.dumps(dataset["prepare"]), "--out", str(root / "prepared"))  # fmt: skip
    _sciquant("train", "--prepared", str(root / "prepared"), "--settings", json.dumps(model),
              "--threads", "1", "--out", str(root / "fp32"))  # fmt: skip
    return root / "prepared", root / "fp32" / "checkpoint.pt"


def test_quantize_and_evaluate_dynamic_run(ci_training, tmp_path: Path) -> None:
    prepared, checkpoint = ci_training
    coordinates = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": 0}
    static = tmp_path / "cpu-x86/ptq-minmax/w8a8"
    dynamic = tmp_path / "cpu-x86/ptq-dynamic/w8a8"
    for folder, method in ((static, "ptq-minmax"), (dynamic, "ptq-dynamic")):
        _sciquant("quantize", "--checkpoint", str(checkpoint), "--prepared", str(prepared),
                  "--target", "cpu-x86", "--method", method, "--precision", "w8a8",
                  "--threads", "1", "--out", str(folder))  # fmt: skip
    assert not (dynamic / "quantized.pt").exists() and is_dynamic(dynamic / "model.onnx")
    _sciquant("export", "--checkpoint", str(static / "quantized.pt"), "--prepared",
              str(prepared), "--out", str(static / "model.onnx"))  # fmt: skip
    written = {}
    for folder, method, artifact in (
        (static, "ptq-minmax", static / "quantized.pt"),
        (dynamic, "ptq-dynamic", checkpoint),
    ):
        run = {**coordinates, "target": "cpu-x86", "method": method, "precision": "w8a8"}
        _sciquant("evaluate", "--checkpoint", str(artifact), "--onnx", str(folder / "model.onnx"),
                  "--prepared", str(prepared), "--settings", json.dumps({"repeats": 2}),
                  "--coordinates", json.dumps(run), "--threads", "1",
                  "--out", str(folder))  # fmt: skip
        written[method] = json.loads((folder / "metrics.json").read_text())
    result, static_result = written["ptq-dynamic"], written["ptq-minmax"]
    assert result["coordinates"]["method"] == "ptq-dynamic"
    assert result["runtime"] == "onnxruntime" and result["simulated"] is False
    # Beside the same metrics, the static run has its quantization debugging
    # (`sciquant.quant.debug`), which needs a fake-quant simulation; a dynamic run has none.
    debug = ("layer_sqnr_", "sim_vs_deployed_")
    static_keys = {k for k in static_result["metrics"] if not k.startswith(debug)}
    assert set(result["metrics"]) == static_keys
    assert static_result["metrics"]["sim_vs_deployed_unit"] == "output_rms"
    metrics = result["metrics"]
    # A model trained for three steps: the errors only need to be real numbers, not small ones.
    for field in ("pressure_error_pct", "flowrate_error_pct"):
        assert np.isfinite(metrics[field]) and metrics[field] > 0
    assert metrics["rollout_time_s_median"] > 0 and metrics["compute_median_ms"] > 0
    assert metrics["model_bytes"] < static_result["metrics"]["model_bytes"] * 1.5
    assert metrics["model_bytes"] < metrics["parameters"] * 2  # int8 weights, not float32
