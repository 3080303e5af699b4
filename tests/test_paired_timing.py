"""Paired timing (sciquant.runtime.paired): interleaving, the ratio of paired medians and its
CI, contention and the host's CPU features."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from sciquant.runtime.paired import (
    cpu_features,
    host_facts,
    int8_class,
    paired_timing,
    ratio_of_medians,
)


class Machine:
    """A made-up host whose load grows with every call (a second job starting halfway through
    a measurement): a call's time = its own cost × the load at that moment."""

    def __init__(self, growth: float) -> None:
        self.calls = 0
        self.growth = growth

    def variant(self, cost: float):  # noqa: ANN201
        def call() -> float:
            self.calls += 1
            return cost * (1.0 + self.growth * self.calls)

        return call


def test_a_deliberately_slowed_variant_is_detected_as_slower() -> None:
    machine = Machine(growth=0.0)
    result = paired_timing(machine.variant(2e-3), machine.variant(1e-3), repeats=9)
    assert result["paired_speedup"] == pytest.approx(0.5, rel=1e-12)
    assert result["paired_speedup_ci_high"] < 1.0
    assert result["run_time_s_median"] == pytest.approx(2 * result["baseline_time_s_median"])


def test_the_pairs_are_interleaved_so_a_drifting_load_cancels() -> None:
    # The run truly costs half the baseline; the load triples during the measurement.
    machine = Machine(growth=0.1)
    result = paired_timing(machine.variant(1e-3), machine.variant(2e-3), repeats=20, warmup=0)
    assert result["paired_speedup"] == pytest.approx(2.0, rel=0.05)
    assert result["paired_speedup_ci_low"] <= 2.0 <= result["paired_speedup_ci_high"] * 1.05
    # What two separate measurements, one after the other, would have claimed instead:
    sequential = Machine(growth=0.1)
    run = [sequential.variant(1e-3)() for _ in range(20)]
    baseline = [sequential.variant(2e-3)() for _ in range(20)]
    assert np.median(baseline) / np.median(run) > 3.0  # off by more than 50 %


def test_calls_alternate_abba() -> None:
    order: list[str] = []
    paired_timing(lambda: order.append("a"), lambda: order.append("b"), repeats=2, warmup=1)
    assert "".join(order) == "abbaab"


def test_ratio_of_medians_and_its_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    baseline = 3.0 + 0.05 * rng.standard_normal(40)
    run = 1.5 + 0.05 * rng.standard_normal(40)
    ratio, low, high = ratio_of_medians(baseline, run)
    assert ratio == pytest.approx(np.median(baseline) / np.median(run), rel=1e-12)
    assert low < ratio < high
    assert low > 1.9 and high < 2.1
    assert np.isnan(ratio_of_medians(np.array([2.0]), np.array([1.0]))[1])
    with pytest.raises(ValueError, match="same"):
        ratio_of_medians(np.ones(3), np.ones(4))


def test_wall_time_and_contention() -> None:
    def busy() -> None:  # 10 ms of this process's CPU time, however long the wall clock takes
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass

    computed = paired_timing(busy, busy, repeats=3)
    assert computed["run_time_s_median"] >= 0.01
    # A call that waits without the CPU looks like one whose core was taken by another job.
    waited = paired_timing(lambda: time.sleep(0.01), lambda: time.sleep(0.01), repeats=3)
    assert waited["cpu_share"] < 0.2 and waited["contended"]
    # The computing call had the CPU for most of its wall time on an idle machine; on one whose
    # cores other jobs share (the test suite beside a study), for less (0.27 measured with five
    # jobs on two cores), but for far more of it than the waiting call.
    assert computed["cpu_share"] > max(0.15, 4 * waited["cpu_share"])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", "amx"),
        ("fpu avx2 avx512f avx512_vnni", "vnni"),
        ("fpu avx2 avx_vnni", "vnni"),
        ("fpu sse4_2 avx2 fma", "avx2"),
        ("fpu sse4_2", "other"),
    ],
)
def test_host_cpu_features(tmp_path: Path, flags: str, expected: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    features = cpu_features(cpuinfo)
    assert int8_class(features) == expected
    facts = host_facts(cpuinfo)
    assert facts["cpu"] == "Test CPU" and facts["int8_class"] == expected
    assert facts["bf16_native"] == ("bf16" in flags)
    assert facts["usable_cores"] >= 1
