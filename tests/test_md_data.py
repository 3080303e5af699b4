"""Tests of the MD data path: the embedded two-state simulator, pixel maps, splits and ingestion."""

from __future__ import annotations

import json
from pathlib import Path

import mdtraj
import numpy as np
import pytest

from sciquant.data.download import sha256_of
from sciquant.errors import SciquantError
from sciquant.workloads.md import data as md
from sciquant.workloads.md import sim as md_sim

N_BEADS = 60
FRAMES = 520
STRIDE = 40
SEED = 0


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic data set for the whole module (about 5 s)."""
    folder = tmp_path_factory.mktemp("md_raw")
    md_sim.synthesize(
        folder, n_beads=N_BEADS, frames=FRAMES, stride=STRIDE, seed=SEED, progress=False
    )
    return folder


@pytest.fixture(scope="module")
def superposed(raw: Path) -> tuple[list[mdtraj.Trajectory], list[np.ndarray]]:
    """Every frame of both states, superposed on frame 0 of state 0."""
    return md.load_superposed(
        raw / "topology.pdb",
        [raw / "state0.xtc", raw / "state1.xtc"],
        frames_per_trajectory="all",
        progress=False,
    )


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return md.prepare_from_info(raw, tmp_path_factory.mktemp("md_prepared"), progress=False)


def write_tiny_protein(folder: Path, n_frames: int = 30) -> tuple[Path, list[tuple[Path, int]]]:
    """A hand-built 2-chain, 5-residue backbone protein (20 atoms), one .pdb, two labelled .xtc."""
    topology = mdtraj.Topology()
    for chain_residues in (("MET", "LYS", "TRP"), ("GLY", "SER")):
        chain = topology.add_chain()
        for name in chain_residues:
            residue = topology.add_residue(name, chain)
            for atom, element in (("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O")):
                topology.add_atom(atom, mdtraj.element.get_by_symbol(element), residue)
    rng = np.random.default_rng(5)
    base = np.cumsum(rng.normal(0.0, 0.15, size=(topology.n_atoms, 3)), axis=0)
    mdtraj.Trajectory(base[None].astype(np.float32), topology).save_pdb(str(folder / "tiny.pdb"))
    listing = []
    for label in (0, 1):
        moved = base + 0.3 * label * np.sin(np.arange(topology.n_atoms))[:, None]
        xyz = moved + rng.normal(0.0, 0.02, size=(n_frames, *base.shape))
        path = folder / f"tiny_state{label}.xtc"
        mdtraj.Trajectory(xyz.astype(np.float32), topology).save_xtc(str(path))
        listing.append((path, label))
    return folder / "tiny.pdb", listing


# ---------------------------------------------------------------------------------------------
# Pixel maps and splits


def test_pixel_map_of_four_atoms_matches_hand_computation() -> None:
    # Atoms at the origin and on the three axes: RGB = 0 and the three columns of RGB_MATRIX.
    #   R: 0, 2.0413690, -0.5649464, -0.3446944 → min -0.5649464, span 2.6063154
    #      0.5649464/2.6063154·255 = 55.27 → 55;  255;  0;  0.2202520/2.6063154·255 = 21.55 → 21
    #   G: 0, -0.9692660, 1.8760108, 0.0415560  → min -0.9692660, span 2.8452768
    #      0.9692660/2.8452768·255 = 86.87 → 86;  0;  255;  1.0108220/2.8452768·255 = 90.59 → 90
    #   B: 0, 0.0134474, -0.1183897, 1.0154096  → min -0.1183897, span 1.1337993
    #      0.1183897/1.1337993·255 = 26.63 → 26;  0.1318371/1.1337993·255 = 29.65 → 29;  0;  255
    xyz = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    expected = np.array(
        [[[55, 86, 26], [255, 0, 29]],
         [[0, 255, 0], [21, 90, 255]]],
    ) / 255.0  # fmt: skip
    maps = md.pixel_map(xyz)
    assert maps.shape == (1, 2, 2, 3)
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps[0], expected, atol=1e-7)


def test_pixel_map_pads_the_grid_and_zeroes_constant_channels() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(3, 5, 3))
    maps = md.pixel_map(xyz)
    assert maps.shape == (3, 3, 3, 3)  # ceil(√5) = 3
    flat = maps.reshape(3, 9, 3)
    assert (flat[:, 5:] == 0).all()
    assert (flat[:, :5].min(axis=1) == 0).all() and (flat[:, :5].max(axis=1) == 1).all()
    np.testing.assert_array_equal(np.round(maps * 255), maps * 255)
    # Translating or scaling a frame changes nothing: the scaling is per frame.
    np.testing.assert_array_equal(md.pixel_map(2.0 * xyz + 7.0), maps)
    # All atoms on one spot: every channel is constant, so the map is 0.
    assert (md.pixel_map(np.ones((1, 4, 3))) == 0).all()


def test_rgb_matrix_is_icnnmds_fixed_well_conditioned_matrix() -> None:
    assert md.RGB_MATRIX.shape == (3, 3)
    assert md.RGB_MATRIX[0, 0] == pytest.approx(2.0413690)
    assert np.linalg.cond(md.RGB_MATRIX) < 5


def test_split_blocks_are_contiguous_in_time_with_gaps() -> None:
    codes = md.split_blocks(100, (0.7, 0.1, 0.2), gap=5)
    # 90 frames left after two gaps of 5: 63 train, 9 val, 18 test.
    expected = [0] * 63 + [-1] * 5 + [1] * 9 + [-1] * 5 + [2] * 18
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(
        md.split_blocks(10, (0.7, 0.1, 0.2), gap=0), [0] * 7 + [1] + [2] * 2
    )
    # A split without validation has one gap only.
    np.testing.assert_array_equal(
        md.split_blocks(12, (0.5, 0.0, 0.5), gap=2), [0] * 5 + [-1] * 2 + [2] * 5
    )


def test_split_blocks_too_few_frames_names_the_trajectory() -> None:
    with pytest.raises(SciquantError, match=r"short\.xtc.*12 frames are too few"):
        md.split_blocks(12, (0.7, 0.1, 0.2), gap=5, source="short.xtc")
    with pytest.raises(SciquantError, match="split"):
        md.split_blocks(100, (0.7, 0.1, 0.1))


# ---------------------------------------------------------------------------------------------
# The simulator and its files


def test_synthesize_writes_files_mdtraj_reads_back(raw: Path) -> None:
    info = json.loads((raw / "dataset_info.json").read_text())
    assert info["topology"] == "topology.pdb"
    assert [(t["file"], t["label"]) for t in info["trajectories"]] == [
        ("state0.xtc", 0),
        ("state1.xtc", 1),
    ]
    assert info["seed"] == SEED and info["simulator"]["n_beads"] == N_BEADS
    topology = mdtraj.load_topology(str(raw / "topology.pdb"))
    assert topology.n_atoms == topology.n_residues == N_BEADS
    assert topology.n_chains == 1
    assert {a.name for a in topology.atoms} == {"CA"}
    assert {r.name for r in topology.residues} <= set(
        md_sim._HELIX_RESIDUES + md_sim._LOOP_RESIDUES
    )
    for state in (0, 1):
        xtc = mdtraj.load(str(raw / f"state{state}.xtc"), top=str(raw / "topology.pdb"))
        dcd = mdtraj.load(str(raw / f"state{state}.dcd"), top=str(raw / "topology.pdb"))
        assert xtc.n_atoms == dcd.n_atoms == N_BEADS
        assert xtc.n_frames == dcd.n_frames == FRAMES
        np.testing.assert_allclose(xtc.xyz, dcd.xyz, atol=1e-3)  # xtc keeps 1e-3 nm
        # Bonds stay at Cα–Cα length: the chain neither breaks nor collapses.
        bonds = np.linalg.norm(np.diff(xtc.xyz, axis=1), axis=2)
        assert 0.3 < bonds.min() and bonds.max() < 0.45


def test_synthesize_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    def coordinates(seed: int, name: str) -> np.ndarray:
        md_sim.synthesize(tmp_path / name, n_beads=N_BEADS, frames=3, stride=5, seed=seed,
                          equilibration_steps=10, progress=False)  # fmt: skip
        return mdtraj.load(
            str(tmp_path / name / "state1.dcd"), top=str(tmp_path / name / "topology.pdb")
        ).xyz

    first, again, other = coordinates(3, "a"), coordinates(3, "b"), coordinates(4, "c")
    np.testing.assert_array_equal(first, again)
    assert (tmp_path / "a" / "state0.xtc").read_bytes() == (
        tmp_path / "b" / "state0.xtc"
    ).read_bytes()
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("n_beads", 49), ("n_beads", 151), ("n_beads", 60.5), ("frames", 1), ("stride", 0),
     ("seed", -1), ("temperature", 0.0), ("temperature", 5000.0), ("equilibration_steps", -1)],
)  # fmt: skip
def test_synthesize_rejects_bad_arguments(tmp_path: Path, argument: str, value: object) -> None:
    with pytest.raises(SciquantError, match=argument):
        md_sim.synthesize(tmp_path, progress=False, **{argument: value})
    assert not (tmp_path / "dataset_info.json").exists()


def test_forces_are_minus_the_energy_gradient() -> None:
    natives = md_sim.native_structures(N_BEADS)
    pot = md_sim._potential(natives, md_sim.ForceField())
    rng = np.random.default_rng(1)
    xyz = np.stack(natives, axis=1) + rng.normal(0.0, 0.02, size=(N_BEADS, 2, 3))
    forces = md_sim.forces(xyz, pot)
    step = 1e-6
    for atom, axis in [(0, 0), (17, 1), (30, 2), (N_BEADS - 1, 1)]:
        plus, minus = xyz.copy(), xyz.copy()
        plus[atom, :, axis] += step
        minus[atom, :, axis] -= step
        numeric = -(md_sim.energy(plus, pot) - md_sim.energy(minus, pot)) / (2 * step)
        np.testing.assert_allclose(forces[atom, :, axis], numeric, rtol=1e-4, atol=1e-3)


def test_states_differ_by_more_than_their_fluctuations(superposed) -> None:
    trajectories, _ = superposed
    every = 10

    def mean_rmsd(a: mdtraj.Trajectory, b: mdtraj.Trajectory) -> float:
        return float(
            np.mean([mdtraj.rmsd(b[::every], a, frame=k) for k in range(0, a.n_frames, every)])
        )

    within = (
        mean_rmsd(trajectories[0], trajectories[0]) + mean_rmsd(trajectories[1], trajectories[1])
    ) / 2
    between = mean_rmsd(trajectories[0], trajectories[1])
    assert between > 1.15 * within


def best_single_distance_accuracy(xyz: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the best threshold on one inter-bead distance (fitted on all frames)."""
    i, j = np.triu_indices(xyz.shape[1], k=1)
    distances = np.linalg.norm(xyz[:, j] - xyz[:, i], axis=-1)
    ordered = labels[np.argsort(distances, axis=0)]
    ones_below = np.cumsum(ordered, axis=0)
    zeros_below = np.cumsum(1 - ordered, axis=0)
    n_ones = labels.sum()
    n_zeros = len(labels) - n_ones
    # Threshold after each sorted frame, either orientation.
    correct = np.maximum(zeros_below + n_ones - ones_below, ones_below + n_zeros - zeros_below)
    return float(correct.max() / len(labels))


