"""FP32 training of the ICNNMD classifier on prepared pixel maps (the `md` workload).

As in ICNNMD: RMSprop (learning rate 1e-4), sparse categorical cross-entropy, batch 128,
5 epochs; training on split 0, validation on split 1 (the test split 2 is left to evaluation).

Determinism and resume: the model's initial weights and dropout layers have their own seeds
(`sciquant.models.icnnmd`); every epoch shuffles the frames with a generator seeded by
(seed, epoch) and resets every dropout layer's generator to a state derived from (seed, epoch),
and TensorFlow runs with op determinism on. An epoch therefore computes the same whether it runs
after the previous one or after a resume. After every epoch the weights, the optimizer's
variables (RMSprop's moving averages and its step counter) and the log are written atomically to
`resume/checkpoint.npz`; a killed run restarts after the last finished epoch and ends with the
same weights as an uninterrupted one. A rerun after completion (same settings, same data) does
nothing; a rerun with more epochs continues from the checkpoint.

Optional k-fold cross-validation (`folds >= 2`) over the train + validation frames: each
trajectory's frames, in time order, are cut into `folds` contiguous blocks and fold i holds out
block i of every trajectory. Frames are never shuffled across folds, so the strongly
time-correlated neighbours of a held-out frame are (apart from the one frame on each side of a
block boundary) in the held-out block too. Each fold trains a fresh model for `epochs` epochs;
finished folds are kept in `resume/folds.json` and not redone on a rerun. Then the final model
is trained on the train split as without cross-validation.

Outputs in `out`: `model.keras` (final weights, no optimizer), `train_log.csv`, `training.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.data.download import sha256_of
from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path, package_versions, provenance, write_csv, write_json
from sciquant.runtime.keras import configure_threads, load_keras_model
from sciquant.workloads.md import data as md_data

__all__ = [
    "LOG_COLUMNS",
    "PixelMaps",
    "load_model",
    "load_pixelmaps",
    "run",
    "time_block_folds",
]

DATA_FORMAT = "sciquant-md-pixelmaps"
DATA_VERSION = 1
CHECKPOINT_FORMAT = "sciquant-icnnmd-resume"
CHECKPOINT_VERSION = 1
TRAINING_FORMAT = "sciquant-icnnmd-training"
LOG_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
TF_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class PixelMaps:
    """The prepared data set: pixel maps, labels, where each frame comes from, and its split."""

    path: Path
    x: np.ndarray  # float32 (N, S, S, C) in [0, 1]
    y: np.ndarray  # int64 (N,)
    trajectory: np.ndarray  # int64 (N,)
    frame: np.ndarray  # int64 (N,)
    split: np.ndarray  # int8 (N,): 0 train, 1 val, 2 test
    index: dict[str, Any]

    @property
    def grid(self) -> int:
        return int(self.x.shape[1])

    @property
    def channels(self) -> int:
        return int(self.x.shape[3])

    @property
    def n_classes(self) -> int:
        return max(2, int(self.y.max()) + 1) if len(self.y) else 2

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == SPLITS[split]
        return self.x[mask], self.y[mask]

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == code).sum()) for name, code in SPLITS.items()}


def load_pixelmaps(prepared: Path) -> PixelMaps:
    """Read `prepared/pixelmaps.npz` and `prepared/index.json`; errors name the file."""
    prepared = Path(prepared)
    index = md_data.load_index(prepared)
    arrays = md_data.load_prepared(prepared)
    data_path = prepared / "pixelmaps.npz"
    y = arrays["y"].astype(np.int64)
    if len(y) and y.min() < 0:
        raise SciquantError(f"{data_path}: negative labels; rerun the prepare stage")
    if not np.isin(arrays["split"], list(SPLITS.values())).all():
        raise SciquantError(f"{data_path}: split values other than 0/1/2; rerun prepare")
    return PixelMaps(
        path=data_path,
        x=arrays["x"].astype(np.float32, copy=False),
        y=y,
        trajectory=arrays["trajectory"].astype(np.int64),
        frame=arrays["frame"].astype(np.int64),
        split=arrays["split"].astype(np.int8),
        index=index,
    )


def load_model(path: Path) -> Any:
    """The trained (or quantized) Keras model in `path`; SciquantError naming it if unreadable."""
    return load_keras_model(Path(path))


def time_block_folds(trajectory: np.ndarray, frame: np.ndarray, folds: int) -> np.ndarray:
    """Fold number of every frame: each trajectory's frames, in time order, cut into `folds`
    contiguous blocks (sizes differ by at most one); block i of every trajectory is fold i."""
    assignment = np.full(len(trajectory), -1, dtype=np.int64)
    for traj in np.unique(trajectory):
        members = np.flatnonzero(trajectory == traj)
        ordered = members[np.argsort(frame[members], kind="stable")]
        for fold, block in enumerate(np.array_split(ordered, folds)):
            assignment[block] = fold
    return assignment


# --------------------------------------------------------------------------------------------
# training


def _seed_tf(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _compiled_model(data: PixelMaps, seed: int, learning_rate: float) -> Any:
    import keras

    from sciquant.models.icnnmd import build_icnnmd

    model = build_icnnmd(data.grid, data.channels, data.n_classes, seed=seed)
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,  # XLA off: same kernels in every run, no compile time on small CPUs
    )
    model.optimizer.build(model.trainable_variables)
    return model


def _reset_dropout(model: Any, key: list[int]) -> None:
    """Put every dropout layer's random generator in a state given by `key` (seed, epoch…)."""
    for number, layer in enumerate(model.layers):
        generator = getattr(layer, "seed_generator", None)
        if generator is None:
            continue
        value = int(np.random.default_rng([*key, number]).integers(1, 2**31 - 1))
        generator.state.assign(np.array([value, 0], dtype=generator.state.dtype))


