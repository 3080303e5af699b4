"""The embedded blood-flow simulator's parameters (`SimulationParams`) and their checks.

Kept apart from the simulator (`sciquant.workloads.bloodflow.sim`, which imports SciPy, numba
and VTK) so that a study's config can be validated, in every job and dry run, without loading
the solver.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow.network import BLOOD_DENSITY, OLUFSEN_STIFFNESS


def _param(default: Any, unit: str, description: str) -> Any:
    """A dataclass field whose metadata carries its unit and meaning (for a JSON-Schema config)."""
    return field(default=default, metadata={"unit": unit, "description": description})


@dataclass(frozen=True)
class SimulationParams:
    """Every knob of the synthetic data set; each field's `metadata` holds `unit` and `description`.

    `*_range` fields are (min, max) pairs; a value is drawn uniformly in them per simulation (per
    vessel or per outlet where the description says so).
    """

    branch_count_range: tuple[int, int] = _param(
        (3, 15),
        "1",
        "Number of vessels (branches) per tree, drawn uniformly in [min, max], 1 ≤ min ≤ max. A "
        "count of 2 is impossible (a junction has ≥ 2 daughters) and is skipped; an even count "
        "uses one trifurcation, all other junctions are bifurcations.",
    )
    root_radius_range: tuple[float, float] = _param(
        (0.3, 1.0),
        "cm",
        "Radius of the root (inlet) vessel; typical 0.3 (carotid) – 1.0 (aorta).",
    )
    length_range: tuple[float, float] = _param(
        (2.0, 12.0),
        "cm",
        "Length of each vessel (drawn per vessel); typical 2–12.",
    )
    murray_exponent: float = _param(
        3.0,
        "1",
        "Exponent γ of Murray's law r_parent^γ = Σ r_daughter^γ; also sets the outlet flow split "
        "(∝ r^γ). Typical 2.3–3.",
    )
    daughter_flow_fraction_range: tuple[float, float] = _param(
        (0.2, 0.5),
        "1",
        "Share of the parent's flow sent to the smaller daughter of a bifurcation (asymmetry); "
        "0 < min ≤ max ≤ 0.5, 0.5 = symmetric.",
    )
    branching_angle_range_deg: tuple[float, float] = _param(
        (20.0, 60.0),
        "degree",
        "Angle between a daughter's initial direction and the parent's end direction; the larger "
        "daughter gets the smaller angle. 0 ≤ min ≤ max < 90.",
    )
    curvature_angle_max_deg: float = _param(
        30.0,
        "degree",
        "Largest total turning of a vessel's tangent along its length (a gently curved 3D arc with "
        "slow torsion); 0 = straight vessels. 0–90.",
    )
    segment_length: float = _param(
        0.35,
        "cm",
        "Target length h of the 1D simulation segments; a vessel of length l gets "
        "max(2, round(l/h)) equal segments. Typical 0.25–0.5.",
    )
    output_spacing: float = _param(
        0.1,
        "cm",
        "Target spacing of the written centerline points (each segment is split into "
        "max(1, round(h/spacing)) pieces, fields linearly interpolated) so ingestion can subsample "
        "(~6 % kept). Storage grows as 1/spacing.",
    )
    viscosity_range: tuple[float, float] = _param(
        (0.025, 0.06),
        "P = g/(cm·s)",
        "Dynamic viscosity μ of blood (Newtonian), drawn per simulation; sets the friction "
        "K_R = 2πν α/(α−1) (linear model: R = 8μh/(πr⁴)). Typical 0.03–0.05.",
    )
    density: float = _param(
        BLOOD_DENSITY,
        "g/cm³",
        "Density ρ of blood (sets the inertance L = ρh/(πr²)); ≈ 1.06.",
    )
    stiffness_k1: float = _param(
        OLUFSEN_STIFFNESS[0],
        "g/(s²·cm)",
        "k1 of the wall stiffness Eh/r0 = k1·exp(k2·r0) + k3; ≥ 0.",
    )
    stiffness_k2: float = _param(
        OLUFSEN_STIFFNESS[1],
        "1/cm",
        "k2 of the wall stiffness Eh/r0 = k1·exp(k2·r0) + k3; ≤ 0.",
    )
    stiffness_k3: float = _param(
        OLUFSEN_STIFFNESS[2],
        "g/(s²·cm)",
        "k3 of the wall stiffness Eh/r0 = k1·exp(k2·r0) + k3; > 0.",
    )
    stiffness_scale_range: tuple[float, float] = _param(
        (0.4, 2.5),
        "1",
        "Per-simulation factor on k1 and k3 (stiffer or softer arteries: wave speed ∝ √factor).",
    )
    period_range: tuple[float, float] = _param(
        (0.7, 1.1),
        "s",
        "Cardiac period T (rounded to a multiple of dt_store); 0.7–1.1 ≈ 55–85 beats/min.",
    )
    mean_velocity_range: tuple[float, float] = _param(
        (10.0, 25.0),
        "cm/s",
        "Cycle-mean inlet velocity; mean inflow = velocity · π r_root². Typical 10–25.",
    )
    inflow_peak_to_mean_range: tuple[float, float] = _param(
        (2.5, 5.0),
        "1",
        "Peak systolic inflow divided by mean inflow (pulsatility of the inlet waveform); > 1. "
        "Aorta ≈ 4–6, carotid ≈ 2.5–3.5.",
    )
    inflow_harmonics: int = _param(
        12,
        "1",
        "Fourier harmonics of the inlet waveform (systolic pulse, backflow dip, diastolic bump "
        "projected onto them); 1–50.",
    )
    mean_pressure_range_mmhg: tuple[float, float] = _param(
        (90.0, 100.0),
        "mmHg",
        "Target cycle-mean inlet pressure; outlet Windkessel resistances are scaled to hit it.",
    )
    pulse_pressure_range_mmhg: tuple[float, float] = _param(
        (30.0, 50.0),
        "mmHg",
        "Target inlet pulse pressure (max − min over the cycle); outlet Windkessel compliances are "
        "scaled to hit it (or, where they cannot, the inflow's pulsatile part).",
    )
    proximal_resistance_fraction_range: tuple[float, float] = _param(
        (0.04, 0.10),
        "1",
        "Rp/(Rp + Rd) of the outlet Windkessels (per simulation, ±20 % per outlet); 0 < min ≤ max "
        "< 1.",
    )
    windkessel_time_constant_range: tuple[float, float] = _param(
        (0.1, 20.0),
        "s",
        "Bounds of the Windkessel time constant (Rp + Rd)·C searched to reach the pulse-pressure "
        "target (all outlets share it; C ∝ flow share). Human systemic ≈ 1–2.",
    )
    inflow_pulse_scale_range: tuple[float, float] = _param(
        (0.25, 4.0),
        "1",
        "Bounds of the factor on the inflow's pulsatile part, applied only where no Windkessel "
        "time constant in range reaches the pulse-pressure target (a tree whose own compliance or "
        "inertance dominates); 1 must lie inside.",
    )
    outlet_flow_jitter: float = _param(
        0.2,
        "1",
        "Relative random perturbation of each outlet's mean flow share (∝ r^γ) before the "
        "Windkessel resistances are derived from it; 0 ≤ value < 1.",
    )
    model: str = _param(
        "nonlinear",
        "-",
        "Physics of the simulations: 'nonlinear' (1D equations in area and flowrate, Olufsen tube "
        "law, total-pressure junctions, Young–Tsai stenoses; "
        "sciquant.workloads.bloodflow.sim_1d) or 'linear' (the lumped RLC circuit, BDF2; no "
        "stenoses).",
    )
    velocity_profile_range: tuple[float, float] = _param(
        (1.05, 4.0 / 3.0),
        "1",
        "Velocity-profile coefficient α of the nonlinear model, drawn per simulation; 1 < min ≤ "
        "max ≤ 2. 4/3 = Poiseuille (friction 8πν), ≈ 1.1 = blunt profile (friction 22πν).",
    )
    reference_pressure_range_mmhg: tuple[float, float] = _param(
        (0.0, 60.0),
        "mmHg",
        "Reference pressure p0 of the tube law (where A equals the written area A0), drawn per "
        "simulation; 0 ≤ min ≤ max ≤ 200.",
    )
    stenosis_probability: float = _param(
        0.9,
        "1",
        "Share of trees (nonlinear model) with one Young–Tsai stenosis in a vessel long enough to "
        "hold it with ≥ 1 segment on each side; 0–1. The lumped prior has no stenosis term, so "
        "this share sets how many trees depart from it by more than the nonlinear 1D terms do "
        "(≈ 0.5 % pressure on a tree without one).",
    )
    stenosis_area_reduction_range: tuple[float, float] = _param(
        (0.5, 0.85),
        "1",
        "Area reduction 1 − A_s/A0 at the stenosis throat, drawn per stenosis; 0 < min ≤ max < 1.",
    )
    stenosis_max_generation: int = _param(
        1,
        "1",
        "Deepest vessel generation a stenosis may sit in (0 = the root vessel only, 1 = the root "
        "or its daughters, ...); a large value allows every vessel. Proximal stenoses change the "
        "whole tree's pressure and flow split, a distal one only its own small branch. ≥ 0.",
    )
    stenosis_length_range: tuple[float, float] = _param(
        (2.0, 3.5),
        "cm",
        "Length L_s of a stenosis (cosine-shaped narrowing in the written area), drawn per "
        "stenosis; long enough for the prepared graph (one node every ≈ 1.7 cm) to resolve it.",
    )
    cfl: float = _param(
        0.8,
        "1",
        "Courant number of the explicit nonlinear scheme: dt ≤ cfl·h/(|u| + c) on every "
        "segment (dt also divides dt_store); 0 < cfl ≤ 1.",
    )
    n_cycles: int = _param(
        4,
        "1",
        "Cardiac cycles integrated; the last is stored, the last two give the periodicity "
        "error. ≥ 2.",
    )
    dt_store: float = _param(
        0.005,
        "s",
        "Interval between stored steps (`pressure_<k>`, `flow_<k>`); > 0.",
    )
    substeps: int = _param(
        5,
        "1",
        "Linear model only: integrator steps per stored step (dt = dt_store / substeps); ≥ 1. The "
        "nonlinear model's dt follows from `cfl`.",
    )

    def __post_init__(self) -> None:
        _validate_params(self)


def _fail(name: str, message: str) -> SciquantError:
    """The error for a bad SimulationParams field `name`."""
    return SciquantError(f"SimulationParams.{name}: {message}")


def _check_range(
    params: SimulationParams,
    name: str,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Check that field `name` is a (min, max) pair with min ≤ max inside [low, high]."""
    value = getattr(params, name)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise _fail(name, f"expected a (min, max) pair, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _fail(name, f"values must be finite, got {value!r}")
    if lo > hi:
        raise _fail(name, f"min {lo} > max {hi}; swap them")
    too_low = lo <= low if low_open else lo < low
    too_high = hi >= high if high_open else hi > high
    if too_low or too_high:
        raise _fail(
            name,
            f"{value!r} outside the allowed interval "
            f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}",
        )


