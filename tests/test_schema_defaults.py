"""Defaults live in the config schema only: a stage given no settings runs with the schema's.

Each `sciquant` command that turns its `--settings` into a stage's arguments is run with
``--settings {}`` and its stage function replaced by a recorder; what the stage receives must be
the schema's defaults, read here from `workflow/schemas/config.schema.yaml` itself. A source scan
then refuses a ``.get("<schema key>", <literal>)`` fallback in the modules that read settings,
so a default cannot come back as a literal that drifts from the schema.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from sciquant import cli
from sciquant.errors import SciquantError
from sciquant.vocabulary import SCHEMA, section_with_defaults

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = yaml.safe_load(SCHEMA.read_text())

#: Complete run coordinates for commands whose run is beside the point.
RUN_COORDINATES = json.dumps(
    {"dataset": "d", "model": "m", "seed": 0, "target": "reference", "method": "none",
     "precision": "fp32"}
)  # fmt: skip


def _resolved(node: dict[str, Any]) -> dict[str, Any]:
    """`node`, or the `$defs` entry its `$ref` names."""
    while "$ref" in node:
        node = DOCUMENT["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def default(definition: str, *path: str) -> Any:
    """The schema's default of the property at `path` below ``$defs/<definition>``."""
    node: dict[str, Any] = DOCUMENT["$defs"][definition]
    for key in path:
        node = _resolved(node)["properties"][key]
    return node["default"]


def defaults(definition: str, *path: str) -> dict[str, Any]:
    """Every property default of the object at `path` below ``$defs/<definition>``."""
    node: dict[str, Any] = DOCUMENT["$defs"][definition]
    for key in path:
        node = _resolved(node)["properties"][key]
    return {
        name: prop["default"]
        for name, prop in _resolved(node)["properties"].items()
        if "default" in prop
    }