def _train_epoch(
    model: Any,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    key: list[int],
    epoch: int,
) -> dict[str, float]:
    """One epoch over `train` in an order drawn from `key` + epoch; metrics of the epoch."""
    started = time.perf_counter()
    x, y = train
    order = np.random.default_rng([*key, epoch]).permutation(len(x))
    _reset_dropout(model, [*key, epoch])
    history = model.fit(
        x[order],
        y[order],
        batch_size=batch_size,
        epochs=epoch + 1,
        initial_epoch=epoch,
        shuffle=False,
        verbose=0,
        validation_data=val if len(val[0]) else None,
    ).history
    return {
        "epoch": epoch + 1,
        "loss": float(history["loss"][-1]),
        "accuracy": float(history["accuracy"][-1]),
        "val_loss": float(history.get("val_loss", [math.nan])[-1]),
        "val_accuracy": float(history.get("val_accuracy", [math.nan])[-1]),
        "seconds": time.perf_counter() - started,
    }


def _format_row(row: dict[str, float], epochs: int, prefix: str = "") -> str:
    return (
        f"{prefix}epoch {int(row['epoch'])}/{epochs}: loss {row['loss']:.4f}, accuracy "
        f"{row['accuracy']:.4f}, val_loss {row['val_loss']:.4f}, val_accuracy "
        f"{row['val_accuracy']:.4f}, {row['seconds']:.1f} s"
    )


def _check_classes(y: np.ndarray, path: Path, what: str) -> None:
    classes = np.unique(y)
    if len(classes) < 2:
        raise SciquantError(
            f"{path}: the {what} holds frames of {len(classes)} class(es) "
            f"({classes.tolist()}); it needs both states, so check the dataset's trajectories "
            "and split settings and rerun the prepare stage"
        )


# --------------------------------------------------------------------------------------------
# resume checkpoint


