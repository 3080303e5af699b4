"""Coarse-grained Langevin dynamics of a two-state helix bundle, written as an MD data set.

The embedded data source of the GPCR study: it writes what a GPCRmd download holds (a `.pdb`
topology and one trajectory per functional state, in `.xtc` and `.dcd`), so the real-data ingestion
(`sciquant.workloads.md.data`) reads it unchanged.

Molecule: a Cα chain of `n_beads` residues (one bead each, 50–150) folded as a four-helix bundle:
four ideal right-handed α-helices (radius 0.23 nm, rise 0.15 nm, 100° per residue) on the corners
of a square of side 1.0 nm, alternately up and down, joined by three-residue loops (U-turns,
twisted out of plane). That bundle is the native structure of state 0 ("inactive").

State 1 ("active") is state 0 moved along its own normal modes (`active_structure`): its three
softest modes by 2 thermal amplitudes each (the large-scale motion, as elastic-network
studies find functional transitions along the softest modes) and the rest of the softer half of
the modes by 0.9 thermal amplitude each with fixed random signs (many small local
rearrangements), then relaxed so bonds keep their length. Thermal amplitudes are taken at 300 K.
The two states overlap: the mean RMSD between frames of different states is only about 1.25 times
that between frames of one state, no single inter-residue distance separates them (best threshold
≈ 0.9 accuracy), while a linear classifier on the superposed coordinates does (≥ 0.97);
`tests/test_md_data.py` checks all three.

Potential (a structure-based "Go" model per state, minimum at that state's native structure;
units kJ/mol, nm, r₀ and θ₀ from the native structure, ε = 8.368 kJ/mol = 2 kcal/mol):

- bonds i, i+1: K_b (r − r₀)², K_b = 5000 ε nm⁻²;
- angles i, i+1, i+2: K (cos θ − cos θ₀)² with K = 20 ε / sin²θ₀ (the GROMOS harmonic-cosine
  form, as stiff as 20 ε (θ − θ₀)² at θ₀, and cheaper);
- native contacts (|i − j| ≥ 3, native distance r₀ < 0.85 nm): ε [5 (r₀/r)¹² − 6 (r₀/r)¹⁰], the
  12-10 well of Clementi, Nymeyer & Onuchic (2000), depth ε at r₀;
- excluded volume of every other pair with |i − j| ≥ 3: ε (σ/r)¹², σ = 0.4 nm, over a neighbour
  list fixed at the start (pairs closer than 1.5 nm in either native structure: pairs farther
  apart cannot meet while the bundle stays folded, as it does up to the 600 K allowed here).

Dynamics: Langevin, BAOAB splitting (Leimkuhler & Matthews 2013), bead mass 110 u, friction
2 ps⁻¹, time step 0.02 ps, float64 NumPy with both states integrated side by side. Each state
starts from its native structure, equilibrates `equilibration_steps` steps, then stores a frame
every `stride` steps (default 50 = 1 ps; the slowest distances decorrelate within ~5 frames). The
noise comes from `numpy.random.default_rng(seed)`, so a seed gives the same bits on the same
platform and library versions; the state-1 structure does not depend on the seed.

Written files (all coordinates in nm as mdtraj writes them):

- `topology.pdb`: the state-0 native structure; one chain A, residues with amino-acid names
  (helix-forming residues in the helices, G/P/N/S/D in the loops), one atom `CA` (element C) each.
- `state0.xtc`, `state0.dcd`, `state1.xtc`, `state1.dcd`: the same `frames` frames of each state in
  both formats (xtc keeps 1e-3 nm; dcd keeps float32 Å); frame times in ps.
- `dataset_info.json`: `{"format": "sciquant-md-raw", "version": 1, "topology": "topology.pdb",
  "trajectories": [{"file": "state0.xtc", "label": 0, "state": "inactive", "alternates":
  {"dcd": "state0.dcd"}}, {... "state1.xtc", "label": 1, "state": "active" ...}], "simulator":
  {...every parameter, with units...}, "seed": seed}`. `topology` and `trajectories[*].file` are
  the listing `sciquant.workloads.md.data.prepare_from_info` reads; a GPCRmd fetch writes the same
  keys.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize
from tqdm import tqdm

from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path

__all__ = [
    "ForceField",
    "active_structure",
    "build_topology",
    "bundle",
    "native_structures",
    "normal_modes",
    "simulate",
    "synthesize",
]

BOLTZMANN = 0.0083144626
"""kJ/(mol·K)."""
MIN_BEADS, MAX_BEADS = 50, 150
MAX_TEMPERATURE = 600.0
N_HELICES = 4
LOOP_LENGTH = 3
HELIX_RADIUS = 0.23
HELIX_RISE = 0.15
HELIX_TWIST_DEG = 100.0
HELIX_SPACING = 1.0
CA_BOND = 0.38
CONTACT_CUTOFF = 0.85
NEIGHBOUR_CUTOFF = 1.5
LOOP_TWIST = 0.3

REFERENCE_TEMPERATURE = 300.0
"""K; the temperature whose thermal amplitudes size the state-1 displacement."""
SOFT_MODES = 3
SOFT_AMPLITUDE = 2.0
LOCAL_AMPLITUDE = 0.9
MODE_SIGN_SEED = 20220085
MODE_RESTRAINT = 1.0e4
"""kJ/(mol·nm²), holds the chosen mode projections while state 1 is relaxed."""

_HELIX_RESIDUES = ("ALA", "LEU", "GLU", "LYS", "ILE", "VAL", "PHE", "MET", "GLN", "ARG", "TRP")
_LOOP_RESIDUES = ("GLY", "PRO", "ASN", "SER", "ASP")
_STATES = ("inactive", "active")
_NOISE_BLOCK = 500


@dataclass(frozen=True)
class ForceField:
    """Parameters of the structure-based potential and of the Langevin integrator (see module)."""

    epsilon: float = 8.368  # kJ/mol
    bond_k: float = 5.0e3  # × epsilon, nm⁻²
    angle_k: float = 20.0  # × epsilon, rad⁻²
    sigma: float = 0.4  # nm
    mass: float = 110.0  # u
    friction: float = 2.0  # 1/ps
    dt: float = 0.02  # ps


# --- native structures -------------------------------------------------------------------------


def _helix_lengths(n_beads: int) -> list[int]:
    residues = n_beads - (N_HELICES - 1) * LOOP_LENGTH
    base, extra = divmod(residues, N_HELICES)
    return [base + (1 if k < extra else 0) for k in range(N_HELICES)]


def _helices(lengths: list[int]) -> list[np.ndarray]:
    """Cα positions (L, 3) nm of the four helices, in chain order.

    Each helix's phase puts the residue where a loop leaves (or, for the last helix, arrives)
    on the side facing the neighbouring helix, so the three-residue loops make a tight U-turn.
    """
    corners = HELIX_SPACING / 2 * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=float)
    twist = np.deg2rad(HELIX_TWIST_DEG)
    helices = []
    for k, length in enumerate(lengths):
        t = np.arange(length, dtype=float)
        last = k == N_HELICES - 1
        toward = corners[k - 1 if last else k + 1] - corners[k]
        facing = math.atan2(toward[1], toward[0])
        # Odd helices run downwards: the right-handed helix turned over, (x, y, z) → (x, −y, −z),
        # which negates its angle in the xy plane.
        sign = -1.0 if k % 2 else 1.0
        phase = sign * facing - (0.0 if last else twist * (length - 1))
        angle = phase + twist * t
        z = HELIX_RISE * (t - (length - 1) / 2)
        local = np.stack([HELIX_RADIUS * np.cos(angle), HELIX_RADIUS * np.sin(angle), z], axis=1)
        local = local * np.array([1.0, sign, sign])
        helices.append(local + np.array([corners[k, 0], corners[k, 1], 0.0]))
    return helices


def _loop(end: np.ndarray, start: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """LOOP_LENGTH beads from helix end `end` to helix start `start`, CA_BOND apart along the arc.

    The arc is a cubic Bézier curve leaving `end` along `direction` (the first helix's axis) and
    arriving at `start` along −`direction` (the next, antiparallel, helix's axis): a U-turn whose
    bond angles stay well away from 180° (a straight angle would leave a bead without stiffness).
    """
    t = np.linspace(0.0, 1.0, 801)[:, None]
    # Control points pushed to opposite sides of the U's plane twist the loop out of plane: a flat
    # loop between flat neighbours would let its middle bead move out of plane at no cost.
    side = np.cross(direction, start - end)
    side = LOOP_TWIST * side / np.linalg.norm(side)

    def curve(reach: float) -> np.ndarray:
        p1, p2 = end + reach * direction + side, start + reach * direction - side
        return (
            (1 - t) ** 3 * end + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * start
        )

    def arc(points: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])

    target = (LOOP_LENGTH + 1) * CA_BOND
    low, high = 0.0, 3.0
    for _ in range(50):  # the arc grows with the reach of the control points
        mid = (low + high) / 2
        low, high = (mid, high) if arc(curve(mid))[-1] < target else (low, mid)
    points = curve((low + high) / 2)
    length = arc(points)
    wanted = length[-1] * np.arange(1, LOOP_LENGTH + 1) / (LOOP_LENGTH + 1)
    return np.stack([np.interp(wanted, length, points[:, k]) for k in range(3)], axis=1)


def bundle(n_beads: int) -> np.ndarray:
    """The state-0 native structure (n_beads, 3), nm: four helices joined by loops."""
    _check_beads(n_beads)
    helices = _helices(_helix_lengths(n_beads))
    parts = [helices[0]]
    for k in range(1, N_HELICES):
        previous = helices[k - 1]
        direction = previous[-1] - previous[0]
        parts.append(_loop(previous[-1], helices[k][0], direction / np.linalg.norm(direction)))
        parts.append(helices[k])
    return np.vstack(parts)


def residue_names(n_beads: int, seed: int = 0) -> list[str]:
    """A sequence: helix-forming residues in the helices, G/P/N/S/D in the loops."""
    rng = np.random.default_rng(seed)
    lengths = _helix_lengths(n_beads)
    names: list[str] = []
    for k, length in enumerate(lengths):
        if k:
            names += [str(rng.choice(_LOOP_RESIDUES)) for _ in range(LOOP_LENGTH)]
        names += [str(rng.choice(_HELIX_RESIDUES)) for _ in range(length)]
    return names


def build_topology(n_beads: int, seed: int = 0) -> mdtraj.Topology:
    """An mdtraj topology: one chain, one `CA` atom per residue, bonds along the chain."""
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    previous = None
    for number, name in enumerate(residue_names(n_beads, seed), start=1):
        residue = topology.add_residue(name, chain, resSeq=number)
        atom = topology.add_atom("CA", mdtraj.element.carbon, residue)
        if previous is not None:
            topology.add_bond(previous, atom)
        previous = atom
    return topology


# --- potential and dynamics --------------------------------------------------------------------


@dataclass(frozen=True)
class _Potential:
    """Both states' Go potentials over one list of atom pairs (i, j), i < j: the bonds (i, i+1)
    first, then the non-bonded pairs. Per-state arrays have a trailing axis of length 2.
    """

    difference: sp.csr_matrix  # (R, N): +1 at j, −1 at i, so d = difference @ x
    gather: sp.csr_matrix  # (N, R): the transpose, so forces = gather @ (force on j per row)
    n_bonds: int
    bond_r0: np.ndarray  # (N-1, 2) nm
    cos_theta0: np.ndarray  # (N-2, 2)
    pair_a12: np.ndarray  # (P, 2) 12 × coefficient of r⁻¹², kJ/mol nm¹²
    pair_b10: np.ndarray  # (P, 2) 10 × coefficient of r⁻¹⁰, kJ/mol nm¹⁰
    bond_k: float  # kJ/(mol nm²)
    angle_k: np.ndarray  # (N-2, 2) kJ/mol, of (cos θ − cos θ0)²


def _cos_angles(xyz: np.ndarray) -> np.ndarray:
    u = xyz[:-2] - xyz[1:-1]
    v = xyz[2:] - xyz[1:-1]
    return np.sum(u * v, axis=-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


def _potential(natives: tuple[np.ndarray, np.ndarray], ff: ForceField) -> _Potential:
    """The Go potentials whose minima are the two native structures (n, 3) nm."""
    n = len(natives[0])
    i, j = np.triu_indices(n, k=3)
    distance = np.stack([np.linalg.norm(x[j] - x[i], axis=1) for x in natives], axis=1)
    keep = distance.min(axis=1) < NEIGHBOUR_CUTOFF
    i, j, distance = i[keep], j[keep], distance[keep]
    native_pair = distance < CONTACT_CUTOFF
    eps = ff.epsilon
    a = np.where(native_pair, 5.0 * eps * distance**12, eps * ff.sigma**12)
    b = np.where(native_pair, 6.0 * eps * distance**10, 0.0)
    rows_i = np.concatenate([np.arange(n - 1), i])
    rows_j = np.concatenate([np.arange(1, n), j])
    rows = np.arange(len(rows_i))
    difference = sp.csr_matrix(
        (
            np.r_[np.ones(len(rows)), -np.ones(len(rows))],
            (np.r_[rows, rows], np.r_[rows_j, rows_i]),
        ),
        shape=(len(rows), n),
    )
    cos0 = np.stack([_cos_angles(x) for x in natives], axis=1)
    # k_cos (cos θ − cos θ0)² has the curvature of k_θ (θ − θ0)² at θ0 when k_cos = k_θ / sin²θ0.
    angle_k = ff.angle_k * eps / np.maximum(1.0 - cos0**2, 1e-3)
    return _Potential(
        difference=difference,
        gather=difference.T.tocsr(),
        n_bonds=n - 1,
        bond_r0=np.stack([np.linalg.norm(np.diff(x, axis=0), axis=1) for x in natives], axis=1),
        cos_theta0=cos0,
        pair_a12=12.0 * a,
        pair_b10=10.0 * b,
        bond_k=ff.bond_k * eps,
        angle_k=angle_k,
    )


def forces(xyz: np.ndarray, pot: _Potential) -> np.ndarray:
    """−∇U (n, 2, 3), kJ/(mol·nm), of each state's potential at `xyz` (n, 2, 3) nm."""
    n = len(xyz)
    d = (pot.difference @ xyz.reshape(n, 6)).reshape(-1, 2, 3)
    r2 = np.einsum("rsk,rsk->rs", d, d)
    nb = pot.n_bonds
    # Bonds: U = K (r − r0)²; −dU/dr / r.
    r = np.sqrt(r2[:nb])
    inv_r = 1.0 / r
    scalar_bond = (-2.0 * pot.bond_k) * (r - pot.bond_r0) * inv_r
    # Pairs: U = a r⁻¹² − b r⁻¹⁰; −dU/dr / r = (12 a r⁻² − 10 b) r⁻¹².
    inv2 = 1.0 / r2[nb:]
    inv4 = inv2 * inv2
    scalar_pair = (pot.pair_a12 * inv2 - pot.pair_b10) * (inv4 * inv4 * inv4)
    row_force = np.concatenate([scalar_bond, scalar_pair])[:, :, None] * d
    # Angles: U = k (cos θ − cos θ0)² over bonds b_k, b_k+1 (unit vectors e); the force on the
    # far atom of each bond row is written into that row.
    e = d[:nb] * inv_r[:, :, None]
    cos = -np.einsum("rsk,rsk->rs", e[:-1], e[1:])
    g = (2.0 * pot.angle_k) * (cos - pot.cos_theta0)
    row_force[: nb - 1] += (g * inv_r[:-1])[:, :, None] * (e[1:] + cos[:, :, None] * e[:-1])
    row_force[1:nb] += (g * inv_r[1:])[:, :, None] * (e[:-1] + cos[:, :, None] * e[1:])
    return (pot.gather @ row_force.reshape(-1, 6)).reshape(n, 2, 3)


def hessian(native: np.ndarray, ff: ForceField = ForceField()) -> np.ndarray:
    """∂²U/∂x² (3n, 3n), kJ/(mol·nm²), of the Go potential of `native` at `native`.

    Central differences of the analytic forces (step 1e-5 nm), symmetrised.
    """
    n = len(native)
    pot = _potential((native, native), ff)
    step = 1e-5
    columns = []
    for index in range(3 * n):
        atom, axis = divmod(index, 3)
        plus = np.repeat(native[:, None, :], 2, axis=1)
        minus = plus.copy()
        plus[atom, 0, axis] += step
        minus[atom, 0, axis] -= step
        columns.append((forces(minus, pot)[:, 0] - forces(plus, pot)[:, 0]).ravel() / (2 * step))
    matrix = np.stack(columns, axis=1)
    return (matrix + matrix.T) / 2


def normal_modes(
    native: np.ndarray, ff: ForceField = ForceField()
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (3n−6,) kJ/(mol·nm²), ascending, and unit modes (3n, 3n−6) of the Go potential.

    The six rigid-body modes are dropped; each mode's sign is fixed (largest component positive)
    so that the result does not depend on the LAPACK build's choice.
    """
    values, vectors = np.linalg.eigh(hessian(native, ff))
    values, vectors = values[6:], vectors[:, 6:]
    largest = vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])]
    return values, vectors * np.sign(largest)


def energy(xyz: np.ndarray, pot: _Potential) -> np.ndarray:
    """U (2,), kJ/mol, of each state's potential at `xyz` (n, 2, 3) nm."""
    n = len(xyz)
    d = (pot.difference @ xyz.reshape(n, 6)).reshape(-1, 2, 3)
    r2 = np.einsum("rsk,rsk->rs", d, d)
    nb = pot.n_bonds
    r = np.sqrt(r2[:nb])
    inv10 = r2[nb:] ** -5
    e = d[:nb] / r[:, :, None]
    cos = -np.einsum("rsk,rsk->rs", e[:-1], e[1:])
    return (
        pot.bond_k * ((r - pot.bond_r0) ** 2).sum(axis=0)
        + (pot.angle_k * (cos - pot.cos_theta0) ** 2).sum(axis=0)
        + (pot.pair_a12 / 12.0 * inv10 / r2[nb:] - pot.pair_b10 / 10.0 * inv10).sum(axis=0)
    )


def active_structure(
    inactive: np.ndarray, ff: ForceField = ForceField(), temperature: float = REFERENCE_TEMPERATURE
) -> np.ndarray:
    """State 1's native structure (n, 3), nm: state 0's pushed along its softer normal modes.

    Mode k (λ_k ascending, unit vector v_k, thermal amplitude σ_k = √(kT/λ_k) at `temperature`)
    of state 0's potential gets the displacement c_k = a_k σ_k s_k: a_k = SOFT_AMPLITUDE for the
    SOFT_MODES softest modes, LOCAL_AMPLITUDE for the rest of the softer half, s_k = ±1 from a
    fixed random stream (independent of the simulation seed). A straight move along Σ c_k v_k
    would stretch bonds (soft modes rotate loop residues), so state 1 is the minimum of
    U₀(x) + ½ K Σ_k (v_kᵀ(x − x₀) − c_k)² over those modes, K = MODE_RESTRAINT: bonds, angles and
    the stiffer half of the modes relax under U₀ while the chosen projections are held.
    """
    n = len(inactive)
    values, vectors = normal_modes(inactive, ff)
    if values[0] <= 0:
        raise SciquantError(
            f"md synthesize: the {n}-bead bundle has a floppy mode (eigenvalue {values[0]:.3g});"
            " this is a bug in sciquant.workloads.md.sim, please report it"
        )
    held = len(values) // 2
    sigma = np.sqrt(BOLTZMANN * temperature / values[:held])
    signs = np.random.default_rng(MODE_SIGN_SEED).choice([-1.0, 1.0], size=held)
    amplitude = np.full(held, LOCAL_AMPLITUDE)
    amplitude[:SOFT_MODES] = SOFT_AMPLITUDE
    target = amplitude * sigma * signs
    modes = vectors[:, :held]
    pot = _potential((inactive, inactive), ff)
    origin = inactive.ravel()

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        xyz = np.repeat(flat.reshape(n, 1, 3), 2, axis=1)
        miss = modes.T @ (flat - origin) - target
        value = energy(xyz, pot)[0] + 0.5 * MODE_RESTRAINT * miss @ miss
        return float(value), -forces(xyz, pot)[:, 0].ravel() + MODE_RESTRAINT * (modes @ miss)

    start = origin + modes @ target
    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 10000})
    return result.x.reshape(n, 3)


def native_structures(n_beads: int, ff: ForceField = ForceField()) -> tuple[np.ndarray, np.ndarray]:
    """The native structures (n_beads, 3), nm, of state 0 (inactive) and state 1 (active)."""
    _check_beads(n_beads)
    inactive, active = _native_structures(int(n_beads), ff)
    return inactive.copy(), active.copy()


@functools.lru_cache(maxsize=4)
def _native_structures(n_beads: int, ff: ForceField) -> tuple[np.ndarray, np.ndarray]:
    # Cached: the normal-mode analysis takes about a second and depends on these two only.
    inactive = bundle(n_beads)
    return inactive, active_structure(inactive, ff)


def simulate(
    natives: tuple[np.ndarray, np.ndarray],
    frames: int,
    stride: int,
    temperature: float,
    seed: int,
    ff: ForceField = ForceField(),
    equilibration_steps: int = 2000,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Both states' BAOAB Langevin trajectories (2, frames, n, 3) nm, each under its own potential.

    The two states are integrated side by side (one array of shape (n, 2, 3)), which costs little
    more than one since the step time is dominated by per-call overhead.
    """
    pot = _potential(natives, ff)
    rng = np.random.default_rng(seed)
    kt = BOLTZMANN * temperature
    c1 = math.exp(-ff.friction * ff.dt)
    noise = math.sqrt((1.0 - c1 * c1) * kt / ff.mass)
    half = 0.5 * ff.dt
    kick = half / ff.mass
    x = np.stack(natives, axis=1).astype(np.float64)
    n = len(x)
    v = rng.normal(0.0, math.sqrt(kt / ff.mass), size=x.shape)
    f = forces(x, pot)
    out = np.empty((2, frames, n, 3))
    total = equilibration_steps + frames * stride
    for first in range(0, total, _NOISE_BLOCK):
        # One draw per block of steps: far cheaper than one per step, same stream for any frames.
        kicks = noise * rng.standard_normal((min(_NOISE_BLOCK, total - first), n, 2, 3))
        for offset, random_kick in enumerate(kicks):
            v += kick * f  # B
            x += half * v  # A
            v *= c1  # O
            v += random_kick
            x += half * v  # A
            f = forces(x, pot)
            v += kick * f  # B
            stored = first + offset + 1 - equilibration_steps
            if stored > 0 and stored % stride == 0:
                out[:, stored // stride - 1] = x.transpose(1, 0, 2)
                if progress is not None:
                    progress.update(1)
    return out


# --- files -------------------------------------------------------------------------------------


def _check_beads(n_beads: Any) -> None:
    if not isinstance(n_beads, int | np.integer) or isinstance(n_beads, bool):
        raise SciquantError(f"md synthesize: n_beads must be an integer, got {n_beads!r}")
    if not MIN_BEADS <= n_beads <= MAX_BEADS:
        raise SciquantError(
            f"md synthesize: n_beads must be in [{MIN_BEADS}, {MAX_BEADS}], got {n_beads}"
        )


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise SciquantError(f"md synthesize: {name} must be an integer ≥ {low}, got {value!r}")


def synthesize(
    raw: Path,
    *,
    n_beads: int = 96,
    frames: int = 600,
    seed: int = 0,
    stride: int = 50,
    temperature: float = 300.0,
    equilibration_steps: int = 2000,
    progress: bool = True,
) -> Path:
    """Simulate both states and write topology, trajectories and `dataset_info.json` into `raw`.

    `temperature` in K, `stride` in integration steps (0.02 ps each) between stored frames. Returns
    the path of `dataset_info.json`. The same arguments give the same coordinates bit for bit
    (identical `.xtc` and `dataset_info.json`; `.dcd` and `.pdb` headers carry the write date).

    Synthesis owns `raw`: afterwards it holds exactly these six files (`sciquant synthesize` then
    adds `manifest.json`). What an earlier synthesis left there is removed first, its
    `manifest.json` before anything else; a folder holding anything else (a download, other
    files) is refused with a `SciquantError` before anything is removed; see
    `_clear_earlier_synthesis`.
    """
    _check_beads(n_beads)
    _check_int("frames", frames, 2)
    _check_int("seed", seed, 0)
    _check_int("stride", stride, 1)
    _check_int("equilibration_steps", equilibration_steps, 0)
    if (
        not isinstance(temperature, int | float | np.number)
        or not math.isfinite(temperature)
        or not 1.0 <= temperature <= MAX_TEMPERATURE
    ):
        raise SciquantError(
            f"md synthesize: temperature must be a number of kelvin in [1, {MAX_TEMPERATURE:g}]"
            f" (the bundle unfolds above), got {temperature!r}"
        )
    raw = Path(raw)
    _clear_earlier_synthesis(raw)
    raw.mkdir(parents=True, exist_ok=True)
    ff = ForceField()
    natives = native_structures(int(n_beads))
    topology = build_topology(int(n_beads), seed=0)
    with tqdm(total=frames, desc="md simulation", unit="frame", disable=not progress) as bar:
        xyz = simulate(
            natives, frames, stride, float(temperature), int(seed), ff, equilibration_steps, bar
        )
    time_ps = (equilibration_steps + stride * np.arange(1, frames + 1)) * ff.dt
    trajectories = []
    for state in (0, 1):
        traj = mdtraj.Trajectory(xyz[state].astype(np.float32), topology, time=time_ps)
        for suffix in ("xtc", "dcd"):
            _save_atomic(traj, raw / f"state{state}.{suffix}")
        trajectories.append(
            {
                "file": f"state{state}.xtc",
                "label": state,
                "state": _STATES[state],
                "alternates": {"dcd": f"state{state}.dcd"},
                "frames": frames,
            }
        )
    _save_atomic(mdtraj.Trajectory(natives[0][None].astype(np.float32), topology),
                 raw / "topology.pdb")  # fmt: skip
    info = {
        "format": "sciquant-md-raw",
        "version": 1,
        "topology": "topology.pdb",
        "trajectories": trajectories,
        "simulator": {
            "model": "Go-model four-helix bundle, Calpha beads, BAOAB Langevin dynamics",
            "n_beads": int(n_beads),
            "frames": int(frames),
            "stride_steps": int(stride),
            "frame_interval_ps": stride * ff.dt,
            "equilibration_steps": int(equilibration_steps),
            "temperature_K": float(temperature),
            "force_field": asdict(ff),
            "units": "nm, ps, u, kJ/mol; force_field bond_k and angle_k in units of epsilon",
            "state1": {
                "reference_temperature_K": REFERENCE_TEMPERATURE,
                "soft_modes": SOFT_MODES,
                "soft_amplitude_sigma": SOFT_AMPLITUDE,
                "local_amplitude_sigma": LOCAL_AMPLITUDE,
                "mode_sign_seed": MODE_SIGN_SEED,
            },
        },
        "seed": int(seed),
    }
    path = raw / "dataset_info.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return path


# The files a synthesis leaves in its folder: the six it writes, the manifest written by
# `sciquant synthesize`, and the temporary names (`.<stem>.<random><suffix>`, see
# `sciquant.provenance.atomic_path`) an interrupted write leaves.
_OWN_FILE = re.compile(
    r"state[01]\.(xtc|dcd)|topology\.pdb|dataset_info\.json|manifest\.json"
    r"|\.state[01]\.[^/]+\.(xtc|dcd)|\.topology\.[^/]+\.pdb"
    r"|\.dataset_info\.[^/]+\.json|\.manifest\.[^/]+\.json"
)


def _clear_earlier_synthesis(raw: Path) -> None:
    """Remove what an earlier synthesis left in `raw` (`_OWN_FILE`; its `dataset_info.json` of
    format `sciquant-md-raw`), or refuse a folder it did not write
    (`sciquant.data.manifest.clear_earlier_synthesis`)."""
    from sciquant.data.manifest import clear_earlier_synthesis

    checks = {"dataset_info.json": lambda data: data.get("format") == "sciquant-md-raw"}
    clear_earlier_synthesis(raw, _OWN_FILE, "MD simulator", checks=checks)


def _save_atomic(traj: mdtraj.Trajectory, path: Path) -> None:
    """Save through a temporary name with the same suffix (mdtraj picks the format by suffix)."""
    with atomic_path(path) as tmp:
        tmp.unlink()  # mdtraj refuses to overwrite
        traj.save(str(tmp))
