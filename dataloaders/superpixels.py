"""Superpixel pseudo-labels for self-supervised episodes (after SSL-ALPNet; docs/DESIGN.md "Prepared data
folder"): per prepared slice, `felzenszwalb` or `slic` superpixels clipped to the body, in
PREP/superpixels/; SSL-ALPNet's own superpix-MIDDLE files for a folder of its layout. Deterministic.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb, slic

from dataloaders import layouts
from dataloaders.nifti import atomic_folder, parallel_map
from dataloaders.prepared import open_training_images, prepare_hint, read_meta
from util.errors import UserError
from util.io import atomic_path, write_bytes_atomic

FORMAT_VERSION = 1
FOLDER = "superpixels"
MAX_LABEL = np.iinfo(np.uint16).max


def make_hint(prep_dir: str | Path) -> str:
    """The command that adds superpixels to a prepared folder (SSL-ALPNet's layout: to its source folder)."""
    try:
        source = read_meta(prep_dir)["source"]
    except (UserError, KeyError, TypeError):
        source = {}
    if source.get("layout") == "alpnet":
        return (f"{layouts.make_superpixels_command(source['dir'])} in the source folder, then prepare "
                f"{prep_dir} again (prepare_visceral.py --layout alpnet ... --overwrite)")
    return f"run `python scripts/make_superpixels.py --images {prep_dir}`"


@dataclass(frozen=True)
class SuperpixelParams:
    """How pseudo-labels are made (sizes in pixels of the prepared slice). felzenszwalb: `scale` (larger
    segments), `sigma` (pre-smoothing), `min_size` (smaller segments merged); slic: `n_segments`,
    `compactness` (~0.05-0.5 for [0, 1] images). Defaults chosen on the phantom at S = 256."""
    method: str = "felzenszwalb"
    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 200
    n_segments: int = 150
    compactness: float = 0.1
    body_threshold: float = 0.05

    def check(self) -> None:
        """One-line UserError for an out-of-range parameter (make_superpixels.py: --method has choices)."""
        if self.scale <= 0 or self.sigma < 0 or self.min_size < 1 or self.n_segments < 2 \
                or self.compactness <= 0 or not 0 <= self.body_threshold < 1:
            raise UserError(f"superpixel parameters {asdict(self)} are out of range: use scale > 0, "
                            "sigma >= 0, min_size >= 1, n_segments >= 2, compactness > 0, "
                            "0 <= body_threshold < 1")


def body_mask(image: np.ndarray, threshold: float, structure: np.ndarray | None = None) -> np.ndarray:
    """H x W bool: the largest connected region of pixels > threshold (4-connected, or by `structure`),
    holes filled; all False if none."""
    above = image > threshold                                                    # H x W
    components, count = ndimage.label(above, structure)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]                                  # count
    largest = components == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest)


