"""`bench mgn` with a torchvision whose C++ ops did not load (e.g. PyPI's CUDA build beside CPU
torch): PhysicsNeMo is still imported and timed, and the table gives the pip command that fixes
torchvision. Stand-in packages replace torchvision, PhysicsNeMo, torch_geometric and
torch_scatter; the stand-in torchvision fails at import exactly as the real one does, through
``torch.library.register_fake`` on an op that its missing C++ library would have defined."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sciquant.benchmarks import mgn

FAKED = ("torchvision", "physicsnemo", "torch_scatter", "torch_geometric")

# torchvision's _meta_registrations does this for nms and qnms whether or not its ops loaded.
MISSING_OP_INIT = """
import torch.library

@torch.library.register_fake("torchvision::sciquant_test_missing_op")
def _meta(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)
"""

FILES = {
    "torchvision-0.28.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchvision\n"
    "Version: 0.28.0\n",
    "physicsnemo/__init__.py": '__version__ = "2.2.2"\n',
    # as PhysicsNeMo's models import torchvision (through timm's layers)
    "physicsnemo/models/__init__.py": "import torchvision  # noqa: F401\n",
    "physicsnemo/models/meshgraphnet/__init__.py": "class MeshGraphNet:\n    pass\n",
    "torch_scatter/__init__.py": "",
    "torch_geometric/__init__.py": "",
    "torch_geometric/data/__init__.py": """
        class Data:
            def __init__(self, edge_index, num_nodes):
                self.edge_index, self.num_nodes = edge_index, num_nodes
    """,
}


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writes the stand-in packages (torchvision's ``__init__`` given by the test) first on
    ``sys.path``; removes them from ``sys.modules`` afterwards."""
    for name in [m for m in sys.modules if m.split(".")[0] in FAKED]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setenv("PHYSICSNEMO_FORCE_TE", "False")  # set by the import; restored after

    def write(torchvision_init: str) -> None:
        for rel, text in {**FILES, "torchvision/__init__.py": torchvision_init}.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(tmp_path))

    yield write
    for name in [m for m in sys.modules if m.split(".")[0] in FAKED]:
        del sys.modules[name]


def _stand_in_torchvision_fails_as_the_real_one():
    with pytest.raises(RuntimeError, match="operator torchvision::sciquant_test_missing_op does"):
        torch.library.register_fake("torchvision::sciquant_test_missing_op")(lambda *a: None)


def test_physicsnemo_imports_although_torchvision_ops_did_not_load(stand_ins):
    _stand_in_torchvision_fails_as_the_real_one()
    stand_ins(MISSING_OP_INIT)
    register_fake = torch.library.register_fake
    pnm = mgn._import_physicsnemo()
    assert torch.library.register_fake is register_fake  # the workaround is undone
    assert pnm.model_cls.__module__ == "physicsnemo.models.meshgraphnet"
    assert pnm.version == "2.2.2"
    assert pnm.torchvision_note.splitlines() == [
        f"torchvision 0.28.0 does not match torch {torch.__version__}: its C++ ops did not load"
        " (RuntimeError: operator torchvision::sciquant_test_missing_op does not exist);"
        " PhysicsNeMo's MeshGraphNet does not use them, so torchvision was imported without"
        " them. To fix:",
        "  " + mgn._torchvision_fix(),
    ]


class _Theirs(torch.nn.Module):
    """Stands in for PhysicsNeMo's model loaded with ours' weights: ours on a PyG-like graph."""

    def __init__(self, ours: torch.nn.Module):
        super().__init__()
        self.ours = copy.deepcopy(ours)

    def forward(self, x, e, graph):
        return self.ours(x, e, graph.edge_index)


def test_bench_times_physicsnemo_and_prints_the_torchvision_fix(stand_ins, monkeypatch):
    stand_ins(MISSING_OP_INIT)
    monkeypatch.setattr(mgn._PhysicsNeMo, "build", lambda self, ours: _Theirs(ours))
    monkeypatch.setattr(
        mgn, "_check_same_computation", lambda pnm, config: (True, "same outputs (stand-in)")
    )
    rows = mgn.run(sizes=(50,), repeats=4, warmup=1, threads=1, baseline=False)
    assert all(r["physicsnemo_median_ms"] > 0 for r in rows)
    table = mgn.format_table(rows).splitlines()
    assert "PNM/ours" in table[0]
    check = table.index("  PhysicsNeMo 2.2.2 check: same outputs (stand-in).")
    assert table[check + 1].startswith("  torchvision 0.28.0 does not match torch")
    assert table[check + 2] == "    " + mgn._torchvision_fix()


def test_torchvision_that_still_fails_is_reported_with_the_fix(stand_ins):
    stand_ins(MISSING_OP_INIT + "\nraise OSError('still broken')\n")
    register_fake = torch.library.register_fake
    pnm, note = mgn._physicsnemo(mgn.MeshGraphNetConfig())
    assert pnm is None
    assert torch.library.register_fake is register_fake
    assert note.splitlines() == [
        "PhysicsNeMo not timed in this run: it cannot be imported (RuntimeError: torchvision"
        f" 0.28.0 does not match torch {torch.__version__}: its C++ ops did not load"
        " (RuntimeError: operator torchvision::sciquant_test_missing_op does not exist);"
        " without them: OSError: still broken). To fix torchvision:",
        "  " + mgn._torchvision_fix(),
    ]


def test_other_torchvision_errors_are_not_worked_around(stand_ins):
    stand_ins("raise RuntimeError('something else')\n")
    pnm, note = mgn._physicsnemo(mgn.MeshGraphNetConfig())
    assert pnm is None
    assert note == (
        "PhysicsNeMo not timed in this run: it cannot be imported (RuntimeError: something else)."
    )


@pytest.mark.parametrize(
    ("torch_version", "command"),
    [
        # torchvision 0.28.0 requires torch==2.13.0
        (
            "2.13.0+cpu",
            "pip install torchvision==0.28.0+cpu --index-url https://download.pytorch.org/whl/cpu",
        ),
        (
            "2.14.1+cu130",
            "pip install torchvision==0.29.1+cu130"
            " --index-url https://download.pytorch.org/whl/cu130",
        ),
        # PyPI's default build: the installed mismatched wheel has the same version string
        ("2.13.0", "pip install --force-reinstall --no-deps torchvision==0.28.0"),
        (
            "2.0.1+cpu",
            "pip install torchvision==0.15.2+cpu --index-url https://download.pytorch.org/whl/cpu",
        ),
    ],
)
def test_torchvision_fix_matches_the_installed_torch(torch_version, command):
    assert mgn._torchvision_fix(torch_version) == command
