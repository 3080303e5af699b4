"""FP32 training and rollout evaluation: determinism, resume after a kill, errors, bad files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow import data as bloodflow
from sciquant.workloads.bloodflow import evaluate as evaluate_bloodflow
from sciquant.workloads.bloodflow import train as train_bloodflow
from sciquant.workloads.bloodflow.data import PrepareSettings
from sciquant.workloads.bloodflow.features import Normalizer, state_increment, to_tensors
from sciquant.workloads.bloodflow.rollout import branch_fit, relative_error, rollout, rollout_all
from tests.test_bloodflow_prepare import write_dataset

TINY = {
    "hidden": 8,
    "processor_size": 2,
    "mlp_hidden_layers": 1,
    "train": {"epochs": 3, "steps_per_epoch": 4, "batch_size": 2, "rollout_steps": 2},
}

#: Complete run coordinates for commands whose run is beside the point.
RUN_COORDINATES = json.dumps(
    {"dataset": "d", "model": "m", "seed": 0, "target": "reference", "method": "none",
     "precision": "fp32"}
)  # fmt: skip


def tiny_prepared(root: Path) -> Path:
    """Six small Y-tree simulations prepared into `root`/prepared (3 train, 1 valid, 2 test)."""
    write_dataset(root / "raw", n_simulations=6)
    settings = PrepareSettings(keep_fraction=0.3, dt=0.05, loading_steps=3, time_offsets=2,
                               split={"train": 0.5, "valid": 0.17, "test": 0.33})  # fmt: skip
    bloodflow.prepare(root / "raw", root / "prepared", settings)
    return root / "prepared"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("flow"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_same_seed_gives_identical_weights_and_losses(prepared: Path, tmp_path: Path) -> None:
    first = train_bloodflow.run(prepared, tmp_path / "a", TINY, seed=3, progress=False)
    second = train_bloodflow.run(prepared, tmp_path / "b", TINY, seed=3, progress=False)
    other = train_bloodflow.run(prepared, tmp_path / "c", TINY, seed=4, progress=False)
    for name, value in weights(first).items():
        assert torch.equal(value, weights(second)[name]), name
    assert any(not torch.equal(v, weights(other)[k]) for k, v in weights(first).items())
    log_a = (tmp_path / "a" / "training_log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "training_log.csv").read_text().splitlines()
    # Same loss curve (the last column is wall time).
    assert [r.rsplit(",", 1)[0] for r in log_a] == [r.rsplit(",", 1)[0] for r in log_b]
    assert len(log_a) == 1 + TINY["train"]["epochs"]


def test_killed_training_resumes_from_last_epoch(prepared: Path, tmp_path: Path) -> None:
    settings = json.loads(json.dumps(TINY))
    settings["train"].update(epochs=6, steps_per_epoch=20)

    def command(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "sciquant.cli", "train", "--prepared", str(prepared),
            "--settings", json.dumps(settings), "--seed", "1", "--threads", "1", "--out", str(out),
        ]  # fmt: skip

    out = tmp_path / "killed"
    process = subprocess.Popen(
        command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "resume.pt").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no epoch finished within 120 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    done = torch.load(out / "resume.pt", weights_only=True)["epoch"] + 1
    assert 1 <= done < 6 and not (out / "checkpoint.pt").exists()

    rerun = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from {out / 'resume.pt'} after epoch {done}" in rerun.stdout
    assert f"epochs {done + 1}..6" in rerun.stdout
    # The resumed run ends where an uninterrupted one (same threads) ends.
    straight = tmp_path / "straight"
    subprocess.run(command(straight), capture_output=True, timeout=300, check=True)
    for name, value in weights(straight / "checkpoint.pt").items():
        assert torch.equal(value, weights(out / "checkpoint.pt")[name]), name


def test_relative_error_formula_on_hand_made_case() -> None:
    exact = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    predicted = np.array([[1.0, 2.5, 0.0], [2.0, 4.0, 0.0]])
    mask = np.array([[1.0, 1.0, 0.0]])  # third node is not a branch node: ignored
    expected = np.sqrt((0.5**2 + 1.0**2) / (1 + 4 + 9 + 16))
    assert relative_error(predicted, exact, mask) == pytest.approx(expected, rel=1e-12)
    assert relative_error(exact, exact, mask) == 0.0


def test_batched_rollout_equals_one_by_one(prepared: Path, tmp_path: Path) -> None:
    checkpoint = train_bloodflow.run(prepared, tmp_path / "m", TINY, seed=0, progress=False)
    model, state = train_bloodflow.load_model(checkpoint)
    norm = Normalizer.from_statistics(state["statistics"])
    index = bloodflow.load_index(prepared)
    graphs = [
        to_tensors(n, bloodflow.load_sample(prepared, n), norm)
        for n in index["samples"]["train"][:3]
    ]
    # Different lengths: the batched rollout pads the shorter ones and cuts them back.
    graphs[1].pressure, graphs[1].flowrate = graphs[1].pressure[:-4], graphs[1].flowrate[:-4]
    graphs[1].loading = graphs[1].loading[:-4]
    together = rollout_all(model, graphs, norm)
    for graph, (pressure, flowrate) in zip(graphs, together, strict=True):
        alone_p, alone_q = rollout(model, graph, norm)
        assert pressure.shape == tuple(alone_p.shape)
        np.testing.assert_allclose(pressure, alone_p.numpy(), rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(flowrate, alone_q.numpy(), rtol=1e-5, atol=1e-5)


def test_branch_fit_at_zero_position_is_the_branch_mean_and_keeps_junctions() -> None:
    flowrate = torch.tensor([1.0, 3.0, 7.0, 10.0, 20.0])
    branch_id = torch.tensor([0, 0, -1, 1, 1])
    averaged = branch_fit(flowrate, branch_id, torch.zeros(5), num_branches=2)
    assert averaged.tolist() == [2.0, 2.0, 7.0, 15.0, 15.0]


def test_branch_fit_is_the_least_squares_line_of_each_branch() -> None:
    """Against numpy's polyfit in float64, branch by branch; a line along a branch is kept."""
    rng = np.random.default_rng(0)
    branch_id = np.array([0, 0, 0, 0, -1, 1, 1, 1, -1, 2, 3, 3])
    distance = np.cumsum(rng.uniform(0.5, 2.0, len(branch_id)))
    position = np.zeros(len(branch_id))
    for b in range(4):
        nodes = branch_id == b
        centred = distance[nodes] - distance[nodes].mean()
        extent = 0.5 * np.ptp(centred)
        position[nodes] = centred / extent if extent > 0 else 0.0
    flowrate = rng.normal(size=len(branch_id))
    fitted = branch_fit(
        torch.tensor(flowrate), torch.tensor(branch_id), torch.tensor(position), num_branches=4
    ).numpy()
    expected = flowrate.copy()
    for b in range(4):
        nodes = branch_id == b
        degree = 1 if nodes.sum() > 1 else 0
        expected[nodes] = np.polyval(np.polyfit(distance[nodes], flowrate[nodes], degree),
                                     distance[nodes])  # fmt: skip
    np.testing.assert_allclose(fitted, expected, rtol=0, atol=1e-12)
    line = torch.tensor(3.0 + 0.5 * distance)
    kept = branch_fit(line, torch.tensor(branch_id), torch.tensor(position), 4)
    np.testing.assert_allclose(kept.numpy(), line.numpy(), rtol=1e-12)


