"""A sciquant workload plug-in: an MLP surrogate of the damped harmonic oscillator.

    x'' + 2 ζ ω x' + ω² x = 0,   state y = (x, v = x'),   y' = A y,   A = [[0, 1], [-ω², -2ζω]]

The embedded simulator draws trajectories with random damping ζ, natural frequency ω and initial
state, and steps them with the exact propagator exp(A dt) (closed form for ζ < 1), so the data
has no integration error. The surrogate learns one step: from (x, v, ζ, ω) to the state's rate
of change over dt, (y(t + dt) - y(t)) / dt. It is judged by its one-step error and by rollouts of
the test trajectories from their initial states, beside the no-network baseline of the explicit
Euler step (the textbook method a surrogate has to beat). The same errors per test trajectory
give each quantized run's retained gain over the Euler step, with its bootstrap CI.

This package is the README's "Add your own surrogate" example: everything sciquant needs from
a PyTorch surrogate is in this file; the entry point in pyproject.toml registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError
from sciquant.workloads.pytorch import Split, TorchWorkload


def propagator(zeta: float, omega: float, dt: float) -> np.ndarray:
    """exp(A dt) of the underdamped oscillator (0 <= ζ < 1), exactly."""
    damped = omega * np.sqrt(1.0 - zeta**2)
    a = np.array([[0.0, 1.0], [-(omega**2), -2.0 * zeta * omega]])
    shift = a + zeta * omega * np.eye(2)
    return np.exp(-zeta * omega * dt) * (
        np.cos(damped * dt) * np.eye(2) + np.sin(damped * dt) / damped * shift
    )


def euler_rate(states: np.ndarray, zeta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """The explicit Euler step's rate A y (the no-network baseline)."""
    x, v = states[..., 0], states[..., 1]
    return np.stack([v, -(omega**2) * x - 2.0 * zeta * omega * v], axis=-1)


