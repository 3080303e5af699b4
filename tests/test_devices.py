"""Node types mean what they say: a stage on a GPU node type uses CUDA where it is present, a CPU
node type never does, a GPU node type without CUDA says so and records `cpu`; training.json and
metrics.json record the device used. CUDA is monkeypatched here (CPU-only torch); the `gpu`
tests run the real thing where CUDA exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sciquant import cli, provenance
from sciquant.errors import SciquantError
from sciquant.plugins import Evaluation
from sciquant.study import Run, Study, load_config, node_device, run_device
from sciquant.workloads.bloodflow import evaluate as evaluate_bloodflow
from sciquant.workloads.bloodflow import train as train_bloodflow
from tests.test_train_bloodflow import TINY, tiny_prepared

ROOT = Path(__file__).resolve().parents[1]
COORDINATES = {
    "dataset": "flow", "model": "mgn", "seed": 0, "target": "reference", "method": "none",
    "precision": "fp32", "study": "t", "settings_hashes": {"threads": "x"},
}  # fmt: skip
EVALUATE = {"repeats": 1, "figure_simulations": 1, "debug_inputs": 0}


def settings_on(node: str) -> dict:
    settings = json.loads(json.dumps(TINY))
    settings["train"].update(epochs=1, steps_per_epoch=2, node=node)
    return settings


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("devices"))


@pytest.fixture
def with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


# ------------------------------------------------------------------ the choice


def test_node_types_ask_for_their_device() -> None:
    assert node_device("cpu") == "cpu"
    assert node_device("v100") == node_device("rtx3090") == "cuda"


def test_gpu_node_with_cuda_uses_cuda(with_cuda, capsys) -> None:
    assert provenance.select_device("cuda", "train") == "cuda"
    assert "WARNING" not in capsys.readouterr().err


def test_cpu_node_stays_on_cpu_even_with_cuda(with_cuda, capsys) -> None:
    assert provenance.select_device("cpu", "train") == "cpu"
    assert capsys.readouterr().err == ""


def test_gpu_node_without_cuda_warns_and_runs_on_cpu(without_cuda, capsys) -> None:
    assert provenance.select_device("cuda", "train (node type v100)") == "cpu"
    err = capsys.readouterr().err
    assert err.startswith("WARNING: train (node type v100): its node type asks for a GPU")
    assert "CUDA is not available here" in err and "running on the CPU" in err
    assert "Slurm" not in err  # a laptop: no misconfiguration to report


def test_slurm_job_without_cuda_calls_it_a_misconfiguration(
    without_cuda, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert provenance.select_device("cuda", "evaluate") == "cpu"
    err = capsys.readouterr().err
    assert "Slurm job 4242" in err and "misconfiguration" in err


def test_evaluation_devices_per_runtime(with_cuda, capsys) -> None:
    rollout_device = evaluate_bloodflow.rollout_device
    assert rollout_device("torch", "cuda", "run") == "cuda"  # FP32 and fake-quant rollouts
    assert rollout_device("torch", "cpu", "run") == "cpu"  # a CPU node never takes the GPU
    assert rollout_device("tensorrt", "cuda", "run") == "cuda"
    assert rollout_device("openvino", "cpu", "run") == "cpu"
    assert capsys.readouterr().out == ""
    assert rollout_device("onnxruntime", "cuda", "run") == "cpu"
    assert "onnxruntime runs on the CPU" in capsys.readouterr().out


def test_device_is_described_with_the_gpu_model(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA V100-SXM2-32GB")
    assert provenance.describe_device("cuda") == "cuda:0 (NVIDIA V100-SXM2-32GB)"
    assert provenance.describe_device("cpu") == f"cpu ({provenance.device_name()})"
    recorded = provenance.device_provenance("cpu", "cuda")
    assert recorded["device_type"] == "cpu" and recorded["device_requested"] == "cuda"
    assert recorded["cpu_model"] == provenance.device_name()


def test_rules_and_submit_ask_for_the_gpu_exactly_on_gpu_node_types() -> None:
    """`Study.evaluation` (the evaluate rules' and `submit`'s `--plan`): device cuda for every
    run whose target's node type has a GPU (TensorRT targets and their simulated precisions),
    cpu for every run on a CPU node type; the plan survives its JSON."""
    study = Study(load_config(ROOT / "workflow" / "config" / "paper.yaml"))
    on_gpu = 0
    for run in study.runs():
        plan = study.evaluation(run)
        gpu = study.node(run) != "cpu"
        assert (plan.device == "cuda") == gpu and plan.device == run_device(study, run)
        assert run_device(study, run) == node_device(study.node(run))
        assert Evaluation.from_json(json.loads(json.dumps(plan.to_json()))) == plan
        on_gpu += gpu
    assert on_gpu == 3 * 2 * 5  # seeds × GPU targets × (3 INT8 methods, FP16, FP32)
    simulated = study.evaluation(
        Run("bloodflow", "meshgraphnet", 0, "trt-v100", "ptq-minmax", "w4a8")
    )  # fake-quant on the GPU node's GPU, from the run's own quantized model, untimed
    assert simulated.to_json() == {
        "artifact": "results/bloodflow/meshgraphnet/seed0/trt-v100/ptq-minmax/w4a8/quantized.pt",
        "simulated": True, "device": "cuda", "workload": "bloodflow",
    }  # fmt: skip
    native = study.evaluation(Run("bloodflow", "meshgraphnet", 0, "trt-v100", "ptq-minmax", "w8a8"))
    fp32 = "results/bloodflow/meshgraphnet/seed0/trt-v100/none/fp32/model.onnx"
    assert (native.runtime, native.simulated) == ("tensorrt", False)
    assert native.baseline_onnx == Path(fp32)


def test_evaluate_takes_a_plan_or_flags_not_both(tmp_path: Path) -> None:
    """A plan with an unknown key, without an artifact, or given beside a flag it holds is
    refused, naming what is wrong."""
    coordinates = json.dumps(dict.fromkeys(("dataset", "model", "target", "method", "precision"),
                                           "x") | {"seed": 0})  # fmt: skip
    common = ["evaluate", "--prepared", str(tmp_path), "--settings", "{}",
              "--coordinates", coordinates, "--out", str(tmp_path / "run")]  # fmt: skip
    cases = [
        (["--plan", '{"artifact": "a.pt", "engine": "x"}'], "unknown key engine"),
        (["--plan", '{"onnx": "a.onnx"}'], "no artifact"),
        (["--plan", '{"artifact": "a.pt"}', "--checkpoint", "b.pt"], "--checkpoint"),
        (["--plan", '{"artifact": "a.pt"}', "--simulated"], "--simulated"),
        ([], "--checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(SciquantError, match=message):
            cli._run_stage(cli.build_parser().parse_args([*common[:1], *extra, *common[1:]]))


# ------------------------------------------------------------------ the stages


def test_gpu_training_is_asked_for_cuda(prepared, tmp_path, with_cuda, monkeypatch) -> None:
    """`train.node: v100` with CUDA present: the training loop gets `cuda` (the loop itself is
    faked: this torch has no CUDA), and training.json records it."""
    seen = {}

    def fake_fit(model, *args, device="cpu", **kwargs):  # noqa: ANN001, ANN202
        seen["device"] = device
        return [{"epoch": 1, "train_loss": 1.0}]

    monkeypatch.setattr(train_bloodflow, "fit", fake_fit)
    for module in (train_bloodflow, provenance):
        monkeypatch.setattr(module, "describe_device", lambda d: f"{d}:0 (Fake GPU)")
    train_bloodflow.run(prepared, tmp_path, settings_on("v100"), progress=False)
    assert seen["device"] == "cuda"
    recorded = json.loads((tmp_path / "training.json").read_text())["provenance"]
    assert recorded["device"] == "cuda:0 (Fake GPU)" and recorded["device_type"] == "cuda"
    assert (
        torch.load(tmp_path / "checkpoint.pt", weights_only=True)["device"] == "cuda:0 (Fake GPU)"
    )


def test_tiny_run_on_cpu_node_records_cpu(prepared, tmp_path, with_cuda, capsys) -> None:
    """A CPU node type trains and evaluates on the CPU although CUDA "is there" (if it tried
    the GPU, this CPU-only torch would fail), and both outputs say so."""
    checkpoint = train_bloodflow.run(
        prepared, tmp_path / "fp32", settings_on("cpu"), progress=False
    )
    training = json.loads((tmp_path / "fp32" / "training.json").read_text())
    assert training["node"] == "cpu" and training["epochs"] == 1
    for recorded in (training["provenance"],):
        assert recorded["device_type"] == recorded["device_requested"] == "cpu"
        assert recorded["device"] == f"cpu ({provenance.device_name()})"
    assert torch.load(checkpoint, weights_only=True)["device"].startswith("cpu (")
    metrics = evaluate_bloodflow.run(
        checkpoint, prepared, tmp_path / "run", EVALUATE, COORDINATES, device="cpu"
    )
    recorded = json.loads(metrics.read_text())["provenance"]
    assert recorded["device_type"] == recorded["device_requested"] == "cpu"
    assert recorded["device"].startswith("cpu (") and recorded["cpu_model"]
    assert "WARNING" not in capsys.readouterr().err


def test_tiny_run_on_gpu_node_without_cuda_warns_and_records_cpu(
    prepared, tmp_path, without_cuda, capsys
) -> None:
    """The GPU study on a laptop: results, a warning in the log, `cpu` recorded beside the
    GPU asked for. Evaluation through the command line, as the rules run it."""
    checkpoint = train_bloodflow.run(
        prepared, tmp_path / "fp32", settings_on("v100"), progress=False
    )
    assert "WARNING: train (node type v100)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "fp32" / "training.json").read_text())["provenance"]
    assert recorded["device_type"] == "cpu" and recorded["device_requested"] == "cuda"
    argv = [
        "evaluate", "--checkpoint", str(checkpoint), "--prepared", str(prepared),
        "--settings", json.dumps(EVALUATE), "--coordinates", json.dumps(COORDINATES),
        "--device", "cuda", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "WARNING: evaluate reference/none/fp32" in capsys.readouterr().err
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["provenance"]["device_type"] == "cpu"
    assert payload["provenance"]["device_requested"] == "cuda"


def test_resume_on_another_device_says_it_is_not_bit_identical(prepared, tmp_path, capsys) -> None:
    """resume.pt records the device; a resume elsewhere continues and says so."""
    settings = settings_on("cpu")
    train_bloodflow.run(prepared, tmp_path, settings, progress=False)
    resume = tmp_path / "resume.pt"
    state = torch.load(resume, weights_only=True)
    assert state["device_type"] == "cpu"
    assert all(t.device.type == "cpu" for t in state["state_dict"].values())
    state["device_type"] = "cuda"  # as a GPU training leaves it (CPU tensors)
    torch.save(state, resume)
    train_bloodflow.run(prepared, tmp_path, settings, progress=False)  # resumes, nothing left
    out = capsys.readouterr().out
    assert "resuming from" in out and "was written on cuda, this run uses cpu" in out


def test_checkpoints_hold_cpu_tensors_and_keep_state_dict_metadata() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    state = model.state_dict()
    moved = train_bloodflow.on_cpu({"state_dict": state, "log": [{"a": 1.0}], "t": (1, 2)})
    assert moved["state_dict"]._metadata == state._metadata
    assert moved["log"] == [{"a": 1.0}] and moved["t"] == (1, 2)
    assert all(moved["state_dict"][k] is v for k, v in state.items())  # CPU tensors kept


# ------------------------------------------------------------------ with CUDA (where it exists)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_node_trains_and_evaluates_on_cuda(prepared, tmp_path) -> None:
    settings = settings_on("v100")
    settings["train"]["epochs"] = 2
    checkpoint = train_bloodflow.run(prepared, tmp_path / "fp32", settings, progress=False)
    training = json.loads((tmp_path / "fp32" / "training.json").read_text())["provenance"]
    assert training["device_type"] == "cuda" and training["device"].startswith("cuda:")
    state = torch.load(checkpoint, weights_only=True)
    assert all(t.device.type == "cpu" for t in state["state_dict"].values())
    # a resume written on the GPU continues on the CPU: as if stopped after epoch 1
    resume = tmp_path / "fp32" / "resume.pt"
    stopped = torch.load(resume, weights_only=True)
    assert stopped["device_type"] == "cuda"
    stopped.update(epoch=0, log=stopped["log"][:1])
    torch.save(stopped, resume)
    train_bloodflow.run(prepared, tmp_path / "fp32", settings, progress=False, device="cpu")
    training = json.loads((tmp_path / "fp32" / "training.json").read_text())
    assert training["epochs"] == 2 and training["provenance"]["device_type"] == "cpu"
    metrics = evaluate_bloodflow.run(
        checkpoint, prepared, tmp_path / "run", EVALUATE, COORDINATES, device="cuda"
    )
    recorded = json.loads(metrics.read_text())["provenance"]
    assert recorded["device_type"] == "cuda" and recorded["device"].startswith("cuda:")