def test_no_single_distance_separates_the_states(superposed) -> None:
    trajectories, _ = superposed
    xyz = np.concatenate([t.xyz for t in trajectories]).astype(np.float64)
    labels = np.repeat([0, 1], FRAMES)
    assert best_single_distance_accuracy(xyz, labels) < 0.95


def test_linear_classifier_on_coordinates_separates_the_states(superposed) -> None:
    trajectories, _ = superposed
    codes = md.split_blocks(FRAMES, (0.7, 0.1, 0.2), gap=md.DEFAULT_GAP)
    features = np.concatenate([t.xyz.reshape(FRAMES, -1) for t in trajectories]).astype(np.float64)
    labels = np.repeat([0.0, 1.0], FRAMES)
    split = np.concatenate([codes, codes])
    train, test = split == 0, split == 2
    mean = features[train].mean(axis=0)
    design = np.c_[features - mean, np.ones(len(features))]
    # Ridge least squares on ±1 targets.
    weights = np.linalg.solve(
        design[train].T @ design[train] + 0.1 * np.eye(design.shape[1]),
        design[train].T @ (2 * labels[train] - 1),
    )
    accuracy = np.mean((design[test] @ weights > 0) == labels[test].astype(bool))
    assert accuracy >= 0.97


# ---------------------------------------------------------------------------------------------
# Ingestion


