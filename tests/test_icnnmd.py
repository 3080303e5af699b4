"""ICNNMD on pixel maps: architecture, training (determinism, resume, k-fold), evaluation,
the Keras runner, and the errors for missing or broken files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sciquant.errors import SciquantError  # noqa: E402
from sciquant.runtime.keras import configure_threads  # noqa: E402

configure_threads(1)

from sciquant.models.icnnmd import (  # noqa: E402
    MIN_GRID,
    build_icnnmd,
    count_parameters,
    icnnmd_parameters,
    model_bytes,
)
from sciquant.runtime.keras import KerasRunner  # noqa: E402
from sciquant.workloads.md import evaluate as evaluate_md  # noqa: E402
from sciquant.workloads.md import train as train_md  # noqa: E402

# Keras's own saving code converts tensors with a NumPy-1 idiom; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GRID = 16
FAST = {"epochs": 4, "batch_size": 16, "learning_rate": 1e-3, "seed": 1, "progress": True}
COORDINATES = {
    "dataset": "synthetic",
    "model": "icnnmd",
    "seed": 1,
    "target": "reference",
    "method": "none",
    "precision": "fp32",
}


def write_prepared(
    root: Path, grid: int = GRID, trajectories: int = 4, frames: int = 40, seed: int = 0,
    single_class: bool = False,
) -> Path:  # fmt: skip
    """A prepared folder in the sciquant-md-pixelmaps format: noisy maps, two separable states.

    Trajectory t has state t % 2; state 1 is brighter in one quadrant of the red channel. Each
    trajectory's frames drift slowly (a random walk) and are split in time: 60 % train,
    20 % validation, 20 % test.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "trajectory", "frame", "split")}
    for t in range(trajectories):
        label = 0 if single_class else t % 2
        drift = np.cumsum(rng.normal(0, 0.01, size=(frames, 1, 1, 1)), axis=0)
        x = 0.5 + 0.15 * rng.standard_normal((frames, grid, grid, 3)) + drift
        if label:
            x[:, : grid // 2, : grid // 2, 0] += 0.3
        split = np.zeros(frames, np.int8)
        split[int(0.6 * frames) : int(0.8 * frames)] = 1
        split[int(0.8 * frames) :] = 2
        parts["x"].append(np.clip(x, 0, 1).astype(np.float32))
        parts["y"].append(np.full(frames, label, np.int64))
        parts["trajectory"].append(np.full(frames, t, np.int64))
        parts["frame"].append(np.arange(frames, dtype=np.int64))
        parts["split"].append(split)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "pixelmaps.npz", **{k: np.concatenate(v) for k, v in parts.items()})
    index = {"format": "sciquant-md-pixelmaps", "version": 1, "grid": grid}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("md") / "prepared")


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_md.run(prepared, tmp_path_factory.mktemp("train") / "fp32", **FAST)


def weights_of(path: Path) -> list[np.ndarray]:
    return train_md.load_model(path).get_weights()


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path) as stream:
        return list(csv.DictReader(stream))


# ------------------------------------------------------------------------------------------
# architecture


def test_architecture_matches_reference() -> None:
    model = build_icnnmd(GRID, seed=0)
    layers = [(type(layer).__name__, layer) for layer in model.layers[1:]]
    kinds = [kind for kind, _ in layers]
    assert kinds == [
        "Conv2D", "Conv2D", "Activation", "MaxPooling2D", "Dropout",
        "Conv2D", "Activation", "Conv2D", "Activation", "MaxPooling2D", "Dropout",
        "Flatten", "Dense", "Activation", "Dropout", "Dense", "Activation",
    ]  # fmt: skip
    convs = [layer for kind, layer in layers if kind == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64]
    assert [c.padding for c in convs] == ["same", "valid", "same", "valid"]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [d.rate for kind, d in layers if kind == "Dropout"] == [0.25, 0.25, 0.5]
    assert [d.units for kind, d in layers if kind == "Dense"] == [512, 2]
    assert [a.activation.__name__ for kind, a in layers if kind == "Activation"] == [
        "relu", "relu", "relu", "relu", "softmax"
    ]  # fmt: skip
    # 16 → same 16 → valid 14 → pool 7 → same 7 → valid 5 → pool 2: flatten 2·2·64 = 256.
    by_hand = (
        (3 * 3 * 3 + 1) * 32 + (3 * 3 * 32 + 1) * 32 + (3 * 3 * 32 + 1) * 64
        + (3 * 3 * 64 + 1) * 64 + (256 + 1) * 512 + (512 + 1) * 2
    )  # fmt: skip
    assert by_hand == 198178
    assert count_parameters(model) == icnnmd_parameters(GRID) == by_hand
    assert model_bytes(model) == 4 * by_hand
    assert model.output_shape == (None, 2)
    # The smallest grid works, a smaller one is refused with a user-facing error.
    assert build_icnnmd(10).output_shape == (None, 2)
    assert count_parameters(build_icnnmd(23, 1, 3)) == icnnmd_parameters(23, 1, 3)
    with pytest.raises(SciquantError, match="too small"):
        build_icnnmd(9)
    # Initialization is fixed by the seed alone.
    same = build_icnnmd(GRID, seed=0).get_weights()
    other = build_icnnmd(GRID, seed=1).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), same, strict=True))
    assert not np.array_equal(model.get_weights()[0], other[0])