def test_branch_positions_are_centred_along_each_branch(prepared: Path) -> None:
    """In [−1, 1], mean 0 and increasing downstream on every branch; 0 on junctions."""
    index = bloodflow.load_index(prepared)
    sample = bloodflow.load_sample(prepared, index["samples"]["test"][0])
    position, branch_id = sample["branch_position"], sample["branch_id"]
    assert np.all(position[branch_id < 0] == 0)
    for b in np.unique(branch_id[branch_id >= 0]):
        x = position[branch_id == b].astype(np.float64)
        assert abs(x.mean()) < 1e-6 and np.all(np.abs(x) <= 1 + 1e-6)
        assert np.ptp(x) == pytest.approx(2.0 if len(x) > 1 else 0.0, abs=1e-6)
    settings = PrepareSettings(branch_fit="mean")
    assert settings.branch_fit == "mean"
    with pytest.raises(SciquantError, match="prepare.branch_fit"):
        PrepareSettings(branch_fit="quadratic")


def test_rollout_feeds_back_the_realized_increments(prepared: Path) -> None:
    """Step t's previous-increment features are the increments of the state it rolled out, and
    its lumped-model features are the lumped step t → t+1 and the state's departure at t."""
    index = bloodflow.load_index(prepared)
    norm = Normalizer.from_statistics(index["statistics"])
    graph = to_tensors(index["samples"]["test"][0], bloodflow.load_sample(prepared, index["samples"]["test"][0]), norm)  # fmt: skip  # noqa: E501
    names = index["node_features"]
    previous = slice(names.index("previous_delta_pressure"), names.index("previous_delta_flowrate") + 1)  # fmt: skip  # noqa: E501
    linear = slice(names.index("linear_delta_pressure"), names.index("linear_deviation_flowrate") + 1)  # fmt: skip  # noqa: E501
    assert (previous.stop - previous.start, linear.stop - linear.start) == (2, 4)
    inputs: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, e: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        inputs.append(x.clone())
        return 0.3 * torch.randn(x.shape[0], 2, generator=generator)

    rollout(step, graph, norm)
    zero = state_increment(graph.pressure[0], graph.flowrate[0], graph.pressure[0], graph.flowrate[0], norm)  # fmt: skip  # noqa: E501
    torch.testing.assert_close(inputs[0][:, previous], zero)
    for before, now in zip(inputs[:-1], inputs[1:], strict=True):
        expected = state_increment(now[:, 0], now[:, 1], before[:, 0], before[:, 1], norm)
        torch.testing.assert_close(now[:, previous], expected, rtol=1e-5, atol=1e-5)
    assert inputs[5][:, previous].abs().max() > 0.1  # the increments are fed back, not zeros
    lp, lq = graph.linear_pressure, graph.linear_flowrate
    for t, x in enumerate(inputs):
        # By hand: the lumped increment in model-output units, the departure z-scored.
        step_p = ((lp[t + 1] - lp[t]) * norm.std["pressure"] - norm.mean["delta_pressure"]) / norm.std["delta_pressure"]  # fmt: skip  # noqa: E501
        away_q = ((x[:, 1] - lq[t]) * norm.std["flowrate"] - norm.mean["linear_deviation_flowrate"]) / norm.std["linear_deviation_flowrate"]  # fmt: skip  # noqa: E501
        torch.testing.assert_close(x[:, linear][:, 0], step_p, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x[:, linear][:, 3], away_q, rtol=1e-5, atol=1e-4)
    # Off the true trajectory, the departure grows: the random increments drift away.
    assert inputs[-1][:, linear][:, 3].abs().mean() > 3 * inputs[0][:, linear][:, 3].abs().mean()


