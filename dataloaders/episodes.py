"""Training episodes drawn from a prepared data folder (docs/method.md "Episodes", docs/DESIGN.md "Training").

Item i is a function of (seed, i) alone, so resume and DDP sharding give the episodes of one process. A
way whose class vanished at input_size in every support shot is redrawn with another class.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dataloaders.organs import INDEX_TO_NAME
from dataloaders.prepared import (
    open_training_neighbours,
    open_training_volume,
    read_slice_index,
    training_slices,
)
from dataloaders.transforms import augment_intensity, resize_image, resize_label
from util.errors import UserError

REDRAWS_KEY = "redraws"       # item key: ways (or superpixel draws) redrawn before the episode was complete


class EpisodeDataset(Dataset):
    """Few-shot episodes (layout: docs/DESIGN.md "Training"); item i is a dict of tensors: support_images
    N x K x C x H x W, support_fg / support_bg N x K x H x W (float 0/1), query_images Q x C x H x W,
    query_labels Q x H x W (int64, n + 1 = way n; query q belongs to way q mod N), classes N, redraws ()."""

    def __init__(self, prep_dir: str, classes: Sequence[int], n_ways: int, n_shots: int,
                 n_queries: int, input_size: int, augment: Mapping | None, seed: int,
                 length: int = 2 ** 31 - 1, input_slices: int = 1):
        self.prep_dir = prep_dir
        self.input_slices = int(input_slices)
        self.n_ways, self.n_shots, self.n_queries = int(n_ways), int(n_shots), int(n_queries)
        self.input_size = int(input_size)
        self.augment = dict(augment) if augment else None
        self.seed = int(seed)
        self.length = int(length)
        index = read_slice_index(prep_dir)
        visible, vanished = self._visible(index, [int(c) for c in classes])
        self.vanished = {INDEX_TO_NAME.get(c, str(c)): n for c, n in sorted(vanished.items())}  # name: count
        # A way needs its K supports plus at most ceil(Q / N) queries, all different slices.
        queries_per_way = -(-self.n_queries // self.n_ways)
        self.min_slices = self.n_shots + queries_per_way
        self.classes = [int(c) for c in classes if len(visible.get(int(c), ())) >= self.min_slices]
        # classes left out because too few of their slices keep them at input_size
        self.dropped = [INDEX_TO_NAME.get(int(c), str(c)) for c in classes
                        if int(c) not in self.classes and int(c) in vanished]
        if len(self.classes) < self.n_ways:
            names = ", ".join(INDEX_TO_NAME.get(int(c), str(c)) for c in classes)
            shrunk = f" (at input_size {self.input_size}: {self.vanish_report()})" if self.vanished else ""
            raise UserError(
                f"prepared data '{prep_dir}': only {len(self.classes)} of the training classes "
                f"({names}) have >= {self.min_slices} slices in index.json{shrunk}, {self.n_ways}-way "
                f"episodes need {self.n_ways}: use another fold/class_setting or re-prepare the data")
        self.slices = {c: index[c] for c in self.classes}
        self.visible = {c: visible[c] for c in self.classes}     # the slices that keep c at input_size
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        for pid in sorted({pid for entries in self.slices.values() for pid, _, _ in entries}):
            self._volume(pid)         # a missing or truncated file fails before training
        self._arrays.clear()          # maps are opened again in each process (DataLoader workers)

    def _visible(self, index: dict, classes: list[int]) -> tuple[dict, dict[int, int]]:
        """index.json's slices of `classes` that keep their class at input_size, and per class the number
        of slices that lose it (only classes that lose some)."""
        rows: dict[str, set] = {}
        for c in classes:
            for pid, row, _ in index.get(c, ()):
                rows.setdefault(pid, set()).add(int(row))
        present: dict[tuple[str, int], np.ndarray] = {}        # (pid, row) -> label values at input_size
        for pid, wanted in rows.items():
            labels = open_training_volume(self.prep_dir, pid)[1]                            # N x S x S
            if labels.shape[-1] == self.input_size:
                continue                                        # nothing is resized, nothing vanishes
            ordered = sorted(wanted)
            small = resize_label(np.asarray(labels[ordered]), self.input_size)                # R x H x W
            present.update({(pid, r): np.unique(s) for r, s in zip(ordered, small)})
        visible, vanished = dict(index), {}
        for c in classes:
            entries = index.get(c, [])
            kept = [e for e in entries if (e[0], int(e[1])) not in present or c in present[(e[0], int(e[1]))]]
            if len(kept) < len(entries):
                visible[c], vanished[c] = kept, len(entries) - len(kept)
        return visible, vanished

    def vanish_report(self) -> str:
        """One line: per class, the training slices where it vanishes at input_size."""
        parts = [f"{name} {n} slices" for name, n in self.vanished.items()]
        dropped = f"; classes left out of every draw: {', '.join(self.dropped)}" if self.dropped else ""
        return ", ".join(parts) + dropped

    def __len__(self) -> int:
        return self.length

    def _volume(self, pid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Cached memory maps of one volume: images, labels N x S x S, neighbours N x 2 x S x S or None."""
        if pid not in self._arrays:
            neighbours = open_training_neighbours(self.prep_dir, pid) if self.input_slices == 3 else None
            self._arrays[pid] = (*open_training_volume(self.prep_dir, pid), neighbours)
        return self._arrays[pid]

    def _read(self, entry: tuple[str, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One slice at input_size: (image (3 x) H x W float32, possibly augmented; label H x W int64)."""
        pid, row, _ = entry
        images, labels, neighbours = self._volume(pid)
        image = resize_image(training_slices(images, neighbours, row), self.input_size)
        label = resize_label(np.array(labels[row], dtype=np.int64), self.input_size)
        if self.augment:
            image = augment_intensity(image, self.augment, rng)
        return image, label

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        N, K, Q = self.n_ways, self.n_shots, self.n_queries
        ways = rng.choice(len(self.classes), size=N, replace=False)
        classes = np.array([self.classes[w] for w in ways], dtype=np.int64)  # N

        support_images, support_labels, queries, redraws, left_out = [], [], [None] * Q, 0, set()
        for n in range(N):
            entries = self.slices[int(classes[n])]      # way n draws its supports, then queries n, n + N, ...
            while True:
                picks = rng.choice(len(entries), size=K + len(range(n, Q, N)), replace=False)
                reads = [self._read(entries[pick], rng) for pick in picks]
                if any((label == classes[n]).any() for _, label in reads[:K]):
                    break
                # the class vanished at input_size in every shot: dropped from this episode's draw
                redraws += 1
                left_out.add(int(classes[n]))
                others = [c for c in self.classes if c not in classes and c not in left_out]
                if others:
                    classes[n] = others[rng.integers(len(others))]
                    entries = self.slices[int(classes[n])]
                elif entries is not self.visible[int(classes[n])]:
                    entries = self.visible[int(classes[n])]
                else:                                   # only an index.json naming slices without the class
                    raise UserError(f"prepared data '{self.prep_dir}': index.json lists slices without "
                                    f"{INDEX_TO_NAME.get(int(classes[n]))}: re-prepare the data")
            for j, (image, label) in enumerate(reads):
                if j < K:
                    support_images.append(image)
                    support_labels.append(label)
                else:
                    queries[n + (j - K) * N] = image, label
        query_images, query_labels = [image for image, _ in queries], [label for _, label in queries]

        size, C = self.input_size, self.input_slices
        s_labels = np.stack(support_labels).reshape(N, K, size, size)              # N x K x H x W
        s_fg = s_labels == classes[:, None, None, None]                              # N x K x H x W
        s_bg = ~np.isin(s_labels, classes)
        q_labels = np.stack(query_labels)                                            # Q x H x W
        episode_labels = np.zeros_like(q_labels)
        for n, cls in enumerate(classes):
            episode_labels[q_labels == cls] = n + 1
        return {
            "support_images": torch.from_numpy(np.stack(support_images).reshape(N, K, C, size, size)),
            "support_fg": torch.from_numpy(s_fg.astype(np.float32)),
            "support_bg": torch.from_numpy(s_bg.astype(np.float32)),
            "query_images": torch.from_numpy(np.stack(query_images).reshape(Q, C, size, size)),
            "query_labels": torch.from_numpy(episode_labels),
            "classes": torch.from_numpy(classes),
            REDRAWS_KEY: torch.tensor(redraws, dtype=torch.int64),
        }


class StepBatchSampler(Sampler):
    """Episode indices per training step start_step .. n_steps - 1: step t's global batch is t*B .. t*B +
    B - 1, of which rank r of W takes r, r + W, ... (together the episodes of a single process)."""

    def __init__(self, start_step: int, n_steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        # the config check refuses such a batch_size for torchrun's WORLD_SIZE (training/config_check.py)
        assert batch_size % world_size == 0, f"batch_size {batch_size} over {world_size} processes"
        self.start_step, self.n_steps = int(start_step), int(n_steps)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def __len__(self) -> int:
        return max(0, self.n_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.n_steps):
            first = step * self.batch_size
            yield list(range(first + self.rank, first + self.batch_size, self.world_size))