class Oscillator(TorchWorkload):
    """Damped harmonic oscillators, learned one step at a time by an MLP."""

    name = "oscillator"
    architectures = {"oscillator_mlp": "torch"}
    input_names = ("features",)
    output_name = "rate"
    prepared_file = "oscillator.npz"
    simulation_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "trajectories": {"type": "integer", "minimum": 3, "default": 200,
                             "description": "Trajectories to simulate."},
            "steps": {"type": "integer", "minimum": 2, "default": 100,
                      "description": "Steps per trajectory."},
            "dt": {"type": "number", "exclusiveMinimum": 0, "default": 0.05,
                   "description": "Time step [s]."},
            "zeta": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 0.99},
                     "minItems": 2, "maxItems": 2, "default": [0.05, 0.3],
                     "description": "Range of the damping ratio."},
            "omega": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                      "minItems": 2, "maxItems": 2, "default": [1.0, 3.0],
                      "description": "Range of the natural angular frequency [1/s]."},
            "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "Seed."},
        },
    }  # fmt: skip
    prepare_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "split": {
                "type": "object",
                "additionalProperties": False,
                "default": {},
                "properties": {
                    "train": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.6},
                    "valid": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2},
                    "test": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2},
                },
                "description": "Shares of the trajectories per split.",
            },
            "seed": {"type": "integer", "minimum": 0, "default": 0,
                     "description": "Seed of the shuffle before splitting."},
        },
    }  # fmt: skip
    model_properties = {
        "oscillator_mlp": {
            "hidden": {"type": "integer", "minimum": 2, "default": 64,
                       "description": "Width of the hidden layers."},
            "layers": {"type": "integer", "minimum": 1, "default": 2,
                       "description": "Hidden layers."},
        }
    }  # fmt: skip

    def simulate(self, out: Path, settings: dict[str, Any]) -> None:
        rng = np.random.default_rng(settings["seed"])
        count, steps, dt = settings["trajectories"], settings["steps"], settings["dt"]
        zeta = rng.uniform(*settings["zeta"], size=count)
        omega = rng.uniform(*settings["omega"], size=count)
        states = np.empty((count, steps + 1, 2))
        states[:, 0, 0] = rng.uniform(-1.0, 1.0, size=count)
        states[:, 0, 1] = rng.uniform(-1.0, 1.0, size=count) * omega
        for i in range(count):
            step = propagator(zeta[i], omega[i], dt)
            for n in range(steps):
                states[i, n + 1] = step @ states[i, n]
        np.savez(out / "trajectories.npz", states=states, zeta=zeta, omega=omega, dt=dt)
        print(f"simulated {count} trajectories of {steps} steps (dt {dt} s)")

    def make_splits(self, raw: Path, settings: dict[str, Any]) -> dict[str, Split]:
        path = raw / "trajectories.npz"
        if not path.is_file():
            raise SciquantError(f"{path}: not found; rerun the synthesize stage")
        with np.load(path) as data:
            states, zeta, omega = data["states"], data["zeta"], data["omega"]
            dt = float(data["dt"])
        split = settings["split"]
        if abs(split["train"] + split["valid"] + split["test"] - 1.0) > 1e-6:
            raise SciquantError("config key datasets.<name>.prepare.split: shares must add to 1")
        order = np.random.default_rng(settings["seed"]).permutation(len(states))
        n_train = int(round(split["train"] * len(order)))
        n_valid = int(round(split["valid"] * len(order)))
        chosen = {
            "train": order[:n_train],
            "valid": order[n_train : n_train + n_valid],
            "test": order[n_train + n_valid :],
        }
        splits = {}
        for name, rows in chosen.items():
            current, following = states[rows, :-1], states[rows, 1:]
            steps = current.shape[1]
            params = np.stack([zeta[rows], omega[rows]], axis=-1)
            features = np.concatenate(
                [current, np.repeat(params[:, None, :], steps, axis=1)], axis=-1
            ).reshape(-1, 4)
            rates = ((following - current) / dt).reshape(-1, 2)
            extra = {"states": states[rows], "params": params, "dt": np.array(dt)}
            splits[name] = Split((features.astype(np.float32),), rates.astype(np.float32), extra)
        return splits

    def build_model(self, settings: dict[str, Any]) -> Any:
        from torch import nn

        hidden, layers = settings["hidden"], settings["layers"]
        modules: list[nn.Module] = [nn.Linear(4, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            modules += [nn.Linear(hidden, hidden), nn.ReLU()]
        modules.append(nn.Linear(hidden, 2))
        return nn.Sequential(*modules)

    #: The retained gain is measured against the Euler step.
    gain_baseline = "euler"

    def metrics(self, predict: Callable[..., np.ndarray], test: Split) -> dict[str, float]:
        features = test.inputs[0]
        return self._errors(lambda f: predict(f), features, test)

    def baselines(self, test: Split) -> dict[str, dict[str, float]]:
        return {"euler": self._errors(self._euler, test.inputs[0], test)}

    def sample_errors(self, predict: Callable[..., np.ndarray], test: Split) -> dict[str, Any]:
        return self._rollout_errors(lambda f: predict(f), test)

    def baseline_sample_errors(self, test: Split) -> dict[str, dict[str, Any]]:
        return {"euler": self._rollout_errors(self._euler, test)}

    @staticmethod
    def _euler(features: np.ndarray) -> np.ndarray:
        return euler_rate(features[:, :2], features[:, 2], features[:, 3])

    @staticmethod
    def _rollout(rate: Callable[[np.ndarray], np.ndarray], test: Split) -> np.ndarray:
        """The test trajectories [n, steps, 2] rolled out from their initial states."""
        states, params, dt = test.extra["states"], test.extra["params"], float(test.extra["dt"])
        rollout = np.empty_like(states)
        rollout[:, 0] = states[:, 0]
        for n in range(states.shape[1] - 1):
            features_n = np.concatenate([rollout[:, n], params], axis=-1).astype(np.float32)
            rollout[:, n + 1] = rollout[:, n] + dt * np.asarray(rate(features_n), np.float64)
        return rollout

    @classmethod
    def _errors(cls, rate: Callable[[np.ndarray], np.ndarray], features: np.ndarray,
                test: Split) -> dict[str, float]:  # fmt: skip
        """One-step and rollout errors [%] of a rate function on the test split."""
        predicted = np.asarray(rate(features), dtype=np.float64)
        step_error = np.linalg.norm(predicted - test.targets) / np.linalg.norm(test.targets)
        states = test.extra["states"]
        error = np.sqrt(np.mean((cls._rollout(rate, test) - states) ** 2) / np.mean(states**2))
        return {"step_error_pct": 100.0 * float(step_error),
                "rollout_error_pct": 100.0 * float(error)}  # fmt: skip

    @classmethod
    def _rollout_errors(cls, rate: Callable[[np.ndarray], np.ndarray],
                        test: Split) -> dict[str, np.ndarray]:  # fmt: skip
        """The rollout error [%] of each test trajectory (the retained gain's pairs)."""
        states = test.extra["states"]
        squared = np.mean((cls._rollout(rate, test) - states) ** 2, axis=(1, 2))
        return {"rollout_error_pct": 100.0 * np.sqrt(squared / np.mean(states**2, axis=(1, 2)))}