def test_prepare_writes_pixel_maps_labels_and_time_blocks(prepared: Path, raw: Path) -> None:
    data = md.load_prepared(prepared)
    index = md.load_index(prepared)
    side = 8  # ceil(√60)
    kept = 90  # 100 frames − 2 gaps of 5
    assert data["x"].shape == (2 * kept, side, side, 3) and data["x"].dtype == np.float32
    assert data["x"].min() == 0.0 and data["x"].max() == 1.0
    assert (data["x"].reshape(len(data["x"]), -1, 3)[:, N_BEADS:] == 0).all()
    for name, dtype in (
        ("y", np.int64),
        ("trajectory", np.int64),
        ("frame", np.int64),
        ("split", np.int8),
    ):
        assert data[name].dtype == dtype and data[name].shape == (2 * kept,)
    np.testing.assert_array_equal(data["y"], data["trajectory"])
    assert index["grid"] == side and index["n_atoms"] == N_BEADS
    assert index["split"]["counts"]["train"] == {"total": 126, "0": 63, "1": 63}
    assert index["split"]["counts"]["test"] == {"total": 36, "0": 18, "1": 18}
    assert index["files"][0]["path"] == "state0.xtc" and index["files"][1]["label"] == 1
    assert index["files"][0]["sha256"] == sha256_of(raw / "state0.xtc")
    assert (
        index["topology"]["n_residues"] == N_BEADS and index["rgb_matrix"] == md.RGB_MATRIX.tolist()
    )
    for trajectory in (0, 1):
        rows = data["trajectory"] == trajectory
        frames, split = data["frame"][rows], data["split"][rows]
        blocks = [frames[split == code] for code in range(3)]
        for block in blocks:  # contiguous in time
            np.testing.assert_array_equal(np.diff(block), 1)
        # Every val frame after every train frame, every test frame after every val frame, with
        # at least `gap` frames dropped in between.
        assert blocks[1].min() - blocks[0].max() == md.DEFAULT_GAP + 1
        assert blocks[2].min() - blocks[1].max() == md.DEFAULT_GAP + 1
    train = md.split_arrays(data, "train")
    assert len(train["x"]) == 126 and (train["split"] == 0).all()


