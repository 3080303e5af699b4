"""The calibrated prior recovers a wall stiffness and viscosity the lumped prior does not know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sciquant.workloads.bloodflow import data as bloodflow
from sciquant.workloads.bloodflow.physics import baseline_errors
from sciquant.workloads.bloodflow.sim import SimulationParams, synthesize


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Linear-circuit data with walls 2.2× stiffer and blood 1.5× more viscous than the prior's."""
    root = tmp_path_factory.mktemp("calibrated")
    params = SimulationParams(
        model="linear",
        branch_count_range=(3, 5),
        viscosity_range=(0.06, 0.06),
        stiffness_scale_range=(2.2, 2.2),
    )
    synthesize(root / "raw", 4, seed=3, params=params, progress=False)
    settings = bloodflow.PrepareSettings(
        time_offsets=1, split={"train": 0.5, "valid": 0.0, "test": 0.5}
    )
    bloodflow.prepare(root / "raw", root / "prepared", settings)
    return root / "prepared"


def test_calibration_recovers_the_hidden_constants(prepared: Path) -> None:
    index = bloodflow.load_index(prepared)
    factors = []
    for name in index["samples"]["train"] + index["samples"]["test"]:
        sample = bloodflow.load_sample(prepared, name)
        lumped = baseline_errors(sample, "lumped_model")
        calibrated = baseline_errors(sample, "calibrated_model")
        factors.append(
            (sample["calibrated_stiffness_factor"], sample["calibrated_viscosity_factor"])
        )
        assert calibrated["pressure_error_pct"] < 0.5 * lumped["pressure_error_pct"], name
        inlet = sample["node_type"] == bloodflow.INLET
        cycle = sample["loading"] == 0
        data = sample["pressure"][cycle][:, inlet]
        prior = sample["calibrated_pressure"][cycle][:, inlet]
        # Fitted to the inlet's systolic and diastolic pressure: those match.
        np.testing.assert_allclose([prior.max(), prior.min()], [data.max(), data.min()], rtol=2e-3)
    # The prepared tree is coarser than the simulator's, and two inlet pressures can leave the
    # stiffness ill-determined in a tree: the constants come back in the median.
    stiffness, viscosity = np.median(np.asarray(factors, dtype=np.float64), axis=0)
    assert stiffness == pytest.approx(2.2, rel=0.15)
    assert viscosity == pytest.approx(1.5, rel=0.15)


def test_prior_setting_chooses_the_residual_models_prior(prepared: Path) -> None:
    name = bloodflow.load_index(prepared)["samples"]["test"][0]
    sample = bloodflow.load_sample(prepared, name)
    np.testing.assert_array_equal(sample["linear_pressure"], sample["calibrated_pressure"])
    with pytest.raises(bloodflow.SciquantError, match="prepare.prior"):
        bloodflow.PrepareSettings(prior="exact")