def test_time_block_folds_are_contiguous_per_trajectory() -> None:
    trajectory = np.repeat([0, 1], 10)
    frame = np.concatenate([np.arange(10), np.arange(10)[::-1]])
    folds = train_md.time_block_folds(trajectory, frame, 3)
    for t in (0, 1):
        mask = trajectory == t
        by_time = folds[mask][np.argsort(frame[mask])]
        assert by_time.tolist() == [0] * 4 + [1] * 3 + [2] * 3


# ------------------------------------------------------------------------------------------
# training


def test_training_reaches_high_accuracy_and_writes_outputs(trained: Path) -> None:
    out = trained.parent
    assert trained == out / "model.keras"
    log = read_log(out / "train_log.csv")
    assert list(log[0]) == list(train_md.LOG_COLUMNS)
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert float(log[-1]["val_accuracy"]) >= 0.9
    summary = json.loads((out / "training.json").read_text())
    assert summary["settings"]["epochs"] == 4 and summary["settings"]["folds"] == 0
    assert summary["model"]["parameters"] == icnnmd_parameters(GRID)
    assert summary["data"]["frames"] == {"train": 96, "val": 32, "test": 32}
    assert len(summary["data"]["sha256"]) == 64
    assert "keras" in summary["provenance"]["packages"]
    assert summary["cross_validation"] is None
    assert (out / "resume" / "checkpoint.npz").is_file()


def test_same_seed_gives_identical_weights(prepared: Path, trained: Path, tmp_path: Path) -> None:
    again = train_md.run(prepared, tmp_path / "again", **{**FAST, "progress": False})
    for a, b in zip(weights_of(trained), weights_of(again), strict=True):
        assert np.array_equal(a, b)


