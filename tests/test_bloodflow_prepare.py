"""Ingestion of VMR-format centerlines into graph samples, on a hand-made Y-shaped tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow import data as bloodflow
from sciquant.workloads.bloodflow.data import BRANCH, INLET, JUNCTION, OUTLET, PrepareSettings
from sciquant.workloads.bloodflow.vtp import Centerline, read_centerline, write_centerline

STEPS = 40
DT = 0.025  # stored step, s; one cycle of T = 1 s


def y_tree(points_per_branch: int = 20) -> tuple[Centerline, list[int]]:
    """Parent along x, a junction point, two daughters diverging in the x-y plane."""
    n = points_per_branch
    parent = np.stack([np.linspace(0, 5, n), np.zeros(n), np.zeros(n)], axis=1)
    junction = np.array([[5.25, 0.0, 0.0]])
    up = np.stack([5.5 + np.linspace(0, 4, n), np.linspace(0.2, 3, n), np.zeros(n)], axis=1)
    down = np.stack([5.5 + np.linspace(0, 4, n), -np.linspace(0.2, 3, n), np.zeros(n)], axis=1)
    points = np.concatenate([parent, junction, up, down])
    j = n
    edges = [(i, i + 1) for i in range(n - 1)] + [(n - 1, j)]
    edges += [(j, j + 1)] + [(i, i + 1) for i in range(j + 1, j + n)]
    edges += [(j, j + n + 1)] + [(i, i + 1) for i in range(j + n + 1, j + 2 * n)]
    branch = np.concatenate([np.zeros(n), [-1], np.ones(n), 2 * np.ones(n)]).astype(np.int32)
    bifurcation = np.where(branch < 0, 0, -1).astype(np.int32)
    area = np.where(branch == 0, 0.5, 0.3)
    t = np.arange(STEPS) * DT
    data = {"area": area, "BranchIdTmp": branch, "BifurcationId": bifurcation}
    for k, time in enumerate(t):
        inflow = 5 + 3 * np.sin(2 * np.pi * time)
        flow = np.where(branch == 0, inflow, inflow / 2)
        flow[j] = inflow
        data[f"pressure_{k}"] = 1.2e5 + 2e4 * np.sin(2 * np.pi * time) - 100 * points[:, 0]
        data[f"flow_{k}"] = flow
    outlets = [j + n, j + 2 * n]
    return Centerline(points, np.asarray(edges), data), outlets


def write_dataset(raw: Path, n_simulations: int = 5) -> Path:
    vtps = raw / "vtps"
    info = {}
    for s in range(n_simulations):
        centerline, outlets = y_tree()
        write_centerline(vtps / f"sim_{s:03d}.vtp", centerline)
        info[f"sim_{s:03d}"] = {
            "dt": DT, "T": 1.0, "time_shift": 0.0, "bc_type": "RCR", "outlets": outlets,
            "R1": [1000.0 + s, 1100.0], "C": [1e-4, 2e-4], "R2": [9000.0, 9500.0],
        }  # fmt: skip
    (vtps / "dataset_info.json").write_text(json.dumps(info))
    return vtps


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "raw")
    return tmp_path / "raw"


def test_vtp_round_trip(tmp_path: Path) -> None:
    centerline, _ = y_tree()
    write_centerline(tmp_path / "a.vtp", centerline)
    back = read_centerline(tmp_path / "a.vtp")
    np.testing.assert_allclose(back.points, centerline.points)
    np.testing.assert_array_equal(np.sort(back.edges, axis=0), np.sort(centerline.edges, axis=0))
    np.testing.assert_allclose(back.point_data["pressure_3"], centerline.point_data["pressure_3"])


def test_graph_nodes_edges_and_types(raw: Path) -> None:
    vtps = raw / "vtps"
    info = json.loads((vtps / "dataset_info.json").read_text())
    sim = bloodflow.load_simulation(vtps / "sim_000.vtp", info)
    graph, _ = bloodflow.build_graph(sim, PrepareSettings(keep_fraction=0.25, boundary_edge_hops=2))
    types = graph["node_type"]
    assert (types == INLET).sum() == 1 and types[0] == INLET
    assert (types == OUTLET).sum() == 2
    assert (types == JUNCTION).sum() == 1
    n = len(types)
    # A tree: n - 1 undirected tree edges, both directions, plus boundary edges (3 boundary nodes,
    # each to its one node at 2 hops, both directions).
    edge_type = graph["edge_features"][:, 4:].argmax(axis=1)
    assert (edge_type <= 2).sum() == 2 * (n - 1)
    assert (edge_type == 3).sum() == 2 and (edge_type == 4).sum() == 4
    assert graph["edge_features"].shape == (len(edge_type), 9)
    # Relative position and distance are consistent with node positions.
    src, dst = graph["edge_index"]
    np.testing.assert_allclose(
        graph["edge_features"][:, :3], graph["pos"][dst] - graph["pos"][src], rtol=1e-6
    )
    np.testing.assert_allclose(
        graph["edge_features"][:, 3],
        np.linalg.norm(graph["pos"][dst] - graph["pos"][src], axis=1),
        rtol=1e-5,
    )
    # Roughly keep_fraction of the 41 points are kept; inlet, junction, outlets always.
    assert 0.15 * 41 <= n <= 0.45 * 41
    # Windkessel values sit on the outlets only, in the listed order.
    outlet_nodes = np.flatnonzero(types == OUTLET)
    np.testing.assert_allclose(graph["R1"][outlet_nodes], [1000.0, 1100.0])
    assert np.all(graph["R1"][types != OUTLET] == 0)
    assert np.all(graph["branch_id"][types == JUNCTION] == -1)
    assert set(graph["branch_id"][types == BRANCH]) <= {0, 1, 2}
    np.testing.assert_allclose(np.linalg.norm(graph["tangent"], axis=1), 1.0, rtol=1e-5)


def test_prepare_writes_samples_splits_and_statistics(raw: Path, tmp_path: Path) -> None:
    settings = PrepareSettings(
        keep_fraction=0.25, dt=0.05, loading_steps=4, time_offsets=3,
        split={"train": 0.6, "valid": 0.2, "test": 0.2, "seed": 1},
    )  # fmt: skip
    out = tmp_path / "prepared"
    bloodflow.prepare(raw, out, settings)
    index = bloodflow.load_index(out)
    simulations = index["simulations"]
    assert sorted(sum(simulations.values(), [])) == [f"sim_{s:03d}" for s in range(5)]
    assert len(simulations["test"]) == 1 and len(simulations["train"]) == 3
    assert len(index["samples"]["train"]) == 3 * 3  # time-offset copies of training sims only
    assert len(index["samples"]["test"]) == 1
    sample = bloodflow.load_sample(out, index["samples"]["test"][0])
    steps = 4 + int(round(1.0 / 0.05)) + 1
    assert sample["pressure"].shape == (steps, len(sample["area"]))
    assert sample["loading"].tolist() == [1.0] * 4 + [0.0] * (steps - 4)
    # The loading ramp starts from zero flow and ends next to the cycle's first value.
    assert np.all(sample["flowrate"][0] == 0)
    # The resampled cycle reproduces the raw sine inflow at the inlet.
    t = np.arange(steps - 4) * 0.05
    np.testing.assert_allclose(sample["flowrate"][4:, 0], 5 + 3 * np.sin(2 * np.pi * t), atol=0.05)
    stats = index["statistics"]
    assert set(stats) >= {"pressure", "flowrate", "delta_pressure", "R1", "C", "R2"}
    assert stats["flowrate"]["std"] > 0
    assert len(index["node_features"]) == 53 and len(index["edge_features"]) == 9
    # The lumped tree's flow at the inlet is the imposed inflow itself (a sine: two harmonics
    # of the Fourier series, exact), ramp included.
    np.testing.assert_allclose(sample["linear_flowrate"][:, 0], sample["flowrate"][:, 0], atol=1e-3)
    assert sample["linear_pressure"].shape == sample["pressure"].shape


@pytest.mark.parametrize("harmonics", [0, 1])
def test_feature_count_follows_the_harmonics(raw: Path, tmp_path: Path, harmonics: int) -> None:
    """53 features with the default 3 harmonics; 6 fewer per harmonic left out."""
    from sciquant.workloads.bloodflow.features import Normalizer, step_inputs, to_tensors

    out = tmp_path / "prepared"
    settings = PrepareSettings(keep_fraction=0.25, dt=0.05, loading_steps=4, harmonics=harmonics)
    bloodflow.prepare(raw, out, settings)
    index = bloodflow.load_index(out)
    names = index["node_features"]
    assert len(names) == 53 - 6 * (3 - harmonics) == len(set(names))
    name = index["samples"]["test"][0]
    graph = to_tensors(name, bloodflow.load_sample(out, name), Normalizer.from_statistics(
        index["statistics"]))  # fmt: skip
    n = graph.num_nodes
    norm = Normalizer.from_statistics(index["statistics"])
    p, q = graph.pressure[0], graph.flowrate[0]
    x, _ = step_inputs(norm, graph.static, p, q, p, p, p, torch.zeros(n, 2), (p, q), (p, q))
    assert x.shape == (n, len(names))
    # The steady share sits where its name says.
    share = x[:, names.index("flow_share")].numpy()
    sample = bloodflow.load_sample(out, name)
    np.testing.assert_allclose(share, sample["flow_share"], rtol=1e-6)
    # The expansion losses in pulse pressures at the mean inflow, and under the prior's flow
    # q̃ (here the state's): −D·q̃|q̃| in the pressure's z-score scale.
    _, pulse, flow_scale = bloodflow.sample_scales(sample, name)
    inflow = float(flow_scale[sample["node_type"] == bloodflow.INLET][0])
    drop = x[:, names.index("expansion_drop")].numpy()
    np.testing.assert_allclose(drop, sample["expansion_drop"] * inflow**2 / pulse, rtol=1e-5)
    flow = q.numpy() * norm.std["flowrate"] + norm.mean["flowrate"]
    level = x[:, names.index("expansion_pressure")].numpy()
    expected = -drop * flow * np.abs(flow) / norm.std["pressure"]
    np.testing.assert_allclose(level, expected, rtol=1e-4, atol=1e-7)
    assert np.all(x[:, names.index("expansion_delta_pressure")].numpy() == pytest.approx(
        norm.normalize("delta_pressure", 0.0)))  # fmt: skip  # the prior's flow did not move


def test_per_simulation_scales_and_their_inverse(raw: Path, tmp_path: Path) -> None:
    """p̃ = (p − p_dia)/(p_sys − p_dia), q̃ = q/(s·Q̄_in) by hand; physical() undoes them exactly."""
    import torch

    from sciquant.workloads.bloodflow.features import Normalizer, merge_graphs, to_tensors

    out = tmp_path / "prepared"
    bloodflow.prepare(raw, out, PrepareSettings(keep_fraction=0.25, dt=0.05, loading_steps=4))
    index = bloodflow.load_index(out)
    norm = Normalizer.from_statistics(index["statistics"])
    name = index["samples"]["test"][0]
    sample = bloodflow.load_sample(out, name)
    offset, pressure_scale, flow_scale = bloodflow.sample_scales(sample)
    inlet_pressure = sample["pressure"][4:, 0].astype(np.float64)
    assert offset == pytest.approx(inlet_pressure.min())
    assert pressure_scale == pytest.approx(np.ptp(inlet_pressure))
    # Inflow 5 + 3 sin(2πt) sampled over one closed cycle (t = 0..1 s every 0.05 s).
    t = np.arange(21) * 0.05
    mean_inflow = np.mean(5 + 3 * np.sin(2 * np.pi * t))
    np.testing.assert_allclose(flow_scale, mean_inflow * sample["flow_share"], rtol=1e-12)
    assert flow_scale[0] == pytest.approx(mean_inflow, rel=1e-3)  # the inlet's share is 1
    # The daughters split the inflow by their outlet resistances (R1 + R2 ≈ 10⁴ dyn·s/cm⁵; the
    # vessels' own resistance is < 0.1 % of that).
    outlets = sample["node_type"] == OUTLET
    share = sample["flow_share"][outlets]
    resistance = (sample["R1"] + sample["R2"])[outlets]
    assert share.sum() == pytest.approx(1.0, rel=1e-6)
    assert share[0] / share[1] == pytest.approx(resistance[1] / resistance[0], rel=2e-3)
    graph = to_tensors(name, sample, norm)
    for field in ("pressure", "flowrate"):
        back = graph.physical(norm, field, getattr(graph, field).numpy())
        np.testing.assert_allclose(back, sample[field], rtol=2e-6, atol=1e-6)
    # Merged graphs keep each sample's own scales.
    other = dict(sample, flowrate=2 * sample["flowrate"], pressure=sample["pressure"] + 5e3)
    merged, parts = merge_graphs([graph, to_tensors("other", other, norm)])
    back = merged.physical(norm, "flowrate", merged.flowrate)
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(
        back[:, parts[1][0]].numpy(), other["flowrate"], rtol=2e-6, atol=1e-5
    )
    np.testing.assert_allclose(
        merged.physical(norm, "pressure", merged.pressure.numpy())[:, parts[1][0]],
        other["pressure"],
        rtol=2e-6,
    )


def test_unscalable_sample_names_itself(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    bloodflow.prepare(raw, out, PrepareSettings(keep_fraction=0.25, dt=0.05, loading_steps=4))
    sample = bloodflow.load_sample(out, bloodflow.load_index(out)["samples"]["test"][0])
    with pytest.raises(SciquantError, match=r"sim_x.*cycle-mean inlet flow .*-"):
        bloodflow.sample_scales(dict(sample, flowrate=-sample["flowrate"]), "sim_x")
    flat = dict(sample, systolic=sample["diastolic"])
    with pytest.raises(SciquantError, match=r"sim_y.*constant"):
        bloodflow.sample_scales(flat, "sim_y")


def test_missing_array_names_file(raw: Path, tmp_path: Path) -> None:
    path = raw / "vtps" / "sim_002.vtp"
    centerline = read_centerline(path)
    del centerline.point_data["area"]
    write_centerline(path, centerline)
    with pytest.raises(SciquantError, match=r"sim_002\.vtp.*'area' is missing"):
        bloodflow.prepare(raw, tmp_path / "out", PrepareSettings())


def test_nan_values_name_file(raw: Path, tmp_path: Path) -> None:
    path = raw / "vtps" / "sim_001.vtp"
    centerline = read_centerline(path)
    centerline.point_data["pressure_7"][3] = np.nan
    write_centerline(path, centerline)
    with pytest.raises(SciquantError, match=r"sim_001\.vtp.*'pressure' contains NaN"):
        bloodflow.prepare(raw, tmp_path / "out", PrepareSettings())


def test_simulation_missing_from_dataset_info(raw: Path, tmp_path: Path) -> None:
    info_path = raw / "vtps" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    del info["sim_003"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(SciquantError, match=r"sim_003\.vtp.*missing from dataset_info\.json"):
        bloodflow.prepare(raw, tmp_path / "out", PrepareSettings())


def test_not_a_vtp_names_file(raw: Path, tmp_path: Path) -> None:
    (raw / "vtps" / "sim_004.vtp").write_text("not xml")
    with pytest.raises(SciquantError, match=r"sim_004\.vtp"):
        bloodflow.prepare(raw, tmp_path / "out", PrepareSettings())


def test_no_dataset_info(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(SciquantError, match="no dataset_info.json"):
        bloodflow.prepare(tmp_path / "raw", tmp_path / "out", PrepareSettings())


def _narrowed(throat: int, ratio: float) -> Centerline:
    """The Y tree with a cosine-shaped narrowing of the parent centred on point `throat`."""
    centerline, _ = y_tree()
    area = np.array(centerline.point_data["area"], dtype=np.float64)
    offsets = np.arange(-3, 4)
    area[throat + offsets] = 0.5 * (1 - (1 - ratio) * 0.5 * (1 + np.cos(np.pi * offsets / 4)))
    return Centerline(centerline.points, centerline.edges, {**centerline.point_data, "area": area})


@pytest.mark.parametrize("throat", [6, 7, 9, 11])
def test_a_stenosis_throat_is_kept_wherever_the_spacing_falls(throat: int) -> None:
    """The sampled graph (one point in 8) misses most throats; with `throat_narrowing` the throat
    is a node, so the graph shows the narrowing's depth."""
    centerline = _narrowed(throat, ratio=0.3)
    types = bloodflow.point_types(centerline)
    plain, _ = bloodflow.select_points(centerline, types, keep_fraction=0.125)
    kept, edges = bloodflow.select_points(centerline, types, 0.125, throat_narrowing=0.2)
    assert throat in kept
    # One node more at most (the spacing restarts at the throat, as at any kept point).
    assert len(plain) <= len(kept) <= len(plain) + 1
    assert len(edges) == len(kept) - 1  # still a tree over the kept points
    area = centerline.point_data["area"]
    assert area[kept].min() == pytest.approx(0.5 * 0.3)
    # Below the threshold (a 15 % narrowing) or switched off: the plain sampling.
    shallow = _narrowed(throat, ratio=0.85)
    for narrowing, line in ((0.2, shallow), (0.0, centerline)):
        again, _ = bloodflow.select_points(line, types, 0.125, throat_narrowing=narrowing)
        np.testing.assert_array_equal(again, bloodflow.select_points(line, types, 0.125)[0])


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_bad_throat_narrowing_names_the_key(value: float) -> None:
    with pytest.raises(SciquantError, match="prepare.throat_narrowing"):
        PrepareSettings(throat_narrowing=value)


def test_backward_inflow_names_the_file(tmp_path: Path) -> None:
    """A raw file whose inflow runs backward on average (a flipped sign convention) stops
    prepare with its name before anything is written for it."""
    vtps = write_dataset(tmp_path / "raw", n_simulations=3)
    centerline = read_centerline(vtps / "sim_001.vtp")
    data = dict(centerline.point_data)
    for key in [k for k in data if k.startswith("flow_")]:
        data[key] = -data[key]
    write_centerline(vtps / "sim_001.vtp", Centerline(centerline.points, centerline.edges, data))
    out = tmp_path / "prepared"
    with pytest.raises(SciquantError, match=r"sim_001\.vtp.*mean inflow.*sign convention"):
        bloodflow.prepare(tmp_path / "raw", out, PrepareSettings(keep_fraction=0.25, dt=0.05))
    assert not (out / "graphs" / "sim_001_o0.npz").exists()
