"""Words every layer of sciquant shares, defined once.

`COORDINATES`: the six coordinates of a run, in the order of its folder
(``results/<dataset>/<model>/seed<seed>/<target>/<method>/<precision>``), of `metrics.json`'s
``coordinates`` and of the result cube's dimensions. `sciquant.study.Run` has them as fields
(a test checks that they agree). `MIXED`: the precision label of the sensitivity analysis'
mixed-precision run. `SCHEMA`: the config schema, where every setting's default lives, and
`section_with_defaults`: one config section with those defaults filled (every stage that reads a
setting takes it from there, never from a literal of its own). `CPU_NODE` and `node_device`: what
a node type asks for.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from sciquant.errors import SciquantError

__all__ = [
    "COORDINATES",
    "CPU_NODE",
    "MIXED",
    "SCHEMA",
    "node_device",
    "schema_document",
    "section_with_defaults",
    "with_defaults",
]

COORDINATES = ("dataset", "model", "seed", "target", "method", "precision")
#: Precision label of the run that evaluates the sensitivity analysis' mixed assignment.
MIXED = "mixed"
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
#: The node type with no GPU; every other node type (v100, rtx3090) is a GPU node.
CPU_NODE = "cpu"


def node_device(node: str) -> str:
    """The device a stage on node type `node` asks for: `cuda` on a GPU node type (any node
    type but `cpu`), `cpu` on `cpu` (a CPU node never asks for a GPU)."""
    return "cpu" if node == CPU_NODE else "cuda"


@functools.lru_cache(maxsize=1)
def schema_document() -> dict[str, Any]:
    """The parsed config schema (read once per process; callers must not change it)."""
    import yaml

    from sciquant.plugins import schema_fragments

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it
    document = yaml.load(SCHEMA.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
    plugins = schema_fragments()
    document["$defs"].update(plugins["definitions"])
    # An installed workload plug-in's datasets and models: its name in the enum, its keys
    # checked like a built-in's (`sciquant.plugins.schema_fragments`).
    for kind, key, fragments in (
        ("dataset", "workload", plugins["workloads"]),
        ("model", "architecture", plugins["architectures"]),
    ):
        definition = document["$defs"][kind]
        for name, fragment in fragments.items():
            document["$defs"][f"{name}_{kind}"] = fragment
            definition["properties"][key]["enum"].append(name)
            definition["allOf"].append(
                {
                    "if": {"properties": {key: {"const": name}}},
                    "then": {"$ref": f"#/$defs/{name}_{kind}"},
                }
            )
    return document


def section_with_defaults(section: dict[str, Any], definition: str, key: str) -> dict[str, Any]:
    """A copy of one config section (`key`, e.g. ``quantize``) with the schema's defaults filled
    from ``$defs/<definition>``, validated: what a command given only that section (its
    ``--settings``) reads, so the defaults live in the schema alone. SciquantError naming the
    key for a section the schema refuses."""
    import jsonschema

    root = {"$defs": schema_document()["$defs"], "$ref": f"#/$defs/{definition}"}
    filled = json.loads(json.dumps(section))
    validator = with_defaults(jsonschema.Draft202012Validator)(root)
    # $ref is followed lazily, so the defaults below it are filled while it validates
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.path))
    if errors:
        lines = [
            f"  config key {'.'.join([key, *(str(p) for p in e.absolute_path)])}: {e.message}"
            for e in errors[:10]
        ]
        raise SciquantError("invalid settings:\n" + "\n".join(lines))
    return filled


def with_defaults(validator_class: Any) -> Any:
    """`validator_class` extended to fill every property's schema default into the instance it
    validates (where the instance leaves the property out)."""
    import jsonschema

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, json.loads(json.dumps(subschema["default"])))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def check_stage_settings(settings: dict[str, Any], command: str) -> None:
    """A `quantize` command's `--settings` hold `quantize` and `model` only (a
    key of the quantize section given at the top would be left out without a word)."""
    unknown = sorted(set(settings) - {"quantize", "model"})
    if unknown:
        raise SciquantError(
            f"{command} --settings: unknown {', '.join(unknown)}; the settings are "
            '{"quantize": <the config\'s quantize section>, "model": <the model\'s settings>}'
        )


def quantize_section(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize`` entry of a quantize command's `--settings` with the schema's defaults
    filled (a stage's values come from there, never from a literal); SciquantError naming the
    key for one the schema refuses, or for settings beside `quantize` and `model`."""
    check_stage_settings(settings, "quantize")
    return section_with_defaults(settings.get("quantize", {}), "quantize", "quantize")
