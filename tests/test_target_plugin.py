"""Adding a target is one row: an installed package's `sciquant.targets` entry point adds a row
that the config checks, the workflow's dry run and the result cube accept, with no other file
touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sciquant.errors import SciquantError
from sciquant.study import load_config

ROOT = Path(__file__).resolve().parents[1]
NAME = "npu-pow2-mini"


def _plugin(folder: Path) -> dict[str, str]:
    """A package on disk with a dist-info that registers one target row; the env to see it."""
    (folder / "mini_npu.py").write_text(
        textwrap.dedent(
            f'''
            from sciquant.quant.targets import Scheme, Target

            ROW = Target(
                name="{NAME}",
                backend="simulated",
                node="cpu",
                frameworks=frozenset({{"torch", "keras"}}),
                weight_scheme=Scheme(symmetric=True, scale_kind="pow2"),
                activation_scheme=Scheme(symmetric=True, scale_kind="pow2"),
                native_precisions=frozenset(),
                description="a small power-of-two NPU (test plug-in)",
            )
            '''
        )
    )
    info = folder / "mini_npu-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mini-npu\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sciquant.targets]\nmini = mini_npu:ROW\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(folder), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


def _config(folder: Path) -> Path:
    config = yaml.safe_load((ROOT / "workflow/config/ci.yaml").read_text())
    config["quantize"]["sweeps"] = [
        {"models": ["meshgraphnet"], "targets": [NAME], "methods": ["ptq-minmax"],
         "precisions": ["w8a8"]},
    ]  # fmt: skip
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_unknown_target_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(SciquantError) as error:
        load_config(_config(tmp_path))
    message = str(error.value)
    assert message.startswith("config key quantize.sweeps.0.targets: unknown target")
    assert NAME in message and "npu-pow2" in message


def test_a_plugin_row_is_accepted_by_the_config_the_dry_run_and_the_cube(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    env = _plugin(plugin)
    config = _config(tmp_path)
    check = textwrap.dedent(
        f'''
        import json
        from sciquant.quant.targets import TARGETS
        from sciquant.report.cube import TARGET_ORDER
        from sciquant.study import Study, load_config
        study = Study(load_config("{config}"))
        runs = [r.folder for r in study.runs() if r.target == "{NAME}"]
        print(json.dumps({{"order": list(TARGET_ORDER), "runs": runs,
                           "last": list(TARGETS)[-1]}}))
        '''
    )
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["last"] == NAME and seen["order"][-1] == NAME
    assert seen["runs"] == [f"results/bloodflow/meshgraphnet/seed0/{NAME}/ptq-minmax/w8a8"]

    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile",
         str(config), "--directory", str(tmp_path / "work"), "--snakefile",
         str(ROOT / "Snakefile")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "evaluate_run" in dry.stdout and "quantize" in dry.stdout

    # without the plug-in the same config is refused, naming the key
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    bare["PYTHONPATH"] = str(ROOT / "src")
    refused = subprocess.run(
        [sys.executable, "-c", check], env=bare, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "config key quantize.sweeps.0.targets: unknown target" in refused.stderr


def test_a_broken_plugin_is_named(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    env = _plugin(plugin)
    (plugin / "mini_npu.py").write_text("ROW = 42\n")
    result = subprocess.run(
        [sys.executable, "-c", "import sciquant.quant.targets"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "target plug-in 'mini' (mini_npu:ROW) gives int" in result.stderr