def test_prepare_superposes_every_frame_on_the_first(superposed) -> None:
    trajectories, numbers = superposed
    reference = trajectories[0][0]
    assert mdtraj.rmsd(reference, reference)[0] == pytest.approx(0.0, abs=1e-4)
    for trajectory in trajectories:
        # Already optimally aligned: the RMSD without fitting equals the fitted one.
        raw_rmsd = np.sqrt(((trajectory.xyz - reference.xyz) ** 2).sum(axis=2).mean(axis=1))
        np.testing.assert_allclose(raw_rmsd, mdtraj.rmsd(trajectory, reference), atol=2e-3)
    np.testing.assert_array_equal(numbers[1], np.arange(FRAMES))


def test_prepare_with_a_selection_and_stride(raw: Path, tmp_path: Path) -> None:
    listing = [(raw / "state0.dcd", 0), (raw / "state1.dcd", 1)]
    md.prepare(raw / "topology.pdb", listing, tmp_path / "ca", selection="CA", progress=False)
    assert md.load_index(tmp_path / "ca")["n_atoms"] == N_BEADS
    md.prepare(raw / "topology.pdb", listing, tmp_path / "part", selection="resid 0 to 24",
               frames_per_trajectory=40, stride=3, gap=0, progress=False)  # fmt: skip
    data = md.load_prepared(tmp_path / "part")
    assert data["x"].shape == (80, 5, 5, 3)
    np.testing.assert_array_equal(data["frame"][:40], np.arange(40) * 3)


@pytest.mark.parametrize("selection", ["name CA and", "foo bar", "name CB", ""])
def test_prepare_rejects_bad_or_empty_selection(raw: Path, tmp_path: Path, selection: str) -> None:
    with pytest.raises(SciquantError, match="selection") as error:
        md.prepare(raw / "topology.pdb", [(raw / "state0.xtc", 0)], tmp_path, selection=selection,
                   progress=False)  # fmt: skip
    if selection:
        assert "topology.pdb" in str(error.value)