class Recorder:
    """Stands in for a stage module: every function called on it is recorded, returns None."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: str, *functions: str) -> None:
        self.calls: dict[str, dict[str, Any]] = {}
        fake = types.ModuleType(module)
        for name in functions:
            setattr(fake, name, self._recording(name))
        # `from package import module` reads the package's attribute first, then sys.modules
        package, _, attribute = module.rpartition(".")
        __import__(package)
        monkeypatch.setitem(sys.modules, module, fake)
        monkeypatch.setattr(sys.modules[package], attribute, fake, raising=False)

    def _recording(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls[name] = {"args": args, **kwargs}

        return record


def _sciquant(*words: str) -> None:
    assert cli.main(list(words)) == 0


def test_synthesize_md_takes_the_schemas_simulator_defaults(monkeypatch, tmp_path):
    simulator = Recorder(monkeypatch, "sciquant.workloads.md.sim", "synthesize")
    manifest = Recorder(monkeypatch, "sciquant.data.manifest", "write_manifest")
    _sciquant("synthesize", "md", "--settings", "{}", "--out", str(tmp_path))
    call = simulator.calls["synthesize"]
    expected = defaults("md_simulation")
    assert set(expected) == {"n_beads", "frames", "seed"}
    assert {key: call[key] for key in expected} == expected
    # the manifest records what was simulated
    assert manifest.calls["write_manifest"]["source"] == {"embedded": expected}


def test_synthesize_bloodflow_takes_the_schemas_simulator_defaults(monkeypatch, tmp_path):
    simulator = Recorder(
        monkeypatch, "sciquant.workloads.bloodflow.sim", "synthesize", "params_from_mapping"
    )
    Recorder(monkeypatch, "sciquant.data.manifest", "write_manifest")
    _sciquant("synthesize", "bloodflow", "--settings", "{}", "--out", str(tmp_path))
    call = simulator.calls["synthesize"]
    assert call["n_simulations"] == default("bloodflow_simulation", "n_simulations")
    assert call["seed"] == default("bloodflow_simulation", "seed")
    assert simulator.calls["params_from_mapping"]["args"] == (
        default("bloodflow_simulation", "parameters"),
    )


def test_train_icnnmd_takes_the_schemas_training_defaults(monkeypatch, tmp_path):
    stage = Recorder(monkeypatch, "sciquant.workloads.md.train", "run")
    settings = json.dumps({"architecture": "icnnmd"})
    _sciquant("train", "--prepared", str(tmp_path), "--settings", settings, "--out", str(tmp_path))
    call = stage.calls["run"]
    train = defaults("icnnmd_model", "train")
    for key in ("epochs", "batch_size", "learning_rate", "folds"):
        assert call[key] == train[key], key


def test_evaluate_md_takes_the_schemas_evaluation_defaults(monkeypatch, tmp_path):
    stage = Recorder(monkeypatch, "sciquant.workloads.md.evaluate", "run")
    _sciquant("evaluate", "--checkpoint", str(tmp_path / "model.keras"), "--prepared",
              str(tmp_path), "--settings", "{}", "--coordinates", RUN_COORDINATES,
              "--out", str(tmp_path))  # fmt: skip
    call = stage.calls["run"]
    assert call["repeats"] == default("evaluate", "latency_repeats")
    assert call["debug_inputs"] == default("evaluate", "debug_inputs")


def test_quantize_md_takes_the_schemas_quantize_and_training_defaults(monkeypatch, tmp_path):
    stage = Recorder(monkeypatch, "sciquant.workloads.md.quantize", "run")
    _sciquant("quantize", "--checkpoint", str(tmp_path / "model.keras"), "--prepared",
              str(tmp_path), "--target", "reference", "--method", "qat-lsq", "--precision",
              "w8a8", "--settings", "{}", "--out", str(tmp_path))  # fmt: skip
    call = stage.calls["run"]
    assert call["calibration_samples"] == default("quantize", "calibration_frames")
    assert call["qat_epochs"] == default("quantize", "qat", "epochs")
    assert call["qat_learning_rate"] == default("quantize", "qat", "learning_rate")
    assert call["batch_size"] == default("icnnmd_model", "train", "batch_size")
    assert call["adaround"] == defaults("quantize", "adaround")


def test_prepare_md_takes_the_schemas_preparation_defaults(monkeypatch, tmp_path):
    stage = Recorder(
        monkeypatch, "sciquant.workloads.md.data", "prepare_from_info", "prepare_from_manifest"
    )
    _sciquant("prepare", "md", "--raw", str(tmp_path), "--settings", "{}", "--out", str(tmp_path))
    call = stage.calls["prepare_from_manifest"]
    assert call["selection"] == default("md_prepare", "selection")
    assert call["frames_per_trajectory"] == default("md_prepare", "frames_per_trajectory")
    assert call["gap"] == default("md_prepare", "gap")
    split = defaults("md_prepare", "split")
    assert call["split"] == (split["train"], split["valid"], split["test"])


def test_the_md_simulator_definition_is_the_md_sources_embedded_one():
    """The embedded md simulator is its own `$defs` entry (as the blood-flow one), and a config's
    md dataset gets exactly its defaults."""
    source = DOCUMENT["$defs"]["md_source"]["properties"]["embedded"]
    assert source == {"$ref": "#/$defs/md_simulation"}
    dataset = section_with_defaults({"workload": "md"}, "dataset", "datasets.gpcr")
    assert dataset["source"]["embedded"] == section_with_defaults({}, "md_simulation", "x")


def test_qat_settings_take_the_schemas_qat_defaults():
    from sciquant.vocabulary import quantize_section
    from sciquant.workloads.bloodflow.quantize import qat_settings

    quantize = quantize_section({})
    assert quantize == section_with_defaults({}, "quantize", "quantize")
    fine_tune = qat_settings({}, quantize["qat"])
    qat = defaults("quantize", "qat")
    assert fine_tune.epochs == qat["epochs"]
    assert fine_tune.steps_per_epoch == qat["steps_per_epoch"]
    assert fine_tune.learning_rate == qat["learning_rate"]
    assert fine_tune.threshold_learning_rate == qat["threshold_learning_rate"]


def test_qat_init_choices_and_default_are_the_schemas():
    from sciquant.quant.observers import DEFAULT_QAT_INIT, QAT_INITS

    qat = _resolved(DOCUMENT["$defs"]["quantize"])["properties"]["qat"]
    init = _resolved(qat)["properties"]["init"]
    assert init["enum"] == list(QAT_INITS) and init["default"] == DEFAULT_QAT_INIT


def test_meshgraphnet_training_takes_the_schemas_model_and_training_defaults():
    from sciquant.workloads.bloodflow.train import TrainSettings, architecture_from_settings

    assert asdict(TrainSettings.of({})) == {
        **defaults("train"), "threshold_learning_rate": None
    }  # fmt: skip
    architecture = architecture_from_settings({}, node_features=7)
    for key in ("hidden", "processor_size", "mlp_hidden_layers"):
        assert getattr(architecture, key) == default("meshgraphnet_model", key)


def test_the_config_checks_read_the_schemas_defaults(monkeypatch, tmp_path):
    """`check_semantics` fills a copy of the config from the schema: with the schema's default
    number of embedded simulations lowered to 3, a split that leaves no test simulation of 3 is
    refused, though the config itself never names `n_simulations`."""
    from sciquant import study, vocabulary

    config = yaml.safe_load((ROOT / "workflow" / "config" / "ci.yaml").read_text())
    dataset = config["datasets"]["bloodflow"]
    dataset["source"]["embedded"].pop("n_simulations", None)
    dataset.setdefault("prepare", {})["split"] = {"train": 0.8, "valid": 0.0, "test": 0.2}
    untouched = json.loads(json.dumps(config))
    study.check_semantics(config)  # 24 simulations by default: 4 test simulations
    assert config == untouched  # the defaults went into a copy

    document = json.loads(json.dumps(vocabulary.schema_document()))
    document["$defs"]["bloodflow_simulation"]["properties"]["n_simulations"]["default"] = 3
    monkeypatch.setattr(study, "schema_document", lambda: document)
    with pytest.raises(SciquantError, match=r"embedded\.n_simulations: too few simulations"):
        study.check_semantics(config)


#: Modules whose settings come from the schema alone (their stages fill their sections with
#: `section_with_defaults`).
SETTINGS_READERS = (
    "src/sciquant/cli.py",
    "src/sciquant/workloads/bloodflow/quantize.py",
    "src/sciquant/quant/degree.py",
    "src/sciquant/workloads/bloodflow/sensitivity.py",
    "src/sciquant/workloads/bloodflow/evaluate.py",
    "src/sciquant/study.py",
    "src/sciquant/workloads/bloodflow/train.py",
)
#: (file, what `.get` is called on, key): fallbacks that are not config defaults.
NOT_CONFIG = {
    # checkpoints written before `formulation` existed were residual networks
    ("src/sciquant/workloads/bloodflow/quantize.py", "fp32_state", "formulation"),
    # a run's coordinates, not the evaluate settings
    ("src/sciquant/workloads/bloodflow/evaluate.py", "coordinates", "precision"),
}


def _keys_with_defaults(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if isinstance(prop, dict) and "default" in prop:
                found.add(name)
        for value in node.values():
            _keys_with_defaults(value, found)
    elif isinstance(node, list):
        for value in node:
            _keys_with_defaults(value, found)
    return found


def literal_fallbacks(path: str, source: str) -> list[str]:
    """``.get("<key>", <fallback>)`` calls in `source` whose key has a schema default, but an
    empty-dict fallback (an absent section, filled from the schema after) and `NOT_CONFIG`."""
    keys = _keys_with_defaults(DOCUMENT, set())
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in keys
        ):
            continue
        fallback = node.args[1]
        if isinstance(fallback, ast.Dict) and not fallback.keys:
            continue
        if (path, ast.unparse(node.func.value), node.args[0].value) in NOT_CONFIG:
            continue
        found.append((node.lineno, f"{path}:{node.lineno}: {ast.unparse(node)}"))
    return [line for _, line in sorted(found)]


def test_the_scan_finds_a_literal_fallback():
    source = 'n = settings.get("n_simulations", 24)\nq = settings.get("quantize", {})\n'
    assert literal_fallbacks("x.py", source) == ["x.py:1: settings.get('n_simulations', 24)"]
    assert literal_fallbacks("x.py", 'r = s.get("repeats", REPEATS)\n')  # a constant, too


@pytest.mark.parametrize("path", SETTINGS_READERS)
def test_no_setting_falls_back_to_a_literal_of_its_own(path):
    found = literal_fallbacks(path, (ROOT / path).read_text())
    assert not found, (
        "defaults live in the schema (workflow/schemas/config.schema.yaml): fill the section "
        "with sciquant.vocabulary.section_with_defaults and index it instead of\n"
        + "\n".join(found)
    )
