"""Synthetic contrast CT of thorax and abdomen in the VISCERAL Anatomy3 layout (the demo's data).

`render_subject` draws one subject from an analytic body model (organ layout measured on one real abdominal
CT; body frame in mm: x left -> right, y back -> front, z up from the pelvic floor), varied in body, organs,
shape, contrast, noise, field of view, spacing and storage orientation; `generate_phantom` writes a folder
atomically. Same seed -> same bytes.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dataloaders.layouts import mask_filename, volume_filename
from dataloaders.nifti import atomic_folder, save_nifti_atomic
from dataloaders.organs import NAME_TO_INDEX as LBL
from dataloaders.organs import STRUCTURES
from util.errors import UserError

# tissue id -> (name, mean HU, texture amplitude HU). Tissues set intensity; labels are separate.
TISSUES = [("air", -1000, 0), ("subcut_fat", -100, 8), ("muscle", 45, 9), ("cavity_fat", -95, 10),
           ("bowel_wall", 45, 10), ("bowel_content", 18, 20), ("gas", -900, 40), ("cortical_bone", 720, 80),
           ("marrow", 230, 40), ("disc", 90, 10), ("csf", 15, 8), ("lung", -850, 25), ("blood_pool", 150, 10),
           ("aorta", 205, 10), ("ivc", 125, 10), ("airway", -960, 15), ("thyroid", 110, 12),
           ("liver", 62, 9), ("spleen", 52, 8), ("pancreas", 48, 14), ("gallbladder", 12, 6),
           ("kidney_cortex", 160, 12), ("kidney_medulla", 105, 12), ("sinus_fat", -60, 20),
           ("adrenal", 38, 12), ("bladder", 10, 6), ("myocardium", 55, 8), ("back_muscle", 45, 9),
           ("psoas", 47, 9)]
T = {name: index for index, (name, _, _) in enumerate(TISSUES)}
BONE = (T["cortical_bone"], T["marrow"])
# tissues an organ may paint over: everything inside the cavity except bone and the body wall
INTERIOR = tuple(i for i in range(len(TISSUES)) if i not in (T["air"], T["subcut_fat"], T["muscle"]) + BONE)


@dataclass
class Grid:
    """Body-frame coordinates (mm) of every voxel of one canonical X x Y x Z grid, and its painting state."""
    px: np.ndarray          # X x Y x Z float32
    py: np.ndarray
    pz: np.ndarray
    spacing: np.ndarray     # (3,) mm
    offset: np.ndarray      # (2,) body centre in grid mm (x, y)
    z0: float               # body z of slice 0
    angle: float            # in-plane body rotation (rad)
    margin: float           # bound on the elastic displacement (mm)
    tissue: np.ndarray      # X x Y x Z uint8 tissue ids
    label: np.ndarray       # X x Y x Z uint8 structure labels 1-20

    def box(self, x: tuple, y: tuple, z: tuple) -> tuple[slice, slice, slice]:
        """Index box (conservative) of the grid voxels whose body coordinates may fall in x*y*z (mm)."""
        corners = np.array([[a, b] for a in x for b in y], dtype=float)
        c, s = np.cos(self.angle), np.sin(self.angle)
        grid_xy = corners @ np.array([[c, s], [-s, c]]) + self.offset        # inverse rotation
        pad, centre = self.margin + 2 * self.spacing[:2].max(), (np.array(self.tissue.shape[:2]) - 1) / 2
        pad_z = self.margin + 40.0 + self.spacing[2]  # tilt moves z by up to ~35 mm at the body edge
        sp = self.spacing
        lo = [*((grid_xy.min(axis=0) - pad) / sp[:2] + centre), (z[0] - pad_z - self.z0) / sp[2]]
        hi = [*((grid_xy.max(axis=0) + pad) / sp[:2] + centre), (z[1] + pad_z - self.z0) / sp[2]]
        return tuple(slice(int(np.clip(np.floor(a), 0, n)), int(np.clip(np.ceil(b) + 1, 0, n)))
                     for a, b, n in zip(lo, hi, self.tissue.shape))

    def paint(self, level: np.ndarray, box: tuple, tissue: int, label: int = 0,
              allowed: tuple[int, ...] | None = None, threshold: float = 1.0) -> np.ndarray:
        """Set tissue (and label) where level (the box's shape) < threshold, only over `allowed` tissues
        when given; returns the painted mask."""
        inside = level < threshold
        sub_tissue = self.tissue[box]
        if allowed is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(allowed)] = True
            inside &= lut[sub_tissue]
        sub_tissue[inside] = tissue
        self.label[box][inside] = label
        return inside


def shape_modulation(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    return rng.normal(0.0, amplitude, size=9).astype(np.float32)   # 9 low-order angular terms


def blob_level(g: Grid, box: tuple, centre, radii, angle: float = 0.0, modulation=None) -> np.ndarray:
    """Implicit ellipsoid |u| / (1 + m(u/|u|)) with a smooth angular modulation m; inside < 1 (box's shape).
    centre, radii: (3,) mm in body frame; angle: in-plane rotation (rad)."""
    dx, dy, dz = g.px[box] - centre[0], g.py[box] - centre[1], g.pz[box] - centre[2]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (c * dx + s * dy) / radii[0]
    v = (-s * dx + c * dy) / radii[1]
    w = dz / radii[2]
    rho = np.sqrt(u * u + v * v + w * w) + np.float32(1e-6)
    if modulation is None:
        return rho
    nu, nv, nw = u / rho, v / rho, w / rho
    terms = (nu, nv, nw, nu * nv, nu * nw, nv * nw, nu * nu - nv * nv, nw * nw - 0.33, nu * nv * nw)
    m = sum(coefficient * term for coefficient, term in zip(modulation, terms))
    return rho / (1.0 + m)


def tube_level(g: Grid, box: tuple, knots_z, cx, cy, rx, ry, roundness: float = 4.0) -> np.ndarray:
    """Elliptic tube with rounded ends, centre and radii (cx, cy, rx, ry) linear between increasing knots_z
    (mm); inside < 1 (box's shape)."""
    pz = g.pz[box]
    flat = pz.reshape(-1)
    ex = ((g.px[box] - np.interp(flat, knots_z, cx).reshape(pz.shape))
          / np.interp(flat, knots_z, rx).reshape(pz.shape))
    ey = ((g.py[box] - np.interp(flat, knots_z, cy).reshape(pz.shape))
          / np.interp(flat, knots_z, ry).reshape(pz.shape))
    half = (knots_z[-1] - knots_z[0]) / 2
    ez = np.abs(pz - (knots_z[0] + knots_z[-1]) / 2) / half
    inplane = np.sqrt(ex * ex + ey * ey)
    return (inplane ** roundness + ez ** (4 * roundness)) ** (1 / roundness)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cell: int, sigma: float,
                 sigma_z: float) -> np.ndarray:
    """Smooth random field (unit sd, X x Y x Z float32) built at 1/cell in-plane resolution and upsampled;
    sigma: in-plane smoothing in low-resolution cells, sigma_z: along z in slices."""
    low = rng.standard_normal((max(2, shape[0] // cell + 2), max(2, shape[1] // cell + 2), shape[2] + 2),
                              dtype=np.float32)
    low = ndimage.gaussian_filter(low, sigma=(sigma, sigma, sigma_z), mode="wrap")
    low /= low.std() + 1e-6
    zoom = [(shape[0] + 2 * cell) / low.shape[0], (shape[1] + 2 * cell) / low.shape[1], 1.0]
    up = ndimage.zoom(low, zoom, order=1, prefilter=False)
    return np.ascontiguousarray(up[cell:cell + shape[0], cell:cell + shape[1], 1:1 + shape[2]])


@dataclass
class Subject:
    """Random parameters of one body and its scan geometry."""
    rng: np.random.Generator
    width: float            # W: abdominal body width (mm)
    depth: float            # D: abdominal body depth (mm)
    fat: float              # subcutaneous fat thickness (mm)
    wall: float             # muscle wall thickness (mm)
    exponent: float         # superellipse exponent of the body outline
    hu_jitter: np.ndarray   # per-tissue HU offset (contrast timing, scanner)
    noise: float            # white noise sd (HU)
    shape: tuple[int, int, int]
    spacing: np.ndarray     # (3,) mm
    z0: float               # body z of the first slice
    lps: bool               # stored LPS instead of RAS


def sample_subject(rng: np.random.Generator, size: int, n_slices: int) -> Subject:
    """Draw a body and its scan geometry. `n_slices` is nominal: the actual count varies by +-1/8."""
    width = rng.uniform(300, 390)
    depth = width * rng.uniform(0.70, 0.84)
    fov = max(rng.uniform(380, 460), width * 1.08)        # chosen by the technician, not by the body
    slices = int(n_slices + rng.integers(-(n_slices // 8), n_slices // 8 + 1))
    z_fov = 560.0 * rng.uniform(0.92, 1.05)
    dz = round(z_fov / n_slices * 2) / 2
    jitter = rng.normal(0, 6, size=len(TISSUES)).astype(np.float32)
    jitter[[T["kidney_cortex"], T["kidney_medulla"], T["aorta"], T["ivc"], T["liver"], T["spleen"]]] += \
        rng.normal(0, [14, 14, 25, 15, 8, 8]).astype(np.float32)
    return Subject(rng=rng, width=width, depth=depth, fat=rng.uniform(8, 32), wall=rng.uniform(8, 14),
                   exponent=rng.uniform(2.0, 2.6), hu_jitter=jitter, noise=rng.uniform(8, 16),
                   shape=(size, size, slices), spacing=np.array([fov / size, fov / size, dz]),
                   z0=rng.uniform(-30, 45), lps=bool(rng.random() < 0.35))


def make_grid(subject: Subject) -> Grid:
    """Body-frame coordinates of the subject's voxels: rotation, tilt and a smooth elastic displacement."""
    rng, (nx, ny, nz), sp = subject.rng, subject.shape, subject.spacing
    gx = ((np.arange(nx) - (nx - 1) / 2) * sp[0]).astype(np.float32)[:, None, None]
    gy = ((np.arange(ny) - (ny - 1) / 2) * sp[1]).astype(np.float32)[None, :, None]
    gz = (subject.z0 + np.arange(nz) * sp[2]).astype(np.float32)[None, None, :]
    offset = np.array([rng.normal(0, 8), rng.uniform(-20, 5)])        # patient position on the table
    angle = np.deg2rad(rng.uniform(-6, 6))
    tilt = np.float32(np.deg2rad(rng.uniform(-3, 3)))
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    qx, qy = gx - np.float32(offset[0]), gy - np.float32(offset[1])
    amplitude = rng.uniform(4, 8)
    coords = [c * qx + s * qy, -s * qx + c * qy, gz + tilt * qy]
    for axis in range(3):                       # separable smooth displacement, wavelengths 150-400 mm
        for _ in range(3):
            k = (2 * np.pi / rng.uniform(150, 400, size=3)).astype(np.float32)
            phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
            term = ((np.cos(k[0] * gx + phase[0]) * np.cos(k[1] * gy + phase[1]))
                    * np.cos(k[2] * gz + phase[2]))
            coords[axis] = coords[axis] + np.float32(amplitude / 2) * term
    px, py, pz = (np.broadcast_to(a, (nx, ny, nz)).astype(np.float32) for a in coords)
    return Grid(px=px, py=py, pz=pz, spacing=sp, offset=offset, z0=subject.z0, angle=angle,
                margin=1.5 * amplitude, tissue=np.zeros((nx, ny, nz), np.uint8),
                label=np.zeros((nx, ny, nz), np.uint8))


def body_profile(pz: np.ndarray, subject: Subject) -> tuple[np.ndarray, np.ndarray]:
    """Half-width and half-depth (mm) of the body outline at body height pz (pelvis, waist, chest, neck)."""
    knots = [-100, 60, 180, 350, 480, 600, 660, 800]
    width = np.interp(pz, knots, [1.02, 1.02, 0.95, 1.0, 1.04, 0.95, 0.45, 0.4]).astype(np.float32)
    depth = np.interp(pz, knots, [0.92, 0.92, 1.0, 1.0, 0.98, 0.85, 0.45, 0.4]).astype(np.float32)
    return width * np.float32(subject.width / 2), depth * np.float32(subject.depth / 2)


def jitter(subject: Subject, centre, radii, shift=(10.0, 9.0, 12.0), scale_sd: float = 0.08):
    """Random translation (mm sd per axis) and per-axis scale of one organ, scaled with body size."""
    rng, size = subject.rng, (subject.width / 345.0) ** 0.7
    centre = np.asarray(centre, dtype=np.float32) + rng.normal(0, shift).astype(np.float32)
    radii = (np.asarray(radii, dtype=np.float32) * np.float32(size)
             * np.exp(rng.normal(0, scale_sd, 3)).astype(np.float32))
    return centre, radii


def paint_body(g: Grid, subject: Subject) -> np.ndarray:
    """Skin outline, subcutaneous fat, muscle wall, cavity and rectus abdominis; returns depth from
    skin (mm)."""
    half_w, half_d = body_profile(g.pz, subject)
    half_d = np.where(g.py < 0, half_d * np.float32(0.93), half_d)       # flatter back
    p = np.float32(subject.exponent)
    level = (np.abs(g.px / half_w) ** p + np.abs(g.py / half_d) ** p) ** (1 / p) + np.float32(1e-6)
    radius = np.sqrt(g.px * g.px + g.py * g.py)
    depth = radius * (1 / level - 1)                                        # mm to the skin along the ray
    lateral = np.abs(g.px) / (radius + 1)
    fat = np.float32(subject.fat) * (0.8 + 0.5 * lateral * lateral)
    body = level < 1
    g.tissue[body] = T["subcut_fat"]
    g.tissue[body & (depth > fat)] = T["muscle"]
    g.tissue[body & (depth > fat + np.float32(subject.wall))] = T["cavity_fat"]
    # rectus abdominis: the anterior wall beside the midline, from the pubis to the costal margin
    rectus_x = np.abs(g.px)
    rectus = (body & (g.py > 0) & (depth > fat) & (depth < fat + np.float32(subject.wall) + 5)
              & (rectus_x > 5) & (rectus_x < np.float32(0.2 * subject.width)) & (g.pz > 15) & (g.pz < 430))
    g.tissue[rectus] = T["muscle"]
    g.label[rectus & (g.px > 0)] = LBL["rectus_abdominis_right"]
    g.label[rectus & (g.px < 0)] = LBL["rectus_abdominis_left"]
    return depth


def diaphragm(px: np.ndarray, py: np.ndarray, domes: tuple[float, float], width: float) -> np.ndarray:
    """Height (mm) of the diaphragm above (px, py): two domes, lower at the back (costophrenic recesses)."""
    k = np.float32(0.0032)
    right = domes[0] - k * ((px - 0.15 * width) ** 2 + py ** 2)
    left = domes[1] - k * ((px + 0.15 * width) ** 2 + py ** 2)
    return np.maximum(right, left) - np.float32(0.35) * np.maximum(-py, 0)


def paint_thorax(g: Grid, s: Subject, depth: np.ndarray, domes, y_spine: float) -> None:
    """Lungs (above the diaphragm, beside the mediastinum), heart, trachea, bronchi and thyroid."""
    W, D, rng = s.width, s.depth, s.rng
    box = g.box((-W / 2, W / 2), (-D / 2, D / 2), (min(domes) - 120, 700))
    px, py, pz = g.px[box], g.py[box], g.pz[box]
    above = pz > diaphragm(px, py, domes, W) + 3
    mediastinum = (np.float32(0.035 * W) + np.float32(0.04 * W) * (py > y_spine - 10)
                   + np.float32(rng.normal(0, 3)))
    centre = np.float32(-0.03 * W)
    lung_level = np.where(above & (pz < 650) & (depth[box] > s.fat + s.wall + 8), 0.0, 2.0).astype(np.float32)
    g.paint(np.where(px - centre > mediastinum, lung_level, 2), box, T["lung"], LBL["lung_right"], INTERIOR)
    g.paint(np.where(centre - px > mediastinum, lung_level, 2), box, T["lung"], LBL["lung_left"], INTERIOR)
    c, r = jitter(s, (-0.07 * W, 0.1 * D, max(domes) + 50), (55, 45, 55))
    hbox = g.box((c[0] - 90, c[0] + 90), (c[1] - 80, c[1] + 80), (c[2] - 90, c[2] + 90))
    heart = blob_level(g, hbox, c, r, -0.5 + rng.normal(0, 0.1), shape_modulation(rng, 0.06))
    heart = np.where(g.pz[hbox] > diaphragm(g.px[hbox], g.py[hbox], domes, W) - 5, heart, 2)
    g.paint(heart, hbox, T["myocardium"], 0, INTERIOR + (T["lung"],))
    g.paint(heart, hbox, T["blood_pool"], 0, (T["myocardium"],), threshold=0.8)
    y_trachea = y_spine + 42
    tbox = g.box((-40, 40), (y_trachea - 40, y_trachea + 40), (520, 720))
    trachea = tube_level(g, tbox, [525, 600, 720], [0, 0, 0], [y_trachea, y_trachea + 4, y_trachea + 10],
                         [11, 11, 11], [10, 10, 10])
    g.paint(trachea, tbox, T["muscle"], LBL["trachea"], INTERIOR + (T["lung"],))
    g.paint(trachea, tbox, T["airway"], LBL["trachea"], (T["muscle"],), threshold=0.75)
    for side in (1, -1):
        bbox = g.box((-0.15 * W, 0.15 * W), (y_trachea - 40, y_trachea + 40), (470, 540))
        bronchus = tube_level(g, bbox, [470, 500, 535], [side * 0.11 * W, side * 0.06 * W, side * 5],
                              [y_trachea] * 3, [7, 7, 7], [7, 7, 7])
        g.paint(bronchus, bbox, T["airway"], 0, INTERIOR + (T["lung"],))
        c, r = jitter(s, (side * 20, y_trachea + 8, 650), (10, 14, 24), shift=(3, 3, 8))
        thbox = g.box((c[0] - 30, c[0] + 30), (c[1] - 30, c[1] + 30), (c[2] - 40, c[2] + 40))
        g.paint(blob_level(g, thbox, c, r), thbox, T["thyroid"], LBL["thyroid"], INTERIOR)


def paint_blobs(g: Grid, s: Subject, parts, tissue: int, label: int, allowed, domes=None,
                modulation: float = 0.1, shift=(8.0, 7.0, 12.0)) -> tuple[tuple, np.ndarray]:
    """Paint a union of jittered blobs [(centre, radii, angle), ...] sharing one organ translation (the
    others get small extra offsets), clipped below the diaphragm when `domes`; returns (box, level)."""
    rng = s.rng
    shift = rng.normal(0, shift).astype(np.float32)
    placed = []
    for i, (centre, radii, angle) in enumerate(parts):
        c, r = jitter(s, centre, radii, shift=(3.0, 3.0, 4.0) if i else (0.1, 0.1, 0.1))
        placed.append((c + shift, r, angle + rng.normal(0, 0.15)))
    lo = np.min([c - 1.5 * r.max() for c, r, _ in placed], axis=0)
    hi = np.max([c + 1.5 * r.max() for c, r, _ in placed], axis=0)
    box = g.box((lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2]))
    level = np.min([blob_level(g, box, c, r, a, shape_modulation(rng, modulation)) for c, r, a in placed],
                   axis=0)
    if domes is not None:
        level = np.where(g.pz[box] < diaphragm(g.px[box], g.py[box], domes, s.width), level, 2)
    g.paint(level, box, tissue, label, allowed)
    return box, level


def paint_abdomen(g: Grid, s: Subject, domes, y_spine: float) -> None:
    """Stomach, pancreas, liver, gallbladder, spleen, kidneys, adrenals, bladder, psoas, vessels."""
    W, D, rng = s.width, s.depth, s.rng
    box, level = paint_blobs(g, s, [((-0.12 * W, 0.2 * D, 395), (55, 42, 55), 0.3)], T["bowel_wall"], 0,
                             INTERIOR, domes)
    inside = (level < 0.85) & (g.tissue[box] == T["bowel_wall"])
    g.tissue[box][inside] = T["bowel_content"]
    g.tissue[box][inside & (g.py[box] > np.float32(0.2 * D + 15))] = T["gas"]
    paint_blobs(g, s, [((0.06 * W, 0.1 * D, 318), (24, 20, 28), 0.0),
                       ((-0.07 * W, 0.12 * D, 330), (36, 14, 18), 0.2),
                       ((-0.2 * W, 0.03 * D, 342), (30, 13, 16), 0.6)], T["pancreas"], LBL["pancreas"],
                INTERIOR)
    left_lobe, tip = rng.uniform(0.6, 1.25), rng.uniform(0.5, 1.3)      # variable lobe sizes
    paint_blobs(g, s, [((0.17 * W, 0.05 * D, 380), (0.21 * W, 0.3 * D, 75), 0.0),
                       ((-0.06 * W, 0.22 * D, 410), (0.2 * W * left_lobe, 0.13 * D, 45), -0.2),
                       ((0.24 * W, 0.02 * D, 310), (0.11 * W * tip, 0.2 * D, 55 * tip), 0.0)],
                T["liver"], LBL["liver"], INTERIOR, domes, modulation=0.14, shift=(15.0, 13.0, 12.0))
    paint_blobs(g, s, [((0.17 * W, 0.2 * D, 318), (17, 24, 34), 0.3)], T["gallbladder"], LBL["gallbladder"],
                INTERIOR)
    box, level = paint_blobs(g, s, [((-0.32 * W, -0.11 * D, 385), (58, 30, 55), 0.8)], T["spleen"],
                             LBL["spleen"], INTERIOR, domes, modulation=0.12)
    for side, name, fx, z in ((1, "right", 0.17, 265), (-1, "left", -0.22, 282)):
        index = LBL[f"kidney_{name}"]
        box, level = paint_blobs(g, s, [((fx * W, -0.10 * D, z), (31, 28, 55), side * -0.5)],
                                 T["kidney_cortex"], index, INTERIOR, modulation=0.07)
        medulla = (level < 0.72) & (g.label[box] == index)
        g.tissue[box][medulla] = T["kidney_medulla"]
        hilum_c = np.array([fx * W - side * 26, -0.10 * D + 8, z]) + rng.normal(0, 2, 3)
        level = blob_level(g, box, hilum_c.astype(np.float32), np.float32([13, 12, 24]))
        g.paint(level, box, T["sinus_fat"], 0, (T["kidney_cortex"], T["kidney_medulla"]))
        paint_blobs(g, s, [((side * (0.08 if side > 0 else 0.13) * W, -0.01 * D, z + 68), (6, 15, 22),
                            side * 0.6)],
                    T["adrenal"], LBL[f"adrenal_{name}"], INTERIOR, modulation=0.05)
        knots = np.array([45, 110, 180, 250, 300, 335]) + rng.normal(0, 8)
        scale = np.float32(np.exp(rng.normal(0, 0.1)) * (W / 345) ** 0.7)
        cx = side * np.array([0.21, 0.16, 0.12, 0.09, 0.07, 0.06]) * W + rng.normal(0, 7)
        cy = np.array([0.0, -0.04, -0.07, -0.09, -0.10, -0.10]) * D + rng.normal(0, 7)
        rx, ry = np.array([18, 21, 21, 15, 9, 5]) * scale, np.array([20, 22, 21, 19, 15, 8]) * scale
        pbox = g.box((min(cx) - 40, max(cx) + 40), (min(cy) - 40, max(cy) + 40), (knots[0], knots[-1]))
        g.paint(tube_level(g, pbox, knots, cx, cy, rx, ry), pbox, T["psoas"], LBL[f"psoas_{name}"], INTERIOR)
    paint_blobs(g, s, [((0, 0.15 * D, 45), np.array([45, 35, 38]) * rng.uniform(0.7, 1.2), 0.0)],
                T["bladder"], LBL["urinary_bladder"], INTERIOR, modulation=0.06)
    paint_blobs(g, s, [((0, -0.12 * D, 60), (20, 18, 45), 0.0)], T["bowel_content"], 0, INTERIOR)
    # aorta, iliac arteries and inferior vena cava (not among the labelled organs except the aorta)
    ya, r_a = y_spine + 32 + rng.normal(0, 4), 12 * rng.uniform(0.85, 1.2)
    abox = g.box((-0.15 * W, 0.1 * W), (ya - 40, ya + 40), (200, 580))
    g.paint(tube_level(g, abox, [210, 300, 420, 520, 560], [-0.04 * W] * 3 + [-0.07 * W] * 2,
                       [ya, ya, ya - 5, ya - 12, ya - 12], [r_a] * 5, [r_a] * 5),
            abox, T["aorta"], LBL["aorta"], INTERIOR + (T["lung"],))
    for side in (1, -1):
        ibox = g.box((-0.25 * W, 0.25 * W), (ya - 50, ya + 30), (40, 240))
        g.paint(tube_level(g, ibox, [50, 140, 225], [side * 0.16 * W, side * 0.09 * W, -0.03 * W],
                           [ya - 22, ya - 7, ya], [7, 7, 8], [7, 7, 8]), ibox, T["aorta"], 0, INTERIOR)
    vbox = g.box((0, 0.2 * W), (ya - 40, ya + 50), (180, 480))
    g.paint(tube_level(g, vbox, [190, 300, 440, 475], [0.07 * W] * 4, [ya + 3, ya + 5, ya + 15, ya + 15],
                       [15] * 4, [11] * 4), vbox, T["ivc"], 0, INTERIOR)


def paint_skeleton(g: Grid, s: Subject, depth: np.ndarray, y_spine: float) -> None:
    """Vertebrae (L1 labelled), discs, canal, sacrum, iliac wings, femoral heads, ribs and sternum."""
    W, D, rng = s.width, s.depth, s.rng
    box = g.box((-0.17 * W, 0.17 * W), (y_spine - 110, y_spine + 40), (-40, 720))
    px, py, pz = g.px[box], g.py[box], g.pz[box]
    ys = y_spine + 10 * np.exp(-((pz - 200) / 120) ** 2) - 10 * np.exp(-((pz - 520) / 100) ** 2)
    flat = pz.reshape(-1)
    rx = np.interp(flat, [0, 300, 450, 700], [25, 23, 17, 13]).reshape(pz.shape)
    ry = np.interp(flat, [0, 300, 450, 700], [19, 18, 15, 12]).reshape(pz.shape)
    bottom, height = 105 + rng.normal(0, 8), 34 * rng.uniform(0.92, 1.08)
    level_index = np.floor((pz - bottom) / height)
    frac = (pz - bottom) / height - level_index
    bone_part = frac < 0.78
    body = np.sqrt((px / rx) ** 2 + ((py - ys) / ry) ** 2)
    yc = ys - ry - 10
    canal_r = np.sqrt(px * px + (py - yc) ** 2)
    spinal = pz > bottom - 10
    arch = bone_part & spinal & (canal_r > 9) & (canal_r < 17) & (py < ys - ry + 3)
    spinous = bone_part & spinal & (frac > 0.1) & (np.abs(px) < 4) & (py < yc - 10) & (py > yc - 48)
    transverse = bone_part & spinal & (frac > 0.3) & (frac < 0.6) & (np.abs(py - yc - 3) < 5) & \
        (np.abs(px) < np.float32(0.12 * W + 8))
    vertebra = (spinal & bone_part & (body < 1)) | arch | spinous | transverse
    l1 = vertebra & (level_index == 4)
    g.paint(np.where(spinal & ~bone_part & (body < 1), 0, 2), box, T["disc"], 0)
    g.paint(np.where(vertebra, 0, 2), box, T["cortical_bone"], 0)
    g.paint(np.where(spinal & bone_part & (body < 0.8), 0, 2), box, T["marrow"], 0)
    g.paint(np.where(spinal & (canal_r < 9), 0, 2), box, T["csf"], 0)
    g.label[box][l1] = LBL["lumbar_vertebra_1"]
    for centre, radii, angle in (((0, y_spine - 15, 60), (45, 14, 50), 0.0),
                                 ((0.3 * W, -0.12 * D, 110), (10, 55, 50), 0.6),
                                 ((-0.3 * W, -0.12 * D, 110), (10, 55, 50), -0.6),
                                 ((0.3 * W, 0.0, 5), (24, 24, 24), 0.0),
                                 ((-0.3 * W, 0.0, 5), (24, 24, 24), 0.0)):
        c, r = jitter(s, centre, radii, shift=(4, 4, 6), scale_sd=0.05)
        bbox = g.box((c[0] - 80, c[0] + 80), (c[1] - 80, c[1] + 80), (c[2] - 70, c[2] + 70))
        level = blob_level(g, bbox, c, r, angle)
        g.paint(level, bbox, T["cortical_bone"], 0, INTERIOR + (T["muscle"], T["back_muscle"]))
        g.paint(level, bbox, T["marrow"], 0, (T["cortical_bone"],), threshold=0.75)
    # ribs: a band just inside the muscle wall, oblique, ending higher at the front (costal margin)
    rbox = g.box((-W / 2, W / 2), (-D / 2, D / 2), (280, 640))
    px, py, pz, d = g.px[rbox], g.py[rbox], g.pz[rbox], depth[rbox]
    inner = np.float32(s.fat + s.wall)
    phase = (pz + 0.9 * np.abs(py) + 0.3 * np.abs(px) + rng.uniform(0, 30)) / 30.0
    rib = (d > inner - 4) & (d < inner + 5) & (phase - np.floor(phase) < 0.3) & \
        (pz > 300 + 130 * np.clip(py / (0.5 * D), 0, 1)) & (np.abs(px) > 25)
    g.paint(np.where(rib, 0, 2), rbox, T["cortical_bone"], 0, INTERIOR + (T["muscle"], T["back_muscle"]))
    sbox = g.box((-30, 30), (0, D / 2), (420, 640))
    front = body_profile(g.pz[sbox], s)[1] - np.float32(s.fat + s.wall)
    sternum = (np.abs(g.px[sbox]) < 15) & (np.abs(g.py[sbox] - front + 4) < 7) & (g.pz[sbox] > 430) & \
        (g.pz[sbox] < 615)
    g.paint(np.where(sternum, 0, 2), sbox, T["marrow"], LBL["sternum"])


def render_subject(rng: np.random.Generator, size: int, n_slices: int):
    """One subject: (image X x Y x Z int16 HU, label X x Y x Z uint8, canonical affine 4 x 4, Subject)."""
    s = sample_subject(rng, size, n_slices)
    g = make_grid(s)
    W, D = s.width, s.depth
    depth = paint_body(g, s)
    domes = (455 + rng.normal(0, 12), 440 + rng.normal(0, 12))
    y_spine = -0.17 * D + rng.normal(0, 4)
    cell = max(1, int(round(8.0 / s.spacing[0])))
    field = smooth_field(rng, s.shape, cell, sigma=0.9, sigma_z=max(0.5, 8.0 / s.spacing[2]))
    bowel = (g.tissue == T["cavity_fat"]) & (g.pz > 15) & (g.pz < 420) & (g.py > np.float32(y_spine + 35))
    g.tissue[bowel & (field > 0.1)] = T["bowel_wall"]
    g.tissue[bowel & (field > 0.3)] = T["bowel_content"]
    g.tissue[bowel & (field > rng.uniform(1.3, 2.5))] = T["gas"]
    for side in (1, -1):
        box = g.box((-0.3 * W, 0.3 * W), (-D / 2, 0), (-50, 700))
        level = tube_level(g, box, [-60, 300, 600, 720], [side * 0.11 * W] * 4, [-0.31 * D] * 4,
                           [40, 42, 35, 25], [25, 25, 22, 15])
        g.paint(level, box, T["back_muscle"], 0, INTERIOR + (T["muscle"],))
    paint_thorax(g, s, depth, domes, y_spine)
    paint_abdomen(g, s, domes, y_spine)
    paint_skeleton(g, s, depth, y_spine)
    del depth
    base = (np.array([hu for _, hu, _ in TISSUES], np.float32) + s.hu_jitter)[g.tissue]
    texture = rng.standard_normal(s.shape, dtype=np.float32)
    texture = ndimage.gaussian_filter(texture, sigma=(0.9, 0.9, 0.4))
    texture *= np.float32(1.0 / (texture.std() + 1e-6))
    image = base + np.array([amp for _, _, amp in TISSUES], np.float32)[g.tissue] * texture
    image[(g.tissue == T["liver"]) & (np.abs(field) < 0.035)] += 60         # portal/hepatic vessels
    image[(g.tissue == T["lung"]) & (np.abs(field - 0.5) < 0.05)] = -60      # pulmonary vessels
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))           # partial-volume blur
    image += rng.standard_normal(s.shape, dtype=np.float32) * np.float32(s.noise)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    affine = np.diag([*s.spacing, 1.0])
    affine[:3, 3] = [-(s.shape[0] - 1) / 2 * s.spacing[0], -(s.shape[1] - 1) / 2 * s.spacing[1], s.z0 - 600.0]
    return image, g.label, affine, s


def storage_orientation(array: np.ndarray, affine: np.ndarray, lps: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine as stored: unchanged (RAS) or with axes 0 and 1 flipped (LPS)."""
    if not lps:
        return array, affine
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine @ flip


SILVER_FIRST_PID, GOLD_FIRST_PID = 10001000, 10000130   # gold includes 10000132, the paper's support id
CORPORA = {"SilverCorpus": (0, SILVER_FIRST_PID), "GoldCorpus": (1, GOLD_FIRST_PID)}


def write_subject(task: tuple) -> tuple[str, str, np.ndarray | None, dict]:
    """Render and write one subject, task = (root, corpus, index, seed, size, n_slices, keep_label); returns
    (corpus, pid, canonical label or None, info). It depends only on (seed, corpus, index)."""
    root, corpus, index, seed, size, n_slices, keep_label = task
    code, first = CORPORA[corpus]
    rng = np.random.default_rng([seed, code, index])
    image, label, affine, subject = render_subject(rng, size, n_slices)
    pid = str(first + index)
    folder = Path(root) / corpus
    stored, stored_affine = storage_orientation(image, affine, subject.lps)
    save_nifti_atomic(stored, stored_affine, folder / "Volumes" / volume_filename(pid))
    present = np.flatnonzero(np.bincount(label.reshape(-1), minlength=len(STRUCTURES) + 1))
    for structure in present[present > 0]:
        mask, _ = storage_orientation((label == structure).astype(np.uint8), affine, subject.lps)
        save_nifti_atomic(mask, stored_affine,
                          folder / "Segmentations" / mask_filename(pid, STRUCTURES[structure][1]))
    info = {"shape": list(image.shape), "spacing": [round(float(v), 3) for v in subject.spacing],
            "orientation": "LPS" if subject.lps else "RAS", "structures": int((present > 0).sum())}
    return corpus, pid, (label if keep_label else None), info


DEMO_DIR = Path("data/phantom")                      # the phantom `make demo` writes and other tools reuse
DEMO = {"n_silver": 20, "n_gold": 6, "seed": 2021}   # its scans and seed

def generate_phantom(out: str | Path, n_silver: int, n_gold: int, seed: int, size: int = 256,
                     n_slices: int = 64, workers: int = 2, overwrite: bool = False) -> dict:
    """Write a VISCERAL-layout phantom to `out` atomically; returns {"cases": {pid: info}, "gold_labels":
    {pid: X x Y x Z uint8 canonical}}."""
    if n_silver < 1 or n_gold < 2:
        raise UserError(f"phantom: n_silver {n_silver} / n_gold {n_gold}: need at least 1 silver and 2 gold "
                        "volumes (one support, one query)")
    if seed < 0:
        raise UserError(f"phantom: seed {seed} is negative: use --seed >= 0")
    if size < 32 or n_slices < 8:
        raise UserError(f"phantom: size {size} / slices {n_slices} too small: use --size >= 32 and --slices "
                        ">= 8")
    with atomic_folder(out, overwrite) as partial:
        for corpus in CORPORA:
            for sub in ("Volumes", "Segmentations"):
                (partial / corpus / sub).mkdir(parents=True)
        tasks = [(str(partial), "SilverCorpus", i, seed, size, n_slices, False) for i in range(n_silver)]
        tasks += [(str(partial), "GoldCorpus", i, seed, size, n_slices, True) for i in range(n_gold)]
        if workers > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else None)
            with context.Pool(min(workers, len(tasks))) as pool:
                results = pool.map(write_subject, tasks, chunksize=1)
        else:
            results = [write_subject(task) for task in tasks]
    return {"cases": {pid: dict(info, corpus=corpus) for corpus, pid, _, info in results},
            "gold_labels": {pid: label for corpus, pid, label, _ in results if label is not None}}