def test_prepare_reads_any_protein_topology(tmp_path: Path) -> None:
    topology, listing = write_tiny_protein(tmp_path)
    md.prepare(topology, listing, tmp_path / "all", frames_per_trajectory=30, progress=False)
    md.prepare(topology, listing, tmp_path / "backbone", selection="protein and name CA",
               frames_per_trajectory=30, gap=1, progress=False)  # fmt: skip
    everything = md.load_prepared(tmp_path / "all")
    alpha = md.load_prepared(tmp_path / "backbone")
    assert everything["x"].shape[1:] == (5, 5, 3)  # 20 atoms → 5 × 5
    assert alpha["x"].shape[1:] == (3, 3, 3)  # 5 Cα → 3 × 3
    index = md.load_index(tmp_path / "all")
    assert index["topology"] | {"sha256": None} == {
        "path": "tiny.pdb", "sha256": None, "n_atoms": 20, "n_residues": 5, "n_chains": 2,
    }  # fmt: skip


def test_prepare_reads_a_psf_topology(tmp_path: Path) -> None:
    lines = ["PSF", "", "       1 !NTITLE", " REMARKS four residues", "", "       4 !NATOM"]
    for number, residue in enumerate(("ALA", "GLY", "LEU", "SER"), start=1):
        charge_mass = "0.000000       12.0110           0"
        lines.append(f"{number:8d} PROA {number:<4d} {residue:<4s} CA   CT1    {charge_mass}")
    lines += ["", "       3 !NBOND: bonds", "       1       2       2       3       3       4", ""]
    (tmp_path / "tiny.psf").write_text("\n".join(lines) + "\n")
    topology = mdtraj.load_topology(str(tmp_path / "tiny.psf"))
    rng = np.random.default_rng(2)
    listing = []
    for label in (0, 1):
        path = tmp_path / f"s{label}.dcd"
        mdtraj.Trajectory(rng.normal(size=(20, 4, 3)).astype(np.float32), topology).save_dcd(
            str(path)
        )
        listing.append((path, label))
    md.prepare(tmp_path / "tiny.psf", listing, tmp_path / "out", frames_per_trajectory="all", gap=0,
               progress=False)  # fmt: skip
    assert md.load_prepared(tmp_path / "out")["x"].shape == (40, 2, 2, 3)


# ---------------------------------------------------------------------------------------------
# Errors name the file


def test_atom_count_mismatch_names_both_files_and_counts(raw: Path, tmp_path: Path) -> None:
    short = mdtraj.load(str(raw / "topology.pdb")).atom_slice(np.arange(N_BEADS - 1))
    short.save_pdb(str(tmp_path / "short.pdb"))
    with pytest.raises(SciquantError) as error:
        md.prepare(
            tmp_path / "short.pdb", [(raw / "state0.xtc", 0)], tmp_path / "out", progress=False
        )
    message = str(error.value)
    assert "state0.xtc" in message and "short.pdb" in message
    assert str(N_BEADS) in message and str(N_BEADS - 1) in message