def _check_scalar(
    params: SimulationParams,
    name: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Check that field `name` is a finite number (an int if `integer`) within [low, high]."""
    value = getattr(params, name)
    if integer and (not isinstance(value, int | np.integer) or isinstance(value, bool)):
        raise _fail(name, f"expected an integer, got {value!r}")
    if not isinstance(value, int | float | np.number) or not math.isfinite(float(value)):
        raise _fail(name, f"expected a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        raise _fail(
            name, f"{value!r} outside the allowed interval {'(' if low_open else '['}{low}, {high}]"
        )


def _validate_params(p: SimulationParams) -> None:
    """Raise SciquantError naming the first bad field of `p`."""
    counts = p.branch_count_range
    if not (
        isinstance(counts, Sequence)
        and len(counts) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in counts)
    ):
        raise _fail("branch_count_range", f"expected two integers (min, max), got {counts!r}")
    _check_range(p, "branch_count_range", 1, 1000)
    if counts[0] == counts[1] == 2:
        raise _fail(
            "branch_count_range", "2 branches cannot be built (a junction has ≥ 2 daughters)"
        )
    _check_range(p, "root_radius_range", 0.0, 10.0, low_open=True)
    _check_range(p, "length_range", 0.0, 100.0, low_open=True)
    _check_scalar(p, "murray_exponent", 0.0, 10.0, low_open=True)
    _check_range(p, "daughter_flow_fraction_range", 0.0, 0.5, low_open=True)
    _check_range(p, "branching_angle_range_deg", 0.0, 90.0, high_open=True)
    _check_scalar(p, "curvature_angle_max_deg", 0.0, 90.0)
    _check_scalar(p, "segment_length", 0.0, 10.0, low_open=True)
    _check_scalar(p, "output_spacing", 0.0, 10.0, low_open=True)
    _check_range(p, "viscosity_range", 0.0, 10.0, low_open=True)
    _check_scalar(p, "density", 0.0, low_open=True)
    _check_scalar(p, "stiffness_k1", 0.0)
    _check_scalar(p, "stiffness_k2", -math.inf, 0.0)
    _check_scalar(p, "stiffness_k3", 0.0, low_open=True)
    _check_range(p, "stiffness_scale_range", 0.0, 100.0, low_open=True)
    _check_scalar(p, "dt_store", 0.0, 1.0, low_open=True)
    _check_range(p, "period_range", 0.0, 10.0, low_open=True)
    if p.period_range[0] < 4 * p.dt_store:
        raise _fail(
            "period_range",
            f"min {p.period_range[0]} s holds < 4 stored steps of dt_store = {p.dt_store} s",
        )
    _check_range(p, "mean_velocity_range", 0.0, 1000.0, low_open=True)
    _check_range(p, "inflow_peak_to_mean_range", 1.0, 20.0, low_open=True)
    _check_scalar(p, "inflow_harmonics", 1, 50, integer=True)
    _check_range(p, "mean_pressure_range_mmhg", 0.0, 500.0, low_open=True)
    _check_range(p, "pulse_pressure_range_mmhg", 0.0, 500.0, low_open=True)
    _check_range(p, "proximal_resistance_fraction_range", 0.0, 1.0, low_open=True, high_open=True)
    _check_range(p, "windkessel_time_constant_range", 0.0, 1000.0, low_open=True)
    _check_range(p, "inflow_pulse_scale_range", 0.0, math.inf, low_open=True)
    if not p.inflow_pulse_scale_range[0] <= 1.0 <= p.inflow_pulse_scale_range[1]:
        raise _fail("inflow_pulse_scale_range", f"{p.inflow_pulse_scale_range!r} must contain 1")
    _check_scalar(p, "outlet_flow_jitter", 0.0, 0.99)
    _check_scalar(p, "n_cycles", 2, 1000, integer=True)
    _check_scalar(p, "substeps", 1, 10000, integer=True)
    if p.model not in ("nonlinear", "linear"):
        raise _fail("model", f"expected 'nonlinear' or 'linear', got {p.model!r}")
    _check_range(p, "velocity_profile_range", 1.0, 2.0, low_open=True)
    _check_range(p, "reference_pressure_range_mmhg", 0.0, 200.0)
    _check_scalar(p, "stenosis_probability", 0.0, 1.0)
    _check_range(p, "stenosis_area_reduction_range", 0.0, 1.0, low_open=True, high_open=True)
    _check_range(p, "stenosis_length_range", 0.0, 100.0, low_open=True)
    _check_scalar(p, "stenosis_max_generation", 0, 1000, integer=True)
    _check_scalar(p, "cfl", 0.0, 1.0, low_open=True)


def params_from_mapping(values: dict[str, Any]) -> SimulationParams:
    """SimulationParams from the config's `parameters` mapping (lists become [min, max] tuples)."""
    known = {f.name for f in dataclasses.fields(SimulationParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SciquantError(
            f"simulator parameters: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"  # noqa: E501
        )
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SimulationParams(**converted)