def test_training_window_starts_from_the_true_previous_increment(prepared: Path) -> None:
    index = bloodflow.load_index(prepared)
    norm = Normalizer.from_statistics(index["statistics"])
    graphs = train_bloodflow.load_graphs(prepared, index["samples"]["train"][:2], norm)
    batch = train_bloodflow.make_batch(graphs, [(0, 0), (1, 5)], steps=2, boundary_weight=1.0)
    n0 = graphs[0].num_nodes
    # At step 0 there is no step before: the state itself (a zero increment).
    assert torch.equal(batch.pressure_before[:n0], graphs[0].pressure[0])
    assert torch.equal(batch.flowrate_before[n0:], graphs[1].flowrate[4])


def test_evaluation_writes_metrics_and_figures(prepared: Path, tmp_path: Path) -> None:
    checkpoint = train_bloodflow.run(prepared, tmp_path / "fp32", TINY, seed=0, progress=False)
    coordinates = {
        "dataset": "flow", "model": "mgn", "seed": 0, "target": "reference",
        "method": "none", "precision": "fp32", "study": "t", "settings_hashes": {"threads": "x"},
    }  # fmt: skip
    path = evaluate_bloodflow.run(
        checkpoint, prepared, tmp_path / "run", {"repeats": 2, "figure_simulations": 1}, coordinates
    )
    payload = json.loads(path.read_text())
    metrics = payload["metrics"]
    assert payload["coordinates"]["precision"] == "fp32"
    assert metrics["test_simulations"] == 2 and len(metrics["per_simulation"]) == 2
    mean = np.mean([m["pressure_error_pct"] for m in metrics["per_simulation"].values()])
    assert metrics["pressure_error_pct"] == pytest.approx(mean)
    median = np.median([m["flowrate_error_pct"] for m in metrics["per_simulation"].values()])
    assert metrics["flowrate_error_pct_median"] == pytest.approx(median)
    assert metrics["rollout_time_s_min"] <= metrics["rollout_time_s_median"]
    assert (tmp_path / "run" / "pressure.png").stat().st_size > 5000
    # The priors alone, by hand from the samples' physical arrays (no network).
    for baseline, prefix in (("lumped_model", "lumped"), ("calibrated_model", "calibrated")):
        by_hand = {"pressure": [], "flowrate": []}
        for name in bloodflow.load_index(prepared)["samples"]["test"]:
            sample = bloodflow.load_sample(prepared, name)
            cycle = sample["loading"] == 0
            branch = sample["node_type"] == bloodflow.BRANCH
            for field, errors in by_hand.items():
                exact = sample[field][cycle][:, branch].astype(np.float64)
                prior = sample[f"{prefix}_{field}"][cycle][:, branch].astype(np.float64)
                errors.append(100 * np.linalg.norm(prior - exact) / np.linalg.norm(exact))
        values = payload["baselines"][baseline]
        for field in ("pressure", "flowrate"):
            expected = np.mean(by_hand[field])
            assert values[f"{field}_error_pct"] == pytest.approx(expected, rel=1e-4)
            median = np.median(by_hand[field])
            assert values[f"{field}_error_pct_median"] == pytest.approx(median, rel=1e-4)
            per_simulation = [v[f"{field}_error_pct"] for v in values["per_simulation"].values()]
            assert np.mean(per_simulation) == pytest.approx(expected, rel=1e-9)
    # The rollout's physics checks, and the data's own beside them.
    assert metrics["junction_mass_residual_pct"] >= 0
    assert metrics["outlet_resistance_residual_pct"] >= 0
    assert set(payload["data_physics_checks"]) >= {"junction_mass_residual_pct"}
    assert payload["gain_baseline"] == "calibrated_model"  # the retained gain's baseline

    # The FP32 network on its training simulations (first time offset), beside the calibrated
    # prior there: the same errors as an evaluation whose test split is those simulations.
    index = bloodflow.load_index(prepared)
    train = [name for name in index["samples"]["train"] if name.endswith("_o0")]
    assert len(train) >= 2 and metrics["training_simulations"] == len(train)
    as_test = tmp_path / "train_as_test"
    shutil.copytree(prepared, as_test)
    index["samples"]["test"] = train
    (as_test / "index.json").write_text(json.dumps(index))
    settings = {"repeats": 1, "figure_simulations": 0, "training_simulations": 0}
    other = {**coordinates, "target": "cpu-x86"}  # not the FP32 reference run: no training errors
    seen = json.loads(
        evaluate_bloodflow.run(checkpoint, as_test, tmp_path / "seen", settings, other).read_text()
    )
    assert not any(name.startswith("training_") for name in seen["metrics"])
    for field in ("pressure", "flowrate"):
        assert metrics[f"training_{field}_error_pct"] == pytest.approx(
            seen["metrics"][f"{field}_error_pct"], rel=1e-5
        )
        assert metrics[f"training_calibrated_{field}_error_pct"] == pytest.approx(
            seen["baselines"]["calibrated_model"][f"{field}_error_pct"], rel=1e-9
        )