def test_truncated_trajectory_names_the_file(raw: Path, tmp_path: Path) -> None:
    data = (raw / "state0.xtc").read_bytes()
    (tmp_path / "cut.xtc").write_bytes(data[: len(data) // 2 + 13])
    with pytest.raises(SciquantError, match=r"cut\.xtc.*truncated"):
        md.prepare(raw / "topology.pdb", [(tmp_path / "cut.xtc", 0)], tmp_path / "out",
                   frames_per_trajectory=400, progress=False)  # fmt: skip
    dcd = (raw / "state0.dcd").read_bytes()
    (tmp_path / "cut.dcd").write_bytes(dcd[: len(dcd) // 2])
    with pytest.raises(SciquantError, match=r"cut\.dcd.*truncated"):
        md.prepare(raw / "topology.pdb", [(tmp_path / "cut.dcd", 0)], tmp_path / "out",
                   frames_per_trajectory=400, progress=False)  # fmt: skip
    # The intact first part of a cut file is still usable.
    md.prepare(raw / "topology.pdb", [(tmp_path / "cut.xtc", 0)], tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [("garbage.xtc", b"this is a text file, not a trajectory\n" * 40, "cannot be read"),
     ("garbage.dcd", b"this is a text file, not a trajectory\n" * 40, "cannot be read"),
     ("traj.gro.gz", b"\x1f\x8b" + b"\x00" * 100, r"\.xtc"),
     ("run.tpr", b"\x00" * 100, r"\.xtc")],
)  # fmt: skip
def test_unreadable_trajectory_names_the_file(raw: Path, tmp_path: Path, name: str, content: bytes,
                                              expected: str) -> None:  # fmt: skip
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SciquantError, match=expected) as error:
        md.prepare(raw / "topology.pdb", [(tmp_path / name, 0)], tmp_path / "out", progress=False)
    assert name in str(error.value)


@pytest.mark.filterwarnings("ignore:Need to guess atom number")
def test_unreadable_topology_names_the_file(raw: Path, tmp_path: Path) -> None:
    (tmp_path / "topol.tpr").write_bytes(b"\x00" * 100)
    with pytest.raises(SciquantError, match=r"topol\.tpr.*\.pdb"):
        md.prepare(
            tmp_path / "topol.tpr", [(raw / "state0.xtc", 0)], tmp_path / "out", progress=False
        )
    (tmp_path / "broken.pdb").write_text("ATOM  garbage\n")
    with pytest.raises(SciquantError, match=r"broken\.pdb"):
        md.prepare(
            tmp_path / "broken.pdb", [(raw / "state0.xtc", 0)], tmp_path / "out", progress=False
        )


def test_missing_files_are_named(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(SciquantError, match=r"nothere\.xtc.*not found"):
        md.prepare(
            raw / "topology.pdb", [(tmp_path / "nothere.xtc", 0)], tmp_path / "out", progress=False
        )
    with pytest.raises(SciquantError, match=r"nothere\.pdb.*not found"):
        md.prepare(
            tmp_path / "nothere.pdb", [(raw / "state0.xtc", 0)], tmp_path / "out", progress=False
        )
    with pytest.raises(SciquantError, match=r"dataset_info\.json.*not found"):
        md.prepare_from_info(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "dataset_info.json").write_text('{"topology": "topology.pdb"}')
    with pytest.raises(SciquantError, match=r"dataset_info\.json.*trajectories"):
        md.prepare_from_info(tmp_path, tmp_path / "out", progress=False)


def test_too_few_frames_for_the_split_names_the_file(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(SciquantError, match=r"state0\.xtc.*too few"):
        md.prepare(raw / "topology.pdb", [(raw / "state0.xtc", 0), (raw / "state1.xtc", 1)],
                   tmp_path / "out", frames_per_trajectory=10, progress=False)  # fmt: skip


def test_load_prepared_errors_name_the_file(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(SciquantError, match=r"index\.json.*not found"):
        md.load_prepared(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    index = json.loads((prepared / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps(index | {"version": 99}))
    with pytest.raises(SciquantError, match=r"index\.json.*version"):
        md.load_prepared(copy)
    (copy / "index.json").write_text(json.dumps(index))
    (copy / "pixelmaps.npz").write_bytes((prepared / "pixelmaps.npz").read_bytes()[:1000])
    with pytest.raises(SciquantError, match=r"pixelmaps\.npz"):
        md.load_prepared(copy)


def test_embedded_data_without_its_listing_names_the_file_and_synthesis(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Synthesized data whose dataset_info.json is gone: the error names that file and the
    synthesis, not the download listing it does not have; a shrunken file is named first."""
    import shutil

    from sciquant import cli
    from sciquant.data.manifest import write_manifest

    copy = Path(shutil.copytree(raw, tmp_path / "raw"))
    write_manifest(copy, source={"embedded": {"n_beads": N_BEADS}})
    (copy / "dataset_info.json").unlink()
    argv = ["prepare", "md", "--raw", str(copy), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "dataset_info.json (missing)" in err and "--forcerun synthesize" in err
    write_manifest(copy, source={"embedded": {"n_beads": N_BEADS}})
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "dataset_info.json: not found" in err and "embedded (synthesized) data" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