def renumber(segments: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Segments clipped to `body`, ids 1..M in raster order of first appearance, 0 outside (uint16)."""
    inside = body.ravel()                                                        # H*W bool
    values, first, inverse = np.unique(segments.ravel()[inside], return_index=True, return_inverse=True)
    if values.size > MAX_LABEL:
        raise UserError(f"a slice has {values.size} superpixels, more than uint16 holds: raise min_size "
                        "or lower n_segments")
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(values.size)              # by first appearance
    labels = np.zeros(segments.size, dtype=np.uint16)
    labels[inside] = rank[inverse.ravel()] + 1
    return labels.reshape(segments.shape)


def slice_superpixels(image: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """Superpixels of one slice H x W in [0, 1] -> H x W uint16 (0 outside the body, 1..M inside)."""
    image = np.asarray(image, dtype=np.float64)
    body = body_mask(image, params.body_threshold)
    if not body.any():
        return np.zeros(image.shape, dtype=np.uint16)
    if params.method == "felzenszwalb":
        segments = felzenszwalb(image, scale=params.scale, sigma=params.sigma, min_size=params.min_size,
                                channel_axis=None)
    else:
        segments = slic(image, n_segments=params.n_segments, compactness=params.compactness,
                        sigma=params.sigma, channel_axis=None, mask=body, start_label=1,
                        enforce_connectivity=True)
    return renumber(segments, body)


def stack_superpixels(images: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """Superpixels of every slice of a stack N x H x W -> N x H x W uint16."""
    out = np.zeros(images.shape, dtype=np.uint16)
    for row in range(images.shape[0]):
        out[row] = slice_superpixels(images[row], params)
    return out


# ------------------------------------------------------------------------------ prepared folder
def training_volumes(prep_dir: str | Path) -> list[str]:
    """Patient ids of the training split of a prepared folder (meta.json), each checked to have its slices."""
    try:
        pids = [str(p) for p in read_meta(prep_dir)["splits"]["train"]]
    except (KeyError, TypeError):
        raise UserError(f"prepared data '{prep_dir}': meta.json has no training split: "
                        f"{prepare_hint(prep_dir)}") from None
    if not pids:
        raise UserError(f"prepared data '{prep_dir}': no training volumes: prepare a folder of CT volumes "
                        "(scripts/prepare_visceral.py --layout images-only)")
    for pid in pids:
        open_training_images(prep_dir, pid)
    return pids


def _volume_task(prep_dir: str, out_dir: str, pid: str, params: SuperpixelParams) -> tuple[str, dict]:
    """Worker: superpixels of one training volume, written to the partial folder."""
    labels = stack_superpixels(open_training_images(prep_dir, pid), params)          # N x S x S
    with atomic_path(Path(out_dir) / f"{pid}.npy") as temporary, open(temporary, "wb") as handle:
        np.save(handle, labels, allow_pickle=False)
    counts = [int(labels[row].max()) for row in range(labels.shape[0])]
    return pid, {"slices": int(labels.shape[0]), "superpixels_per_slice": counts}


def make_superpixels(prep_dir: str | Path, params: SuperpixelParams = SuperpixelParams(), workers: int = 2,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Write PREP/superpixels/ for every training volume of `prep_dir`; returns its meta.json content."""
    prep_dir = Path(prep_dir)
    pids = training_volumes(prep_dir)
    with atomic_folder(prep_dir / FOLDER, overwrite) as partial:
        tasks = [(str(prep_dir), str(partial), pid, params) for pid in pids]
        volumes = dict(parallel_map(_volume_task, tasks, workers,
                                    {"desc": "superpixels", "unit": "volume", "disable": not progress}))
        meta = {"format_version": FORMAT_VERSION, "params": asdict(params),
                "volumes": {pid: volumes[pid] for pid in sorted(volumes)}}
        write_bytes_atomic(json.dumps(meta, indent=1).encode(), partial / "meta.json")
    return meta


def read_superpixel_meta(prep_dir: str | Path) -> dict:
    """PREP/superpixels/meta.json; a one-line error naming the command when it is missing."""
    path = Path(prep_dir) / FOLDER / "meta.json"
    if not path.is_file():
        raise UserError(f"prepared data '{prep_dir}' has no superpixels ({path} missing), which "
                        f"self-supervised training needs: {make_hint(prep_dir)}")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is unreadable ({error}): {make_hint(prep_dir)} --overwrite") from None


def open_superpixels(prep_dir: str | Path, pid: str) -> np.ndarray:
    """Memory map N x S x S uint16 of one volume's superpixels."""
    path = Path(prep_dir) / FOLDER / f"{pid}.npy"
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path} is unreadable ({type(error).__name__}): {make_hint(prep_dir)} "
                        "--overwrite") from None


# ------------------------------------------------------------------------------ SSL-ALPNet's superpix-MIDDLE
# pseudolabel_gen.ipynb (alpnet.md section 1): per axial slice felzenszwalb(scale 1, sigma 1, min_size 400)
# on the stored intensities, the body mask (> threshold, largest 8-connected component, holes filled; an
# empty slice keeps its empty mask), then `superpix_masking`'s renumbering. Stored float64 on the image grid.
ALPNET_FELZENSZWALB = {"scale": 1.0, "sigma": 1.0, "min_size": 400}
ALPNET_BODY_THRESHOLD = {"chaos_t2": 50 + 1e-4, "sabs": 1e-4}        # by data set (layouts.DATASETS)


