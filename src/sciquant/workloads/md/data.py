"""MD ingestion: a topology and labelled trajectories → ICNNMD pixel maps with time-block splits.

The same code reads the embedded simulation (`sciquant.workloads.md.sim`) and real GPCRmd downloads:
a topology (`.pdb` or `.psf`; mdtraj also reads `.gro` and `.prmtop`) and one or more
trajectories (`.xtc`, `.dcd`, `.trr`, `.nc`), each with the label of the functional state it
samples. Steps, following ICNNMD (Li et al., J. Chem. Inf. Model. 2022, and its code):

1. Atom selection: `"all"`, `"protein"`, `"CA"` (short for `"name CA"`) or any mdtraj selection
   string; only those atoms are read.
2. Frames: the first `frames_per_trajectory` frames of each trajectory after taking every
   `stride`-th frame (ICNNMD: the first 100; 0 or `"all"` takes every frame).
3. Superposition: every frame is rotated (minimising RMSD, on the selected atoms) onto frame 0 of
   the first trajectory, all frames centred at the origin.
4. Pixel map: each selected atom's (x, y, z) in nm becomes (R, G, B) = RGB_MATRIX · (x, y, z).
   RGB_MATRIX is the fixed matrix of ICNNMD's code (the CIE XYZ → Adobe RGB (1998) D65 colour
   matrix; condition number ≈ 2.9). Each frame's values are then min-max scaled per channel over
   the frame's atoms to 0–255 and truncated to integers, exactly as ICNNMD's `MinMaxScaler` +
   `int()` (a channel whose atoms all share one value becomes 0). Atoms fill a ceil(√N)² grid
   row-major (atom k at row k // S, column k % S), the rest of the grid is 0, and the map is
   divided by 255: float32 in [0, 1], shape (S, S, 3).
5. Split, per trajectory, into contiguous time blocks: train = the first 70 % of the frames,
   validation = the next 10 %, test = the last 20 % (`split`), with `gap` frames dropped between
   consecutive blocks. Frames of one trajectory a few steps apart are nearly the same structure,
   so a random (shuffled) split, as ICNNMD's k-fold, puts near-copies of test frames into
   training and measures memory, not generalisation; blocks in time with a gap longer than the
   correlation time do not. Block sizes are round(u·f) over the u = frames − gap·(blocks − 1)
   frames left after the gaps (cumulative rounding, so they add up to u); a block with a
   fraction of 0 and its gap are left out.

Output format (`results/<dataset>/prepared/`):

- `pixelmaps.npz`: `x` float32 (N, S, S, 3) pixel maps; `y` int64 (N,) labels; `trajectory`
  int64 (N,) index into `index.json` `files`; `frame` int64 (N,) frame number in its file
  (0-based, before striding); `split` int8 (N,) 0 = train, 1 = validation, 2 = test. Frames
  dropped in gaps are not stored. Order: trajectory by trajectory, frames ascending.
- `index.json`: `format` ("sciquant-md-pixelmaps"), `version` (1), `grid` (S), `n_atoms` (selected),
  `selection`, `frames_per_trajectory`, `stride`, `gap`, `rgb_matrix`, `scaling`,
  `superposition`, `split` (fractions, gap, counts per split and label), `files` (per trajectory:
  `path` (name), `sha256`, `label`, `frames` read, `kept` after gaps), `topology` (`path`,
  `sha256`, atom/residue/chain counts) and `arrays` (what each array holds).

Both files are written under a temporary name and moved into place (`os.replace`); `index.json`
last, so its presence means the folder is complete.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
from tqdm import tqdm

from sciquant.data.download import MANIFEST_NAME, local_name, sha256_of
from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path, write_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RGB_MATRIX",
    "SPLITS",
    "load_index",
    "load_prepared",
    "load_superposed",
    "load_topology",
    "pixel_map",
    "prepare",
    "prepare_from_info",
    "read_trajectory",
    "select_atoms",
    "split_arrays",
    "split_blocks",
]

FORMAT = "sciquant-md-pixelmaps"
FORMAT_VERSION = 1
RGB_MATRIX = np.array(
    [
        [2.0413690, -0.5649464, -0.3446944],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0134474, -0.1183897, 1.0154096],
    ]
)
"""(R, G, B) = RGB_MATRIX @ (x, y, z): ICNNMD's matrix (CIE XYZ → Adobe RGB (1998), D65)."""
SPLITS = ("train", "val", "test")
TOPOLOGY_FORMATS = (".pdb", ".psf", ".gro", ".prmtop")
TRAJECTORY_FORMATS = (".xtc", ".dcd", ".trr", ".nc")
DEFAULT_GAP = 5
"""Frames dropped between split blocks; the embedded data decorrelate within ~5 frames (5 ps)."""
SCALING = (
    "per frame and per channel: min-max over the selected atoms to 0-255, truncated to integers"
    " (ICNNMD: MinMaxScaler then int), divided by 255; constant channel -> 0; padding pixels 0"
)
_ARRAYS = ("x", "y", "trajectory", "frame", "split")
_CHUNK = 100


