"""`sciquant bench rollout` (sciquant.benchmarks.rollout) on a tiny model and graph."""

from __future__ import annotations

import pytest

from sciquant.benchmarks.rollout import (
    DEFAULT_ROLLOUT_STEPS,
    GOAL_INT8_LARGEST,
    format_table,
    operator_split,
    rollout_block,
    run,
    verdicts,
)
from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNetConfig, random_tree_graph
from sciquant.runtime.onnxruntime import INTEGER_OPS

SMALL = MeshGraphNetConfig(hidden=16, processor_size=2)
BASE = ("fp32-torch", "fp32-ort", "int8-ort")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    rows = run(
        repeats=2,
        warmup=1,
        work_dir=folder,
        cases={"tiny": [40, 60, 50]},
        config=SMALL,
        profile_runs=1,
    )
    return {row["variant"]: row for row in rows}, folder


def test_rows_for_every_base_variant_with_positive_times(bench):
    rows, _ = bench
    assert set(BASE) <= set(rows)
    for name in BASE:
        row = rows[name]
        assert row["case"] == "tiny" and row["num_nodes"] == 150 and row["num_edges"] == 294
        assert 0 < row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["repeats"] == 2 and row["rollout_steps"] == DEFAULT_ROLLOUT_STEPS
        assert row["rollout_s"] == pytest.approx(row["median_ms"] * DEFAULT_ROLLOUT_STEPS / 1e3)
    assert rows["int8-ort"]["precision"] == "w8a8" and rows["int8-ort"]["runtime"] == "onnxruntime"


def test_ratios_are_consistent_with_the_times(bench):
    rows, _ = bench
    torch_ms, ort_ms = rows["fp32-torch"]["median_ms"], rows["fp32-ort"]["median_ms"]
    for row in rows.values():
        assert row["speedup_vs_fp32_torch"] == pytest.approx(torch_ms / row["median_ms"])
        assert row["speedup_vs_fp32_ort"] == pytest.approx(ort_ms / row["median_ms"])
        if row["lever"] is not None:
            base = rows[row["base"]]["median_ms"]
            assert row["speedup_vs_base"] == pytest.approx(base / row["median_ms"])
            assert row["helps"] == (row["agrees"] and row["median_ms"] < 0.95 * base)
    assert rows["fp32-torch"]["speedup_vs_fp32_torch"] == pytest.approx(1.0)
    assert rows["fp32-ort"]["speedup_vs_fp32_ort"] == pytest.approx(1.0)


def test_operator_split_sums_to_100_percent(bench):
    rows, _ = bench
    for name in ("fp32-ort", "int8-ort", "fp32-ort-textbook"):
        split = rows[name]["op_split"]
        assert 1 <= len(split) <= 9  # top 8 + other
        assert sum(entry["pct"] for entry in split) == pytest.approx(100.0, abs=0.01)
        assert all(entry["pct"] >= 0 and entry["ms"] >= 0 for entry in split)
    # INT8 really runs integer kernels; FP32 runs none
    assert {entry["op"] for entry in rows["int8-ort"]["op_split"]} & INTEGER_OPS
    assert not {entry["op"] for entry in rows["fp32-ort"]["op_split"]} & INTEGER_OPS
    assert rows["fp32-torch"]["op_split"] is None


def test_int8_ort_agrees_with_the_fake_quant_model(bench):
    """INT8 ORT vs the fake-quant torch model it was exported from.

    Same integer arithmetic, same qparams and weight integers: outputs may differ only where
    float rounding flips an activation code at a rounding tie. Required: the median output
    agrees to float rounding (<= 1e-3 of one output quantization step; a wrong scale, zero
    point or rounding mode would move every output), >= 99 % of outputs lie within one step,
    and the runtime's error vs FP32 is the simulation's within 5 % (it reproduces the
    simulated quantization error, the number the study reports).
    """
    rows, _ = bench
    row = rows["int8-ort"]
    assert row["reference"] == "fake-quant torch (cpu-x86)"
    assert row["median_error_steps"] <= 1e-3
    assert row["frac_within_step"] >= 0.99
    assert row["agrees"]
    assert row["error_vs_fp32_rel"] == pytest.approx(row["reference_error_vs_fp32_rel"], rel=0.05)
    assert row["reference_error_vs_fp32_rel"] > 0  # quantization did change the outputs
    for name in ("fp32-ort", "fp32-ort-textbook"):
        assert rows[name]["agrees"] and rows[name]["max_abs_error"] <= rows[name]["error_bound"]