def test_rerun_on_other_data_starts_from_scratch(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run's resume.pt is not resumed once the prepared data changed (same shapes)."""
    out = tmp_path / "fp32"
    first = train_bloodflow.run(prepared, out, TINY, seed=0, progress=False)
    weights = torch.load(first, weights_only=True)["state_dict"]
    train_bloodflow.run(prepared, out, TINY, seed=0, progress=False)
    assert "resuming from" in capsys.readouterr().out  # same data: nothing left to train
    changed = tmp_path / "prepared"
    shutil.copytree(prepared, changed)
    index = json.loads((changed / "index.json").read_text())
    index["statistics"]["flowrate"]["std"] *= 1.5
    (changed / "index.json").write_text(json.dumps(index))
    again = train_bloodflow.run(changed, out, TINY, seed=0, progress=False)
    assert "inputs or seed; starting from scratch" in capsys.readouterr().out
    retrained = torch.load(again, weights_only=True)["state_dict"]
    assert not torch.equal(retrained["decoder.layers.1.weight"], weights["decoder.layers.1.weight"])


def test_bad_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(SciquantError, match=r"checkpoint\.pt: not a readable sciquant checkpoint"):
        train_bloodflow.load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(SciquantError, match=r"foreign\.pt: not a sciquant MeshGraphNet checkpoint"):
        train_bloodflow.load_model(foreign)
    with pytest.raises(SciquantError, match="not found; run the train stage first"):
        train_bloodflow.load_model(tmp_path / "missing.pt")


def test_bad_checkpoint_cli_exits_2_without_traceback(prepared: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_text("nonsense")
    result = subprocess.run(
        [sys.executable, "-m", "sciquant.cli", "evaluate", "--checkpoint", str(garbage),
         "--prepared", str(prepared), "--coordinates", RUN_COORDINATES,
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "checkpoint.pt: not a readable sciquant checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_rollout_state_stays_on_the_step_device(
    prepared: Path, tmp_path: Path, device: str
) -> None:
    """A device rollout moves the sample once, runs every step there, returns CPU series."""
    checkpoint = train_bloodflow.run(prepared, tmp_path / "m", TINY, seed=0, progress=False)
    model, state = train_bloodflow.load_model(checkpoint)
    norm = Normalizer.from_statistics(state["statistics"])
    index = bloodflow.load_index(prepared)
    name = index["samples"]["test"][0]
    graph = to_tensors(name, bloodflow.load_sample(prepared, name), norm)
    seen: list[torch.device] = []
    on_device = model.to(device)

    def step(x: torch.Tensor, e: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        seen.extend({x.device, e.device, edge_index.device})
        return on_device(x, e, edge_index)

    pressure, flowrate = rollout(step, graph, norm, device=device)
    assert set(seen) == {torch.device(device, 0) if device == "cuda" else torch.device(device)}
    assert pressure.device.type == flowrate.device.type == "cpu"
    reference_p, reference_q = rollout(model.cpu(), graph, norm)
    np.testing.assert_allclose(pressure.numpy(), reference_p.numpy(), rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(flowrate.numpy(), reference_q.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.5])
def test_flow_loss_weighted_by_area(prepared: Path, exponent: float) -> None:
    """One step, no noise, a zero correction (the lumped step): the loss by hand from the batch."""
    index = bloodflow.load_index(prepared)
    norm = Normalizer.from_statistics(index["statistics"])
    graphs = train_bloodflow.load_graphs(prepared, index["samples"]["train"][:2], norm)
    batch = train_bloodflow.make_batch(graphs, [(0, 1), (1, 4)], steps=1, boundary_weight=3.0)
    settings = train_bloodflow.TrainSettings.of(
        {"train": {"rollout_steps": 1, "flow_area_exponent": exponent}}
    )

    def zero(x: torch.Tensor, e: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 2)

    loss = float(train_bloodflow.rollout_loss(zero, batch, norm, settings, noise=None))
    f64 = {k: v.double() for k, v in vars(batch).items() if v.is_floating_point()}
    std, mean = norm.std, norm.mean
    target_p = (
        (f64["pressure"][1] - f64["pressure"][0]) * std["pressure"] - mean["delta_pressure"]
    ) / std["delta_pressure"]
    target_q = (
        (f64["flowrate"][1] - f64["flowrate"][0]) * std["flowrate"] - mean["delta_flowrate"]
    ) / std["delta_flowrate"]
    lumped_p = (
        (f64["linear_pressure"][1] - f64["linear_pressure"][0]) * std["pressure"]
        - mean["delta_pressure"]
    ) / std["delta_pressure"]
    lumped_q = (
        (f64["linear_flowrate"][1] - f64["linear_flowrate"][0]) * std["flowrate"]
        - mean["delta_flowrate"]
    ) / std["delta_flowrate"]
    error_p, error_q = lumped_p - target_p, lumped_q - target_q
    assert error_q.abs().max() > 0.01  # the lumped step is not the true one: a real check
    area = (f64["static"][:, 0] * std["area"] + mean["area"]) ** exponent
    flow_term = np.where(batch.inlet.numpy(), 0.0, (area / area.mean() * error_q**2).numpy())
    w = f64["weight"].numpy()
    expected = np.sum(w * (error_p.numpy() ** 2 + flow_term)) / w.sum()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_qat_resumes_only_from_the_same_fp32_model(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QAT keeps a resume.pt too: a rerun resumes it, a rerun from other FP32 weights does not."""
    from sciquant.workloads.bloodflow import quantize as quant_bloodflow

    settings = {"quantize": {"qat": {"epochs": 2, "steps_per_epoch": 2}}, "model": TINY}
    fp32 = train_bloodflow.run(prepared, tmp_path / "a", TINY, seed=0, progress=False)
    out = tmp_path / "qat"

    def qat(checkpoint: Path) -> str:
        quant_bloodflow.run(
            checkpoint, prepared, out, "reference", "qat-lsq", "w4a8", settings, progress=False
        )
        return capsys.readouterr().out

    qat(fp32)
    assert (out / "resume.pt").is_file() and (out / "quantized.pt").is_file()
    assert "resuming from" in qat(fp32)  # nothing left to fine-tune
    other = train_bloodflow.run(prepared, tmp_path / "b", TINY, seed=1, progress=False)
    assert "inputs or seed; starting from scratch" in qat(other)


def test_reference_formulation_trains_and_evaluates_on_18_features(
    prepared: Path, tmp_path: Path
) -> None:
    """The reference MeshGraphNet: 18 node features, physical z-scores, branch-mean flow."""
    from sciquant.workloads.bloodflow.features import Normalizer, step_inputs

    settings = {**TINY, "formulation": "reference"}
    checkpoint = train_bloodflow.run(prepared, tmp_path / "fp32", settings, seed=0, progress=False)
    model, state = train_bloodflow.load_model(checkpoint)
    assert state["formulation"] == "reference"
    assert model.node_encoder.layers[0].in_features == len(bloodflow.REFERENCE_NODE_FEATURES)
    index = bloodflow.load_index(prepared)
    norm = Normalizer.of_checkpoint(state)
    name = index["samples"]["test"][0]
    sample = bloodflow.load_sample(prepared, name)
    graph = to_tensors(name, sample, norm)
    # Physical z-scores: the normalized series maps back to the raw pressure exactly.
    physical = graph.physical(norm, "pressure", graph.pressure.numpy())
    np.testing.assert_allclose(physical, sample["pressure"], rtol=1e-5)
    assert not graph.branch_position.any()  # the fit is the reference's branch mean
    x, prior_step = step_inputs(
        norm, graph.static, graph.pressure[0], graph.flowrate[0],
        graph.loading[0].expand(graph.num_nodes),
        graph.flowrate[1][graph.inlet_of_nodes()], graph.flowrate[0][graph.inlet_of_nodes()],
        torch.zeros(graph.num_nodes, 2),
        (graph.linear_pressure[0], graph.linear_flowrate[0]),
        (graph.linear_pressure[1], graph.linear_flowrate[1]),
    )  # fmt: skip
    assert prior_step is None and x.shape == (graph.num_nodes, 18)
    np.testing.assert_allclose(x[:, 0], graph.pressure[0])
    np.testing.assert_allclose(x[:, -1], graph.flowrate[1][graph.inlet_of_nodes()])
    coordinates = {
        "dataset": "flow", "model": "ref", "seed": 0, "target": "reference",
        "method": "none", "precision": "fp32", "study": "t", "settings_hashes": {"threads": "x"},
    }  # fmt: skip
    path = evaluate_bloodflow.run(
        checkpoint, prepared, tmp_path / "run", {"repeats": 1}, coordinates
    )
    metrics = json.loads(path.read_text())["metrics"]
    assert math.isfinite(metrics["pressure_error_pct"]) and math.isfinite(
        metrics["flowrate_error_pct"]
    )


def subnormals_flushed() -> bool:
    """Whether float32 arithmetic now flushes a subnormal result (1e-41) to zero."""
    return torch.tensor([1e-38], dtype=torch.float32).div(1e3).item() == 0.0


def test_training_steps_flush_subnormals_and_leave_them_kept_after(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with train_bloodflow.flushing_denormals():
        if not subnormals_flushed():
            pytest.skip("this CPU cannot flush subnormal floats to zero")
    assert not subnormals_flushed()
    seen: list[bool] = []
    loss = train_bloodflow.rollout_loss

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(subnormals_flushed())
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_bloodflow, "rollout_loss", recording)
    settings = json.loads(json.dumps(TINY))
    settings["train"]["weight_decay"] = 0.01
    train_bloodflow.run(prepared, tmp_path / "run", settings, seed=0, progress=False)
    steps = TINY["train"]["epochs"] * TINY["train"]["steps_per_epoch"]
    assert len(seen) >= steps and all(seen)
    assert not subnormals_flushed()