# --- pixel maps and splits ---------------------------------------------------------------------


def grid_size(n_atoms: int) -> int:
    """S = ceil(√n_atoms), the side of the square pixel map."""
    side = math.isqrt(n_atoms)
    return side if side * side == n_atoms else side + 1


def pixel_map(xyz: np.ndarray) -> np.ndarray:
    """ICNNMD pixel maps (F, S, S, 3) float32 in [0, 1] of coordinates `xyz` (F, N, 3) nm.

    See the module docstring (step 4); S = ceil(√N).
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[1] == 0:
        raise ValueError(
            f"pixel_map expects coordinates of shape (frames, atoms>0, 3), got {xyz.shape}"
        )
    frames, n_atoms, _ = xyz.shape
    rgb = xyz @ RGB_MATRIX.T
    low = rgb.min(axis=1, keepdims=True)
    span = rgb.max(axis=1, keepdims=True) - low
    unit = np.divide(rgb - low, span, out=np.zeros_like(rgb), where=span > 0)
    side = grid_size(n_atoms)
    grid = np.zeros((frames, side * side, 3), dtype=np.float32)
    grid[:, :n_atoms] = np.floor(unit * 255.0) / 255.0
    return grid.reshape(frames, side, side, 3)


def split_blocks(
    n_frames: int,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    gap: int = DEFAULT_GAP,
    source: str = "",
) -> np.ndarray:
    """Split code (n_frames,) int8 of consecutive frames: 0/1/2 = train/val/test, −1 = gap.

    Contiguous blocks in time order (see the module docstring, step 5). `source` names the
    trajectory in the error raised when the frames are too few for the blocks and gaps.
    """
    fractions = _check_split(split)
    blocks = [k for k in range(3) if fractions[k] > 0]
    usable = n_frames - gap * (len(blocks) - 1)
    total = sum(fractions[k] for k in blocks)
    edges = [0]
    cumulative = 0.0
    for k in blocks:
        cumulative += fractions[k] / total
        edges.append(round(usable * cumulative) if usable > 0 else 0)
    sizes = np.diff(edges)
    if usable < len(blocks) or (sizes <= 0).any():
        empty = [SPLITS[k] for k, size in zip(blocks, sizes, strict=True) if size <= 0]
        raise SciquantError(
            f"{source or 'trajectory'}: {n_frames} frames are too few for the split"
            f" {dict(zip(SPLITS, fractions, strict=True))} with gap {gap}: block(s)"
            f" {', '.join(empty) or ', '.join(SPLITS[k] for k in blocks)} would be empty."
            " Take more frames (frames_per_trajectory), or lower `gap`."
        )
    codes = np.full(n_frames, -1, dtype=np.int8)
    start = 0
    for k, size in zip(blocks, sizes, strict=True):
        codes[start : start + size] = k
        start += size + gap
    return codes


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fractions = ()
    if (
        len(fractions) != 3
        or not all(math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
        or fractions[0] <= 0
    ):
        raise SciquantError(
            f"md prepare: split must be three fractions (train, val, test) ≥ 0 adding up to 1 with"
            f" train > 0, e.g. (0.7, 0.1, 0.2); got {split!r}"
        )
    return fractions  # type: ignore[return-value]


# --- reading -----------------------------------------------------------------------------------


def _brief(error: Exception) -> str:
    """An exception as one short line (mdtraj's selection parser lists its whole grammar)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 200 and ", found " in text:
        text = "..." + text[text.index(", found ") + 1 :]
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _suffix(path: Path) -> str:
    """The format suffix, lower case, with a compression suffix kept: `.gro.gz`, `.xtc`."""
    suffixes = path.suffixes[-2:] if path.name.lower().endswith(".gz") else path.suffixes[-1:]
    return "".join(suffixes).lower()


def load_topology(path: Path) -> mdtraj.Topology:
    """The mdtraj topology of a `.pdb`/`.psf` (or `.gro`, `.prmtop`) file."""
    path = Path(path)
    if _suffix(path) not in TOPOLOGY_FORMATS:
        raise SciquantError(
            f"{path}: not a supported topology format ({_suffix(path) or 'no suffix'});"
            f" use one of {', '.join(TOPOLOGY_FORMATS)} (for GROMACS .tpr, write a .pdb with"
            " `gmx editconf` first)."
        )
    if not path.is_file():
        raise SciquantError(f"{path}: topology file not found; fetch or synthesize the data first.")
    try:
        topology = mdtraj.load_topology(str(path))
    except Exception as error:  # mdtraj raises many types for a malformed file
        raise SciquantError(
            f"{path}: cannot be read as a {_suffix(path)} topology ({_brief(error)}); check the"
            " file, or download it again."
        ) from error
    if topology.n_atoms == 0:
        raise SciquantError(f"{path}: the topology has no atoms; check the file.")
    return topology


def select_atoms(topology: mdtraj.Topology, selection: str, topology_path: Path) -> np.ndarray:
    """Atom indices (ascending) of `selection`: "all", "protein", "CA" or an mdtraj selection."""
    if not isinstance(selection, str) or not selection.strip():
        raise SciquantError(
            f"md prepare: selection must be a non-empty mdtraj selection string, got {selection!r}"
        )
    query = "name CA" if selection == "CA" else selection
    try:
        indices = topology.select(query)
    except Exception as error:  # mdtraj's parser raises several types
        raise SciquantError(
            f"selection {selection!r} is not a valid mdtraj selection for {topology_path}"
            f" ({_brief(error)}); write it in mdtraj's atom selection language, e.g. 'all',"
            " 'protein', 'CA', 'name CA and resid 0 to 99'."
        ) from error
    if len(indices) == 0:
        raise SciquantError(
            f"selection {selection!r} matches no atom of {topology_path} ({topology.n_atoms}"
            " atoms); choose a selection that matches, e.g. 'all' or 'protein'."
        )
    return np.asarray(indices, dtype=np.int64)


def _atoms_in_file(path: Path) -> int:
    """Atoms per frame of a trajectory file, read from its first frame."""
    with mdtraj.open(str(path)) as handle:
        first = handle.read(n_frames=1)
    xyz = first[0] if isinstance(first, tuple) else first
    if xyz is None or len(xyz) == 0:
        raise SciquantError(f"{path}: holds no frames; check the file, or download it again.")
    return int(np.shape(xyz)[1])


def read_trajectory(
    path: Path,
    topology: mdtraj.Topology,
    topology_path: Path,
    atom_indices: np.ndarray,
    frames: int = 100,
    stride: int = 1,
) -> tuple[mdtraj.Trajectory, np.ndarray]:
    """The first `frames` frames (0 = all) of every `stride`-th, selected atoms only.

    Returns the trajectory and the frame numbers in the file (int64). Errors name the file:
    missing, unsupported or unreadable format, atom count different from the topology's, fewer
    frames than asked (a truncated file, for one).
    """
    path = Path(path)
    if not path.is_file():
        raise SciquantError(
            f"{path}: trajectory file not found; fetch or synthesize the data first."
        )
    suffix = _suffix(path)
    if suffix not in TRAJECTORY_FORMATS:
        raise SciquantError(
            f"{path}: not a supported trajectory format ({suffix or 'no suffix'}); use one of"
            f" {', '.join(TRAJECTORY_FORMATS)} (convert others with `gmx trjconv` or mdtraj)."
        )
    try:
        n_atoms = _atoms_in_file(path)
    except SciquantError:
        raise
    except Exception as error:
        raise SciquantError(
            f"{path}: cannot be read as a {suffix} trajectory ({_brief(error)}); the file is"
            f" corrupt or not {suffix} (supported: {', '.join(TRAJECTORY_FORMATS)})."
            " Download it again."
        ) from error
    if n_atoms != topology.n_atoms:
        raise SciquantError(
            f"{path} has {n_atoms} atoms per frame but the topology {topology_path} has"
            f" {topology.n_atoms}: they describe different systems. Use the topology written with"
            " this trajectory (same atoms, including solvent, ions and lipids if the trajectory"
            " has them)."
        )
    chunks = []
    count = 0
    try:
        for chunk in mdtraj.iterload(
            str(path), top=topology, chunk=_CHUNK, stride=stride, atom_indices=atom_indices
        ):
            chunks.append(chunk)
            count += chunk.n_frames
            if frames and count >= frames:
                break
    except Exception as error:  # ValueError, OSError, RuntimeError (xdrfile), ...
        raise SciquantError(
            f"{path}: reading frames failed after {count} frames ({_brief(error)}); the file is"
            " truncated or corrupt. Download it again."
        ) from error
    if count == 0 or (frames and count < frames):
        raise SciquantError(
            f"{path}: has {count} frames{f' at stride {stride}' if stride > 1 else ''},"
            f" {frames or 'at least 1'} asked; the file is truncated or shorter than expected."
            " Download it again, or lower frames_per_trajectory / stride."
        )
    traj = chunks[0].join(chunks[1:], check_topology=False) if len(chunks) > 1 else chunks[0]
    if frames:
        traj = traj[:frames]
    return traj, np.arange(traj.n_frames, dtype=np.int64) * stride


def _frames_count(frames_per_trajectory: int | str) -> int:
    if frames_per_trajectory == "all":
        return 0
    if (
        not isinstance(frames_per_trajectory, int | np.integer)
        or isinstance(frames_per_trajectory, bool)
        or frames_per_trajectory < 0
    ):
        raise SciquantError(
            "md prepare: frames_per_trajectory must be an integer ≥ 1, or 0 / 'all' for every"
            f" frame; got {frames_per_trajectory!r}"
        )
    return int(frames_per_trajectory)


def _check_count(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise SciquantError(f"md prepare: {name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def load_superposed(
    topology: Path,
    trajectories: Sequence[Path],
    *,
    selection: str = "all",
    frames_per_trajectory: int | str = 100,
    stride: int = 1,
    progress: bool = True,
) -> tuple[list[mdtraj.Trajectory], list[np.ndarray]]:
    """Selected-atom trajectories superposed on frame 0 of the first, and their frame numbers."""
    _, loaded, numbers = _load_superposed(
        Path(topology), trajectories, selection, frames_per_trajectory, stride, progress
    )
    return loaded, numbers


def _load_superposed(
    topology: Path,
    trajectories: Sequence[Path],
    selection: str,
    frames_per_trajectory: int | str,
    stride: int,
    progress: bool,
) -> tuple[mdtraj.Topology, list[mdtraj.Trajectory], list[np.ndarray]]:
    frames = _frames_count(frames_per_trajectory)
    stride = _check_count("stride", stride, 1)
    if not trajectories:
        raise SciquantError("md prepare: no trajectories given; list at least one.")
    top = load_topology(topology)
    indices = select_atoms(top, selection, topology)
    loaded: list[mdtraj.Trajectory] = []
    numbers = []
    reference = None
    for path in tqdm(trajectories, desc="md prepare", unit="trajectory", disable=not progress):
        traj, frame_numbers = read_trajectory(Path(path), top, topology, indices, frames, stride)
        if reference is None:
            # An independent, centred copy: where mdtraj leaves the superposed frames depends on
            # whether the reference shares memory with them, so fix the translation ourselves.
            first = traj.xyz[:1].astype(np.float64)
            reference = mdtraj.Trajectory(first - first.mean(axis=1, keepdims=True), traj.topology)
        traj.superpose(reference, frame=0)
        traj.xyz = traj.xyz - traj.xyz.mean(axis=1, keepdims=True)
        loaded.append(traj)
        numbers.append(frame_numbers)
    return top, loaded, numbers


# --- prepare -----------------------------------------------------------------------------------


def prepare(
    topology: Path,
    trajectories: Sequence[tuple[Path, int]],
    out: Path,
    *,
    selection: str = "all",
    frames_per_trajectory: int | str = 100,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    gap: int = DEFAULT_GAP,
    stride: int = 1,
    progress: bool = True,
) -> Path:
    """Write `pixelmaps.npz` and `index.json` into `out` (see the module docstring); return `out`.

    `trajectories`: (file, label) pairs, label an integer ≥ 0 naming the functional state.
    """
    topology, out = Path(topology), Path(out)
    fractions = _check_split(split)
    gap = _check_count("gap", gap, 0)
    listing = [(Path(path), label) for path, label in trajectories]
    for path, label in listing:
        if not isinstance(label, int | np.integer) or isinstance(label, bool) or label < 0:
            raise SciquantError(f"{path}: label must be an integer ≥ 0, got {label!r}")
    full_topology, loaded, numbers = _load_superposed(
        topology, [path for path, _ in listing], selection, frames_per_trajectory, stride, progress
    )
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    files = []
    for index, ((path, label), traj, frame_numbers) in enumerate(
        zip(listing, loaded, numbers, strict=True)
    ):
        codes = split_blocks(traj.n_frames, fractions, gap, source=str(path))
        kept = codes >= 0
        arrays["x"].append(pixel_map(traj.xyz[kept]))
        arrays["y"].append(np.full(kept.sum(), label, dtype=np.int64))
        arrays["trajectory"].append(np.full(kept.sum(), index, dtype=np.int64))
        arrays["frame"].append(frame_numbers[kept])
        arrays["split"].append(codes[kept])
        files.append(
            {
                "path": path.name,
                "sha256": sha256_of(path),
                "label": int(label),
                "frames": int(traj.n_frames),
                "kept": int(kept.sum()),
            }
        )
    data = {name: np.concatenate(parts) for name, parts in arrays.items()}
    top = loaded[0].topology
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    _save_npz(out / "pixelmaps.npz", data)
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "grid": int(data["x"].shape[1]),
        "n_atoms": int(top.n_atoms),
        "selection": selection,
        "frames_per_trajectory": frames_per_trajectory,
        "stride": int(stride),
        "gap": gap,
        "rgb_matrix": RGB_MATRIX.tolist(),
        "scaling": SCALING,
        "superposition": {
            "reference": {"file": listing[0][0].name, "frame": 0},
            "atoms": "selection",
        },
        "split": {
            "fractions": dict(zip(SPLITS, fractions, strict=True)),
            "gap": gap,
            "counts": _split_counts(data),
        },
        "files": files,
        "topology": {
            "path": topology.name,
            "sha256": sha256_of(topology),
            "n_atoms": int(full_topology.n_atoms),
            "n_residues": int(full_topology.n_residues),
            "n_chains": int(full_topology.n_chains),
        },
        "arrays": {
            "x": "float32 (N, grid, grid, 3) pixel maps in [0, 1]",
            "y": "int64 (N,) label",
            "trajectory": "int64 (N,) index into files",
            "frame": "int64 (N,) frame number in its file",
            "split": "int8 (N,) 0 train, 1 val, 2 test",
        },
    }
    write_json(out / "index.json", index)
    return out


def _split_counts(data: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    counts = {}
    for code, name in enumerate(SPLITS):
        labels = data["y"][data["split"] == code]
        per_label = {str(int(v)): int((labels == v).sum()) for v in np.unique(data["y"])}
        counts[name] = {"total": int(len(labels)), **per_label}
    return counts


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def prepare_from_info(raw: Path, out: Path, **kw: Any) -> Path:
    """`prepare` on the listing in `raw/dataset_info.json` (md_sim's, or a GPCRmd fetch's).

    The listing: {"topology": file, "trajectories": [{"file": file, "label": int}, ...]}, file
    names relative to `raw`. Keyword arguments go to `prepare`.
    """
    raw = Path(raw)
    path = raw / "dataset_info.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: not found; fetch or synthesize the data first.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SciquantError(
            f"{path}: not valid JSON ({error}); fetch or synthesize again."
        ) from error
    try:
        topology = raw / info["topology"]
        trajectories = [(raw / entry["file"], entry["label"]) for entry in info["trajectories"]]
    except (KeyError, TypeError) as error:
        raise SciquantError(
            f"{path}: expected {{'topology': file, 'trajectories': [{{'file': file, 'label': int}},"
            f" ...]}}; missing or malformed {error}. Fetch or synthesize again."
        ) from error
    return prepare(topology, trajectories, out, **kw)


def listing_from_manifest(raw: Path) -> tuple[Path, list[tuple[Path, int]]]:
    """The topology and the (trajectory, label) pairs a fetch delivered into `raw`.

    Reads the config entries `sciquant fetch` recorded in `raw/manifest.json` (`source.files`:
    `url`, optional `name`, `role` "topology" or "trajectory", a trajectory's `label`) and
    finds each file under the name fetch saved it as: `sciquant.data.download.local_name`, so a
    URL with a query string or percent-escapes is looked up where it was saved. Errors name the
    manifest and the entry and say what to fix.
    """
    raw = Path(raw)
    path = raw / MANIFEST_NAME
    try:
        files = json.loads(path.read_text())["source"]["files"]
    except FileNotFoundError:
        raise SciquantError(
            f"{path}: not found, so the downloaded files are unknown; rerun fetch (it writes"
            " the manifest last)."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise SciquantError(
            f"{path}: cannot read the list of downloaded files ({error!r}); rerun fetch"
        ) from None
    if not isinstance(files, list):
        raise SciquantError(f"{path}: source.files is not a list; rerun fetch")
    topologies: list[Path] = []
    trajectories: list[tuple[Path, int]] = []
    for i, spec in enumerate(files):
        key = f"{path}: source.files.{i}"
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise SciquantError(f"{key} has no `url`; rerun fetch with the dataset's config")
        file = raw / local_name(spec["url"], spec.get("name"))
        role = spec.get("role")
        if role == "topology":
            topologies.append(file)
        elif role == "trajectory":
            label = spec.get("label")
            if isinstance(label, str) and label.strip().isdigit():
                label = int(label)
            if label is None:
                raise SciquantError(
                    f"{key} ({spec['url']}) is a trajectory without `label`; give it its state"
                    " label (0, 1, ...) in the config and rerun fetch"
                )
            trajectories.append((file, label))
        else:
            raise SciquantError(
                f"{key} ({spec['url']}) has role {role!r}; set `role: topology` or"
                " `role: trajectory` for it in the config and rerun fetch"
            )
    if len(topologies) != 1:
        raise SciquantError(
            f"{path}: exactly one file needs `role: topology` (found {len(topologies)}); fix the"
            " dataset's `files` in the config and rerun fetch"
        )
    if not trajectories:
        raise SciquantError(
            f"{path}: no file has `role: trajectory`; list the trajectories in the dataset's"
            " `files` in the config and rerun fetch"
        )
    return topologies[0], trajectories


def prepare_from_manifest(raw: Path, out: Path, **kw: Any) -> Path:
    """`prepare` on the files a fetch delivered into `raw` (see `listing_from_manifest`).
    Keyword arguments go to `prepare`."""
    topology, trajectories = listing_from_manifest(raw)
    return prepare(topology, trajectories, out, **kw)


# --- reading prepared data ---------------------------------------------------------------------


def load_index(out: Path) -> dict[str, Any]:
    """`index.json` of a prepared folder, checked for format and version."""
    path = Path(out) / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: not found; run the prepare stage first.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SciquantError(f"{path}: not valid JSON ({error}); rerun prepare.") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise SciquantError(f"{path}: not a {FORMAT} index; rerun prepare into this folder.")
    if index.get("version") != FORMAT_VERSION:
        raise SciquantError(
            f"{path}: format version {index.get('version')} is not {FORMAT_VERSION}; rerun"
            " prepare with this sciquant."
        )
    return index


def load_prepared(out: Path) -> dict[str, np.ndarray]:
    """The arrays of `pixelmaps.npz` (x, y, trajectory, frame, split), checked against the index.

    Select a split with `split_arrays(data, "train")` or `data["x"][data["split"] == 0]`.
    """
    index = load_index(out)
    path = Path(out) / "pixelmaps.npz"
    try:
        with np.load(path) as archive:
            data = {name: archive[name] for name in _ARRAYS}
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: not found; rerun prepare.") from error
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise SciquantError(f"{path}: cannot be read ({_brief(error)}); rerun prepare.") from error
    n = len(data["x"])
    grid = index.get("grid")
    if (
        data["x"].ndim != 4
        or data["x"].shape[1:] != (grid, grid, 3)
        or any(len(data[name]) != n for name in _ARRAYS)
    ):
        raise SciquantError(
            f"{path}: array shapes do not match {Path(out) / 'index.json'} (grid {grid});"
            " rerun prepare."
        )
    return data


def split_arrays(data: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """The rows of `data` (from `load_prepared`) in split `name` ("train", "val" or "test")."""
    if name not in SPLITS:
        raise SciquantError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
    rows = data["split"] == SPLITS.index(name)
    return {key: value[rows] for key, value in data.items()}
