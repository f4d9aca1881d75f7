"""Image datasets for Stable-MoE training, read from their official on-disk formats.

Two layers:

- *format readers* (``read_idx``, ``read_cifar10_batches``, ``read_cifar10_jpeg_zip``,
  ``read_cifar100``, ``read_svhn``) take a path and return raw ``uint8`` arrays in NHWC plus integer
  labels, exactly as stored;
- :func:`load_dataset` picks a dataset by name, optionally subsamples (stratified, seeded, so runs
  stay fast on small CPUs), scales to [0, 1], standardises per channel with the *training* statistics
  and returns float32 NCHW tensors in an :class:`ImageDataset`.

Where the files are: each dataset is a sub-folder of the data root (:mod:`edgemoe.paths`:
``--data-dir``, else ``$EDGEMOE_DATA``, else ``~/.local/share/edgemoe``), e.g. ``<root>/cifar10``;
Fashion-MNIST is also found where the Debian package ``dataset-fashion-mnist`` installs it. A missing
or malformed file raises :class:`~edgemoe.errors.DataError` naming the file, where it goes and how
to obtain it. Nothing is downloaded. Decoded JPEG arrays are memoised in memory only (never written to disk).
"""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from edgemoe.config import check_choice
from edgemoe.errors import ConfigError, DataError
from edgemoe.paths import dataset_dir, require_path

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "svhn")

# Where the Debian package dataset-fashion-mnist installs the four IDX files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# How to obtain each dataset that is not bundled (scikit-learn ships ``digits``).
HOW_TO_OBTAIN: dict[str, str] = {
    "fashion-mnist": (
        "Install the Debian package dataset-fashion-mnist (it puts the 4 IDX files in "
        f"{SYSTEM_FASHION_MNIST}) or copy train/t10k-images/labels-idx*-ubyte[.gz] from "
        "github.com/zalandoresearch/fashion-mnist."
    ),
    "cifar10": (
        "Unpack cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html (the "
        "cifar-10-batches-py/ folder), or put a cifar10_jpeg.zip laid out train|test/<class>/NNNN.jpg."
    ),
    "cifar100": "Unpack cifar-100-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html.",
    "svhn": "Copy train_32x32.mat and test_32x32.mat from ufldl.stanford.edu/housenumbers.",
}

FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_JPEG_ZIP = "cifar10_jpeg.zip"
CIFAR10_PY_DIR = "cifar-10-batches-py"
CIFAR100_PY_DIR = "cifar-100-python"

Split = Literal["train", "test"]


@dataclass(frozen=True)
class ImageDataset:
    """A train/test pair of standardised float32 NCHW images with integer labels."""

    name: str
    x_train_NCHW: torch.Tensor
    y_train_N: torch.Tensor
    x_test_NCHW: torch.Tensor
    y_test_N: torch.Tensor
    classes: tuple[str, ...]

    @property
    def in_channels(self) -> int:
        return int(self.x_train_NCHW.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train_NCHW.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _missing(path: Path, what: str, hint: str) -> DataError:
    return DataError(str(path), f"{what} not found; {hint}")


# --------------------------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        if gz.is_file():
            path = gz
        else:
            raise _missing(path, "IDX file", "put the official file (optionally .gz) there")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(str(path), "not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(str(path), f"unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(
            str(path), f"IDX header says shape {shape} but holds {data.size} elements (truncated?)"
        )
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))