def test_resume_after_interruption_continues_bit_identically(
    prepared: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "interrupted"
    real_epoch = train_md._train_epoch

    def killed_in_epoch_3(model, train, val, batch_size, key, epoch):  # noqa: ANN001
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real_epoch(model, train, val, batch_size, key, epoch)

    monkeypatch.setattr(train_md, "_train_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_md.run(prepared, out, **FAST)
    monkeypatch.setattr(train_md, "_train_epoch", real_epoch)
    assert [int(r["epoch"]) for r in read_log(out / "train_log.csv")] == [1, 2]
    assert not (out / "model.keras").exists()
    capsys.readouterr()

    # The rerun trains epochs 3 and 4 only and ends exactly where an uninterrupted run does.
    train_md.run(prepared, out, **FAST)
    printed = capsys.readouterr().out
    assert "after epoch 2" in printed and "epoch 1/4" not in printed and "epoch 3/4" in printed
    assert [int(r["epoch"]) for r in read_log(out / "train_log.csv")] == [1, 2, 3, 4]
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_after_epoch"] == 2
    for a, b in zip(weights_of(trained), weights_of(out / "model.keras"), strict=True):
        assert np.array_equal(a, b)

    # A rerun after completion does nothing and leaves the outputs alone.
    stamp = (out / "model.keras").stat().st_mtime_ns, (out / "training.json").read_text()
    train_md.run(prepared, out, **FAST)
    assert "nothing to do" in capsys.readouterr().out
    assert stamp == ((out / "model.keras").stat().st_mtime_ns, (out / "training.json").read_text())


def test_kfold_reports_per_fold_accuracy(prepared: Path, tmp_path: Path) -> None:
    settings = {**FAST, "epochs": 1, "folds": 2, "progress": False}
    train_md.run(prepared, tmp_path / "cv", **settings)
    cv = json.loads((tmp_path / "cv" / "training.json").read_text())["cross_validation"]
    assert cv["folds"] == 2 and len(cv["per_fold"]) == 2
    # Train + val frames: 32 per trajectory, 16 per block, 4 trajectories.
    assert [f["val_frames"] for f in cv["per_fold"]] == [64, 64]
    accuracies = [f["val_accuracy"] for f in cv["per_fold"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert cv["val_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert cv["val_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))


# ------------------------------------------------------------------------------------------
# runner and evaluation


def test_keras_runner_matches_model_predict(prepared: Path, trained: Path) -> None:
    data = train_md.load_pixelmaps(prepared)
    x, _ = data.subset("test")
    model = train_md.load_model(trained)
    runner = KerasRunner(trained)
    predicted = runner.predict(x, batch_size=7)
    assert predicted.dtype == np.float32 and predicted.shape == (len(x), 2)
    np.testing.assert_allclose(predicted, model.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(KerasRunner(model).predict(x), predicted, atol=1e-6)
    timing = runner.time_batch1(x, repeats=5, warmup=2)
    for key in ("h2d_ms", "compute_ms", "d2h_ms", "total_ms", "total_ms_min", "total_ms_max"):
        assert timing[key] > 0, key
    assert timing["total_ms_min"] <= timing["total_ms"] <= timing["total_ms_max"]


def test_evaluate_writes_metrics_and_figure(prepared: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "metrics.json"
    written = evaluate_md.run(prepared, trained, out, coordinates=COORDINATES, repeats=5,
                              extra={"calibration_frames": 0})  # fmt: skip
    assert written == out
    payload = json.loads(out.read_text())
    assert list(payload) == [
        "coordinates", "study", "settings_hashes", "simulated", "runtime", "metrics", "provenance",
        "host",
    ]  # fmt: skip
    assert set(payload["host"]["cpu_features"]) >= {"avx2", "avx512_vnni", "amx_int8"}
    assert payload["coordinates"] == COORDINATES
    assert payload["runtime"] == "keras" and payload["simulated"] is False
    metrics = payload["metrics"]
    assert 0.9 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    assert metrics["test_frames"] == 32
    assert np.asarray(metrics["confusion"]).shape == (2, 2)
    assert np.asarray(metrics["confusion"]).sum() == metrics["test_frames"]
    assert metrics["latency_ms_median"] > 0 and metrics["compute_ms_median"] > 0
    assert metrics["latency_ms_min"] <= metrics["latency_ms_median"] <= metrics["latency_ms_max"]
    assert metrics["latency_repeats"] == 5
    assert metrics["parameters"] == icnnmd_parameters(GRID)
    assert metrics["model_bytes"] == trained.stat().st_size
    assert metrics["calibration_frames"] == 0
    assert "tensorflow" in json.dumps(payload["provenance"]["packages"])
    assert (out.parent / "confusion.png").stat().st_size > 1000


def test_classification_metrics_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    predicted = np.array([0, 0, 1, 1, 1, 0, 1])
    metrics = evaluate_md.classification_metrics(labels, np.eye(2, dtype=np.float32)[predicted])
    assert metrics["confusion"] == [[2, 1], [1, 3]]
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics["f1_macro"] == pytest.approx((2 * 2 / (4 + 2) + 6 / 8) / 2)


# ------------------------------------------------------------------------------------------
# errors


def test_truncated_model_file_names_the_file(trained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model.keras"
    broken.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    with pytest.raises(SciquantError, match=str(broken)):
        train_md.load_model(broken)
    with pytest.raises(SciquantError, match="not found"):
        train_md.load_model(tmp_path / "missing.keras")


def test_missing_inputs_and_single_class_are_user_errors(
    prepared: Path, trained: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(SciquantError, match=str(missing)):
        train_md.run(missing, tmp_path / "out", **FAST)
    with pytest.raises(SciquantError, match=str(missing)):
        evaluate_md.run(missing, trained, tmp_path / "m.json", coordinates=COORDINATES)
    with pytest.raises(SciquantError, match="missing.keras"):
        evaluate_md.run(prepared, tmp_path / "missing.keras", tmp_path / "m.json",
                        coordinates=COORDINATES)  # fmt: skip
    one_class = write_prepared(tmp_path / "one", frames=10, single_class=True)
    with pytest.raises(SciquantError, match="pixelmaps.npz.*class"):
        train_md.run(one_class, tmp_path / "out", **FAST)
    (one_class / "index.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(SciquantError, match="index.json"):
        train_md.load_pixelmaps(one_class)
    (prepared.parent / "corrupt").mkdir()
    (prepared.parent / "corrupt" / "index.json").write_text((prepared / "index.json").read_text())
    (prepared.parent / "corrupt" / "pixelmaps.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(SciquantError, match="pixelmaps.npz"):
        train_md.load_pixelmaps(prepared.parent / "corrupt")


def test_study_knows_the_networks_minimum_grid() -> None:
    """The dry run's check uses a copy of MIN_GRID (importing Keras there would slow it)."""
    from sciquant.study import ICNNMD_MIN_GRID

    assert ICNNMD_MIN_GRID == MIN_GRID