def test_levers_are_measured_on_both_precisions_and_stay_correct(bench):
    rows, _ = bench
    levers = [row for row in rows.values() if row["lever"] is not None]
    names = {row["lever"] for row in levers}
    assert {"gather aggregation", "2 threads + gather", "IO binding", "opt level basic"} <= names
    for lever in names:
        assert {f"fp32-ort [{lever}]", f"int8-ort [{lever}]"} <= set(rows)
    # the gather rewrite is exact with any thread count (ScatterND add races with > 1 thread)
    for precision in ("fp32", "int8"):
        assert rows[f"{precision}-ort [2 threads + gather]"]["agrees"]
        assert rows[f"{precision}-ort [gather aggregation]"]["agrees"]
    assert "speedup_vs_same_lever_fp32" in rows["int8-ort [IO binding]"]


def test_table_names_the_cpu_and_every_variant(bench):
    rows, _ = bench
    text = format_table(list(rows.values()))
    first = next(iter(rows.values()))
    assert f"CPU: {first['cpu']}" in text and "VNNI" in text
    for name in BASE:
        assert f"\n{name} " in text
    assert "ops int8-ort:" in text and "ops fp32-ort:" in text
    quiet = [row for row in rows.values() if row["lever"] is not None and not row["helps"]]
    assert ("levers that did not help" in text) == bool(quiet)
    for row in rows.values():  # every lever row is in the table or in the footnote
        assert row["variant"] in text


def test_operator_split_of_an_export(bench):
    _, folder = bench
    path = next(folder.glob("fp32-trick-*.onnx"))
    split = operator_split(path, random_tree_graph(80, 1, SMALL.node_features, 9), runs=1, top=3)
    assert len(split) == 4 and split[-1]["op"] == "other"
    assert sum(entry["pct"] for entry in split) == pytest.approx(100.0, abs=0.01)


def test_prepared_and_checkpoint_come_together(tmp_path):
    with pytest.raises(SciquantError, match="together"):
        run(prepared=tmp_path)
    with pytest.raises(SciquantError, match="repeats"):
        run(repeats=0)


def test_openvino_variants_agree_and_compare_with_their_own_fp32(bench):
    from sciquant.runtime.openvino import available, bf16_native

    rows, _ = bench
    if not available()[0]:
        pytest.skip(available()[1])
    expected = {"ov-fp32", "ov-int8"} | ({"ov-bf16"} if bf16_native() else set())
    assert expected <= set(rows)
    assert ("ov-bf16" in rows) == bf16_native()
    ov_ms = rows["ov-fp32"]["median_ms"]
    # int8 weights OpenVINO computes exactly on this CPU: 7-bit ones where it has no VNNI
    from sciquant.runtime.onnxruntime import cpu_has_vnni

    target = "openvino-cpu" if cpu_has_vnni() else "openvino-avx2"
    assert rows["ov-int8"]["note"] == f"quantized for {target}"
    for name in expected:
        row = rows[name]
        assert row["runtime"] == "openvino" and row["agrees"], row
        assert row["speedup_vs_own_fp32"] == pytest.approx(ov_ms / row["median_ms"])
    for name in BASE:  # ORT and torch rows compare with their own runtime's FP32
        own = "fp32-torch" if name == "fp32-torch" else "fp32-ort"
        assert rows[name]["speedup_vs_own_fp32"] == pytest.approx(
            rows[own]["median_ms"] / rows[name]["median_ms"]
        )
    assert rows["int8-ort"]["int8_class"] in ("amx", "vnni", "avx2", "other")