def read_fashion_mnist(root: str | Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX files under ``root`` -> (uint8 [N, 28, 28, 1], int64 [N])."""
    root = Path(root)
    if not root.is_dir():
        raise _missing(
            root,
            "Fashion-MNIST directory",
            HOW_TO_OBTAIN["fashion-mnist"],
        )
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte")
    if images.shape[0] != labels.shape[0]:
        raise DataError(str(root), f"{images.shape[0]} images but {labels.shape[0]} labels for {split}")
    return images.astype(np.uint8)[..., None], labels.astype(np.int64)


# ------------------------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise _missing(path, "CIFAR pickle", hint)
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _rows_to_nhwc(data: np.ndarray) -> np.ndarray:
    """CIFAR rows of 3072 bytes (R plane, G plane, B plane, each 32x32) -> uint8 NHWC."""
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar10_batches(root: str | Path, split: Split) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Official ``cifar-10-batches-py`` pickles -> (uint8 [N, 32, 32, 3], int64 [N], class names)."""
    root = Path(root)
    hint = f"put the official {CIFAR10_PY_DIR}/ folder (data_batch_1..5, test_batch, batches.meta) there"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        batch = _unpickle(root / name, hint)
        xs.append(_rows_to_nhwc(batch[b"data"]))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    meta_path = root / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta_path.is_file():
        classes = tuple(c.decode() for c in _unpickle(meta_path, hint)[b"label_names"])
    return np.concatenate(xs), np.concatenate(ys), classes


def _decode_jpeg(blob: bytes) -> np.ndarray:
    from PIL import Image  # Pillow ships with matplotlib; imported lazily

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _decoded_jpeg_zip(
    path: str, split: str, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with zipfile.ZipFile(path) as zf:
        members = [n for n in zf.namelist() if n.startswith(f"{split}/") and n.lower().endswith(".jpg")]
        if not members:
            raise DataError(str(path), f"no {split}/<class>/NNNN.jpg entries")
        classes = tuple(sorted({m.split("/")[1] for m in members}))
        members.sort()
        labels = np.array([classes.index(m.split("/")[1]) for m in members], dtype=np.int64)
        keep = _stratified_indices(labels, limit, seed)
        images = np.stack([_decode_jpeg(zf.read(members[i])) for i in keep])
    labels = labels[keep]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, classes


def read_cifar10_jpeg_zip(
    path: str | Path, split: Split, *, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-10 as a JPEG zip laid out ``train|test/<class>/NNNN.jpg`` -> (uint8 NHWC, int64, classes).

    Only the (stratified, seeded) ``limit`` images are decoded. Results are memoised in memory so
    repeated loads in one process do not decode again; the returned arrays are read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "CIFAR-10 JPEG zip", "pass --data-dir pointing at the zip or its folder")
    return _decoded_jpeg_zip(str(path.resolve()), split, limit, seed)


def read_cifar100(
    root: str | Path, split: Split
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Official ``cifar-100-python`` pickles -> (uint8 NHWC, fine labels, coarse labels, fine names, coarse names)."""
    root = Path(root)
    hint = f"put the official {CIFAR100_PY_DIR}/ folder (train, test, meta) there"
    batch = _unpickle(root / split, hint)
    meta = _unpickle(root / "meta", hint)
    fine = tuple(c.decode() for c in meta[b"fine_label_names"])
    coarse = tuple(c.decode() for c in meta[b"coarse_label_names"])
    return (
        _rows_to_nhwc(batch[b"data"]),
        np.asarray(batch[b"fine_labels"], dtype=np.int64),
        np.asarray(batch[b"coarse_labels"], dtype=np.int64),
        fine,
        coarse,
    )


# -------------------------------------------------------------------------------------------- SVHN


def read_svhn(root: str | Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Official SVHN ``{train,test}_32x32.mat`` -> (uint8 [N, 32, 32, 3], int64 [N]); label 10 -> 0."""
    from scipy.io import loadmat

    path = Path(root) / f"{split}_32x32.mat"
    if not path.is_file():
        raise _missing(path, "SVHN file", "put the official train_32x32.mat / test_32x32.mat there")
    mat = loadmat(path)
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels


# ------------------------------------------------------------------------------------------ digits


def read_digits(split: Split, *, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 [N, 8, 8, 1], fixed stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images) * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
    mask = test if split == "test" else ~test
    return images[mask], labels[mask]


# ----------------------------------------------------------------------------------------- loading


def _stratified_indices(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of size ``limit`` (all when ``limit`` is None)."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    # Round-robin over classes in random order: balanced up to rounding, deterministic per seed.
    rank = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    key = rank * (n + 1) + np.argsort(order)
    return np.sort(np.argsort(key, kind="stable")[:limit])


def _holds_files(name: str, path: Path) -> bool:
    """Whether ``path`` holds dataset ``name``'s files (in any layout its reader accepts)."""
    markers = {
        "fashion-mnist": ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"),
        "cifar10": (CIFAR10_JPEG_ZIP, CIFAR10_PY_DIR, "data_batch_1", "test_batch"),
        "cifar100": (CIFAR100_PY_DIR, "train"),
        "svhn": ("train_32x32.mat", "test_32x32.mat"),
    }[name]
    return (name == "cifar10" and path.suffix == ".zip" and path.is_file()) or any(
        (path / m).exists() for m in markers
    )


def dataset_root(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder (or zip) holding dataset ``name``'s files.

    ``data_dir`` is the data root (files in ``<data_dir>/<name>``) or the dataset's own folder; without
    it the root comes from :func:`edgemoe.paths.data_root`. Fashion-MNIST is also looked for where
    the Debian package installs it. The first place holding the files wins; if none does, the first
    that exists (so the reader names the missing file), else ``<root>/<name>`` (for the error). A
    ``data_dir`` that does not exist is returned as is: a mistyped folder is an error, not a fallback.
    """
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        return Path(data_dir).expanduser()
    if data_dir is not None:
        candidates = [Path(data_dir).expanduser() / name, Path(data_dir).expanduser()]
    else:
        candidates = [dataset_dir(name)]
    if name == "fashion-mnist":
        candidates.append(SYSTEM_FASHION_MNIST)
    for path in candidates:
        if _holds_files(name, path):
            return path
    return next((p for p in candidates if p.exists()), candidates[0])


def _read_raw(
    name: str, root: Path | None, split: Split, limit: int | None, seed: int, label: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if name == "digits":
        x, y = read_digits(split)
        return x, y, tuple(str(i) for i in range(10))
    if root is None:
        raise ConfigError("data.data_dir", f"dataset {name!r} needs a data folder")
    if name == "fashion-mnist":
        x, y = read_fashion_mnist(root, split)
        return x, y, FASHION_CLASSES
    if name == "svhn":
        x, y = read_svhn(root, split)
        return x, y, tuple(str(i) for i in range(10))
    if name == "cifar100":
        folder = root / CIFAR100_PY_DIR if (root / CIFAR100_PY_DIR).is_dir() else root
        x, fine, coarse, fine_names, coarse_names = read_cifar100(folder, split)
        return (x, fine, fine_names) if label == "fine" else (x, coarse, coarse_names)
    # cifar10: the pickle folder if present, else the JPEG zip (root may be the zip itself).
    if root.suffix == ".zip" or (root / CIFAR10_JPEG_ZIP).is_file():
        zpath = root if root.suffix == ".zip" else root / CIFAR10_JPEG_ZIP
        return read_cifar10_jpeg_zip(zpath, split, limit=limit, seed=seed)
    for folder in (root / CIFAR10_PY_DIR, root):
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            return read_cifar10_batches(folder, split)
    raise _missing(
        root,
        "CIFAR-10 data",
        f"put {CIFAR10_JPEG_ZIP} (train|test/<class>/NNNN.jpg) or the official {CIFAR10_PY_DIR}/ pickles there",
    )


def to_float_nchw(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images_NHWC)).float().div_(255.0)
    return x.permute(0, 3, 1, 2).contiguous()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    label: Literal["fine", "coarse"] = "fine",
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as standardised float32 NCHW tensors.

    ``train_subset``/``test_subset`` keep a seeded class-balanced subset (for speed); ``label``
    picks CIFAR-100's fine (100) or coarse (20) labels. Standardisation uses train-split statistics.
    """
    check_choice(name, "data.name", DATASETS)
    check_choice(label, "data.label", ("fine", "coarse"))
    for field, value in (("data.train_subset", train_subset), ("data.test_subset", test_subset)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(field, f"must be a positive integer or null, got {value!r}")
    root = None if name == "digits" else dataset_root(name, data_dir)
    if root is not None:
        require_path(root, f"data directory for {name!r}", HOW_TO_OBTAIN[name])
    splits = {}
    plan: tuple[tuple[Split, int | None, int], ...] = (
        ("train", train_subset, seed),
        ("test", test_subset, seed + 1),
    )
    for split, limit, split_seed in plan:
        x, y, classes = _read_raw(name, root, split, limit, split_seed, label)
        keep = _stratified_indices(y, limit, split_seed)
        splits[split] = (to_float_nchw(x[keep]), torch.from_numpy(np.array(y[keep], dtype=np.int64)))
    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    mean_C = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std_C = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return ImageDataset(
        name=name,
        x_train_NCHW=(x_train - mean_C) / std_C,
        y_train_N=y_train,
        x_test_NCHW=(x_test - mean_C) / std_C,
        y_test_N=y_test,
        classes=tuple(classes),
    )


def patchify(x_NCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch``x``patch`` patches -> tokens [N, P, C*patch*patch] (ViT style)."""
    n, c, h, w = x_NCHW.shape
    if h % patch or w % patch:
        raise ConfigError("model.patch", f"must divide the image size {h}x{w}, got {patch}")
    x = x_NCHW.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)