def _save_checkpoint(path: Path, model: Any, meta: dict[str, Any]) -> None:
    """Weights, optimizer variables and `meta` (JSON) in one .npz, written atomically."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for i, weight in enumerate(model.get_weights()):
        arrays[f"weight_{i:03d}"] = weight
    for i, variable in enumerate(model.optimizer.variables):
        arrays[f"optimizer_{i:03d}"] = np.asarray(variable.numpy())
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        np.savez(stream, **arrays)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            weights = [npz[k] for k in sorted(npz.files) if k.startswith("weight_")]
            optimizer = [npz[k] for k in sorted(npz.files) if k.startswith("optimizer_")]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise SciquantError(
            f"{path}: unreadable resume checkpoint ({type(error).__name__}: {error}); delete it "
            "(training then starts from scratch) and rerun"
        ) from error
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise SciquantError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint;"
                            " delete it and rerun")  # fmt: skip
    return meta, weights, optimizer


def _restore(model: Any, weights: list[np.ndarray], optimizer: list[np.ndarray], path: Path):
    variables = model.optimizer.variables
    if len(weights) != len(model.weights) or len(optimizer) != len(variables):
        raise SciquantError(f"{path}: checkpoint does not fit this model; delete it and rerun")
    model.set_weights(weights)
    for variable, value in zip(variables, optimizer, strict=True):
        variable.assign(value)


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    write_csv(path, rows, LOG_COLUMNS)


# --------------------------------------------------------------------------------------------
# cross-validation


def cross_validate(
    data: PixelMaps,
    folds: int,
    settings: dict[str, Any],
    state_path: Path,
    compatibility: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """k-fold cross-validation over the train + val frames in time blocks (module docstring)."""
    pool = np.flatnonzero(np.isin(data.split, [SPLITS["train"], SPLITS["val"]]))
    assignment = time_block_folds(data.trajectory[pool], data.frame[pool], folds)
    results: list[dict[str, Any]] = []
    if state_path.exists():
        try:
            saved = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("compatibility") == compatibility and saved.get("folds") == folds:
            results = list(saved.get("per_fold", []))
    epochs = settings["epochs"]
    for fold in range(len(results), folds):
        held_out = pool[assignment == fold]
        kept = pool[assignment != fold]
        if len(held_out) == 0:
            raise SciquantError(
                f"{data.path}: folds={folds} leaves fold {fold + 1} without frames; lower "
                "train.folds below the number of train + val frames per trajectory"
            )
        _check_classes(data.y[kept], data.path, f"training part of fold {fold + 1}")
        model = _compiled_model(data, settings["seed"], settings["learning_rate"])
        train = (data.x[kept], data.y[kept])
        val = (data.x[held_out], data.y[held_out])
        row: dict[str, float] = {}
        for epoch in range(epochs):
            row = _train_epoch(
                model, train, val, settings["batch_size"], [settings["seed"], 1 + fold], epoch
            )
            if progress:
                print(_format_row(row, epochs, f"fold {fold + 1}/{folds} "), flush=True)
        results.append(
            {
                "fold": fold + 1,
                "train_frames": len(kept),
                "val_frames": len(held_out),
                "val_loss": row["val_loss"],
                "val_accuracy": row["val_accuracy"],
            }
        )
        write_json(
            state_path, {"compatibility": compatibility, "folds": folds, "per_fold": results}
        )
    accuracies = np.array([r["val_accuracy"] for r in results])
    return {
        "folds": folds,
        "grouping": "contiguous time blocks per trajectory",
        "per_fold": results,
        "val_accuracy_mean": float(accuracies.mean()),
        "val_accuracy_std": float(accuracies.std(ddof=1)) if folds > 1 else 0.0,
    }


# --------------------------------------------------------------------------------------------
# the stage


def run(
    prepared: Path,
    out: Path,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-4,
    seed: int = 0,
    folds: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume, or skip if done) the ICNNMD model; returns `out/model.keras`."""
    started = time.perf_counter()
    if epochs < 1 or batch_size < 1 or not learning_rate > 0 or folds < 0:
        raise SciquantError(
            f"train settings epochs={epochs}, batch_size={batch_size}, "
            f"learning_rate={learning_rate}, folds={folds}: need epochs >= 1, batch_size >= 1, "
            "learning_rate > 0, folds >= 0"
        )
    configure_threads(threads)
    out = Path(out)
    data = load_pixelmaps(Path(prepared))
    x_train, y_train = data.subset("train")
    _check_classes(y_train, data.path, "train split (0)")
    val = data.subset("val")
    sha = sha256_of(data.path)
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "folds": folds,
        "optimizer": "rmsprop",
        "loss": "sparse_categorical_crossentropy",
    }
    # What a checkpoint must agree on to be continued (not the number of epochs or folds).
    compatibility = {
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "data_sha256": sha,
        "input": [data.grid, data.channels, data.n_classes],
    }
    target = out / "model.keras"
    summary_path = out / "training.json"
    if target.is_file() and summary_path.is_file() and (out / "train_log.csv").is_file():
        try:
            done = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("settings") == settings and done.get("data", {}).get("sha256") == sha:
            print(f"{target}: already trained with these settings and data; nothing to do")
            return target

    _seed_tf(seed)
    out.mkdir(parents=True, exist_ok=True)
    resume = out / "resume"
    cv = None
    if folds >= 2:
        cv = cross_validate(data, folds, settings, resume / "folds.json", compatibility, progress)
        print(
            f"{folds}-fold cross-validation: val accuracy {cv['val_accuracy_mean']:.4f} ± "
            f"{cv['val_accuracy_std']:.4f}",
            flush=True,
        )

    model = _compiled_model(data, seed, learning_rate)
    checkpoint = resume / "checkpoint.npz"
    log_rows: list[dict[str, float]] = []
    first_epoch = 0
    if checkpoint.exists():
        meta, weights, optimizer = _read_checkpoint(checkpoint)
        if meta.get("compatibility") != compatibility:
            print(f"{checkpoint}: written with other settings, seed or data; starting from scratch")
        elif meta["epoch"] > epochs:
            print(f"{checkpoint}: trained {meta['epoch']} epochs, more than {epochs}; restarting")
        else:
            _restore(model, weights, optimizer, checkpoint)
            log_rows = list(meta["log"])
            first_epoch = int(meta["epoch"])
            print(f"resuming from {checkpoint} after epoch {first_epoch}")
    from sciquant.models.icnnmd import build_icnnmd, count_parameters, model_bytes

    parameters = count_parameters(model)
    counts = data.counts()
    print(
        f"training ICNNMD ({parameters} parameters) on {counts['train']} frames "
        f"({counts['val']} validation), {data.grid}×{data.grid}×{data.channels} pixel maps, "
        f"epochs {first_epoch + 1}..{epochs}",
        flush=True,
    )
    for epoch in range(first_epoch, epochs):
        row = _train_epoch(model, (x_train, y_train), val, batch_size, [seed, 0], epoch)
        if not math.isfinite(row["loss"]):
            raise SciquantError(
                f"training diverged (loss {row['loss']}) in epoch {epoch + 1}; lower "
                "train.learning_rate"
            )
        log_rows.append(row)
        if progress:
            print(_format_row(row, epochs), flush=True)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch + 1,
            "compatibility": compatibility,
            "log": log_rows,
        }
        _save_checkpoint(checkpoint, model, meta)
        _write_log(out / "train_log.csv", log_rows)

    # The deployable model: the same architecture and weights, without the optimizer.
    final = build_icnnmd(data.grid, data.channels, data.n_classes, seed=seed)
    final.set_weights(model.get_weights())
    tmp = out / ".model.part.keras"  # Keras insists on the .keras suffix
    final.save(tmp)
    os.replace(tmp, target)
    _write_log(out / "train_log.csv", log_rows)

    prov = provenance(time.perf_counter() - started, threads)
    prov["packages"].update(package_versions(TF_PACKAGES))
    summary = {
        "format": TRAINING_FORMAT,
        "version": 1,
        "settings": settings,
        "model": {
            "architecture": "icnnmd",
            "grid": data.grid,
            "channels": data.channels,
            "n_classes": data.n_classes,
            "parameters": parameters,
            "model_bytes": model_bytes(final),
            "file_bytes": target.stat().st_size,
        },
        "data": {
            "path": str(data.path),
            "sha256": sha,
            "bytes": data.path.stat().st_size,
            "frames": counts,
        },
        "resumed_after_epoch": first_epoch,
        "final": log_rows[-1] if log_rows else None,
        "cross_validation": cv,
        "provenance": prov,
    }
    write_json(summary_path, summary)
    return target