def test_cli_writes_the_rows_as_json(tmp_path, monkeypatch):
    import json

    from sciquant import cli
    from sciquant.benchmarks import rollout

    def tiny(**kwargs):
        return run(repeats=1, warmup=0, work_dir=kwargs["work_dir"], cases={"t": [30]},
                   config=SMALL, extras=False, profile_runs=0)  # fmt: skip

    monkeypatch.setattr(rollout, "run", tiny)
    out = tmp_path / "rows.json"
    cli.main(["bench", "rollout", "--work-dir", str(tmp_path / "w"), "--json", str(out)])
    rows = json.loads(out.read_text())
    variants = {row["variant"] for row in rows}
    assert set(BASE) <= variants
    for row in rows:
        assert {"num_nodes", "median_ms", "iqr_ms", "speedup_vs_fp32_ort", "max_abs_error",
                "error_bound", "agrees", "cpu", "cpu_features"} <= set(row)  # fmt: skip


def test_non_fp32_base_variants_are_also_paired_with_their_own_fp32(bench):
    rows, _ = bench
    assert "paired_vs_own_fp32" not in rows["fp32-ort"]  # an FP32 is its own baseline
    assert "paired_vs_own_fp32" not in rows["fp32-torch"]
    for name in ("int8-ort", "ov-int8"):
        if name in rows:
            low, high = rows[name]["paired_vs_own_fp32_ci"]
            assert rows[name]["paired_vs_own_fp32"] > 0 and low <= high
    text = format_table(list(rows.values()))
    assert "paired" in text.splitlines()[3] or any("paired" in line for line in text.splitlines())


def test_every_base_variant_is_paired_with_fp32_ort_in_blocks_of_steps(bench):
    rows, _ = bench
    assert "paired_vs_fp32_ort" not in rows["fp32-ort"]  # the baseline itself
    for name, row in rows.items():
        if row["lever"] is not None or name == "fp32-ort":
            assert "paired_vs_fp32_ort" not in row
            continue
        low, high = row["paired_vs_fp32_ort_ci"]
        assert row["paired_vs_fp32_ort"] > 0 and low <= row["paired_vs_fp32_ort"] <= high
        # the block fills about 20 ms of FP32 ORT steps; its step time is measured, so the
        # block size follows it rather than a number a loaded machine may not reach
        assert row["paired_block_steps"] == rollout_block(rows["fp32-ort"]["median_ms"])
        assert 1 <= row["paired_block_steps"] <= 8
    assert "deployment goals" in format_table(list(rows.values()))


def test_rollout_block_fills_about_20_ms_with_consecutive_steps():
    assert rollout_block(0.5) == 8  # capped
    assert rollout_block(3.5) == 6  # ceil(20 / 3.5)
    assert rollout_block(20.0) == 1
    assert rollout_block(213.0) == 1


def _row(case, nodes, variant, precision, paired, agrees=True):
    return {
        "case": case, "num_nodes": nodes, "variant": variant, "precision": precision,
        "agrees": agrees, "paired_vs_fp32_ort": paired,
        "paired_vs_fp32_ort_ci": (paired * 0.9, paired * 1.1),
    }  # fmt: skip


def test_verdicts_pick_the_fastest_agreeing_variant_and_the_best_int8_on_the_largest_case():
    rows = [
        _row("small", 502, "ov-bf16", "bf16", 1.9),
        _row("small", 502, "trt-int8", "w8a8", 5.0, agrees=False),  # wrong outputs: never picked
        _row("small", 502, "int8-ort", "w8a8", 1.1),
        _row("big", 20000, "ov-bf16", "bf16", 2.6),
        _row("big", 20000, "ov-int8", "w8a8", 1.5),
        _row("big", 20000, "int8-ort", "w8a8", 0.9),
        {
            "case": "big",
            "num_nodes": 20000,
            "variant": "fp32-ort",
            "precision": "fp32",
            "agrees": True,
        },  # fmt: skip
    ]
    found = {(v["case"], v["kind"]): v for v in verdicts(rows)}
    assert set(found) == {("small", "fastest"), ("big", "fastest"), ("big", "int8")}
    assert found["small", "fastest"]["variant"] == "ov-bf16"
    assert not found["small", "fastest"]["met"]  # 1.9 < 2
    assert found["big", "fastest"]["variant"] == "ov-bf16" and found["big", "fastest"]["met"]
    assert found["big", "int8"]["variant"] == "ov-int8" and found["big", "int8"]["met"]
    assert found["big", "int8"]["goal"] == GOAL_INT8_LARGEST