def alpnet_renumber(raw: np.ndarray, body: np.ndarray) -> np.ndarray:
    """SSL-ALPNet's superpix_masking of one slice: the k-th nonzero raw id becomes k inside the body, the
    top id k + 1 (it is visited twice), raw id 0 and everything outside the body 0."""
    ids = np.unique(raw)
    nonzero = ids[ids != 0]
    out = np.zeros(raw.shape, dtype=np.int32)
    if not nonzero.size:
        return out
    kept = body & (raw != 0)
    out[kept] = np.searchsorted(nonzero, raw[kept]) + 1
    out[kept & (raw == nonzero[-1])] = nonzero.size + 1
    return out


def alpnet_superpixels(image: np.ndarray, threshold: float) -> np.ndarray:
    """superpix-MIDDLE of a stored volume Y x X x Z (layouts' reading order) -> Y x X x Z int32."""
    out = np.zeros(image.shape, dtype=np.int32)
    for z in range(image.shape[2]):
        slice_ = np.asarray(image[:, :, z], dtype=np.float64)                                 # Y x X
        body = np.zeros(slice_.shape, dtype=bool)
        if (slice_ > threshold).any():
            body = body_mask(slice_, threshold, structure=np.ones((3, 3), bool))
        raw = felzenszwalb(slice_, channel_axis=None, **ALPNET_FELZENSZWALB)
        out[:, :, z] = alpnet_renumber(raw, body)
    return out


def _alpnet_scan_task(folder: str, out: str, sid: int, threshold: float) -> str:
    """Worker: write superpix-MIDDLE_<id>.nii.gz of one scan into `out` (atomic)."""
    source = nib.load(str(Path(folder) / f"image_{sid}.nii.gz"))
    image = np.asarray(source.dataobj, dtype=np.float64).transpose(1, 0, 2)                  # Y x X x Z
    labels = alpnet_superpixels(image, threshold).transpose(1, 0, 2).astype(np.float64)     # X x Y x Z
    header = source.header.copy()
    header.set_data_dtype(np.float64)
    path = layouts.superpixel_path(out, sid)
    data = nib.Nifti1Image(labels, source.affine, header).to_bytes()
    write_bytes_atomic(gzip.compress(data, compresslevel=6, mtime=0), path)
    return path.name


def make_alpnet_superpixels(folder: str | Path, overwrite: bool = False, workers: int = 2,
                            progress: bool = True, out: str | Path | None = None) -> dict:
    """The missing superpix-MIDDLE_<id>.nii.gz (all with `overwrite`) of an SSL-ALPNet-layout folder, into
    `out` (default: the folder, then with classmap_1.json when absent); returns {"dataset", "written",
    "kept", "classmap"}."""
    folder = Path(folder)
    target = Path(out or folder)
    dataset = layouts.detect_dataset(folder)
    ids = layouts.scan_ids(folder)
    target.mkdir(parents=True, exist_ok=True)
    todo = list(ids) if overwrite else layouts.missing_superpixels(target, ids)
    tasks = [(str(folder), str(target), sid, ALPNET_BODY_THRESHOLD[dataset.name]) for sid in todo]
    written = parallel_map(_alpnet_scan_task, tasks, workers,
                           {"desc": "superpixels", "unit": "scan", "disable": not progress})
    classmap = None
    if out is None and layouts.read_classmap(folder) is None:
        classmap = folder / layouts.CLASSMAP
        write_bytes_atomic(json.dumps(layouts.compute_classmap(folder, dataset)).encode(), classmap)
    return {"dataset": dataset.name, "written": written, "kept": len(ids) - len(todo),
            "classmap": str(classmap) if classmap else None}
