"""Every dataset loader on tiny files written in the dataset's exact official format."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from edgemoe.errors import ConfigError, DataError
from edgemoe.train import data as D


def _write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def _images(n: int, h: int, w: int, c: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _rows(images_NHWC: np.ndarray) -> np.ndarray:
    return images_NHWC.transpose(0, 3, 1, 2).reshape(len(images_NHWC), -1)


def _pickle(path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    tr, te = _images(12, 28, 28, 1, 0)[..., 0], _images(6, 28, 28, 1, 1)[..., 0]
    ytr, yte = np.arange(12) % 10, np.arange(6) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", tr, gz=gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz=gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz=gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte, gz=gz)
    x, y = D.read_fashion_mnist(tmp_path, "train")
    assert np.array_equal(x[..., 0], tr) and np.array_equal(y, ytr)
    ds = D.load_dataset("fashion-mnist", tmp_path)
    assert ds.x_train_NCHW.shape == (12, 1, 28, 28) and ds.x_test_NCHW.shape == (6, 1, 28, 28)
    assert ds.x_train_NCHW.dtype == torch.float32 and ds.num_classes == 10
    assert torch.equal(ds.y_test_N, torch.from_numpy(yte))
    # standardised with train statistics
    assert abs(float(ds.x_train_NCHW.mean())) < 1e-4


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "x"
    _write_idx(path, _images(4, 5, 5, 1, 0)[..., 0], gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        D.read_idx(path)


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    train = []
    for i in range(1, 6):
        imgs = _images(3, 32, 32, 3, i)
        train.append(imgs)
        _pickle(root / f"data_batch_{i}", {b"data": _rows(imgs), b"labels": [i, i + 1, i + 2]})
    test = _images(4, 32, 32, 3, 9)
    _pickle(root / "test_batch", {b"data": _rows(test), b"labels": [0, 1, 2, 3]})
    _pickle(root / "batches.meta", {b"label_names": [c.encode() for c in D.CIFAR10_CLASSES]})
    x, y, classes = D.read_cifar10_batches(root, "train")
    assert np.array_equal(x, np.concatenate(train)) and x.shape == (15, 32, 32, 3)
    assert list(y[:3]) == [1, 2, 3] and classes[0] == "airplane"
    ds = D.load_dataset("cifar10", tmp_path)
    assert ds.x_train_NCHW.shape == (15, 3, 32, 32) and ds.y_test_N.tolist() == [0, 1, 2, 3]


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_cifar10_jpeg_zip_with_subset(tmp_path):
    zpath = tmp_path / "cifar10_jpeg.zip"
    flat = np.full((32, 32, 3), 0, dtype=np.uint8)
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, n in (("train", 4), ("test", 2)):
            for ci, cls in enumerate(("cat", "dog", "ship")):
                for k in range(n):
                    zf.writestr(f"{split}/{cls}/{k:04d}.jpg", _jpeg(flat + 40 * ci + k))
    x, y, classes = D.read_cifar10_jpeg_zip(zpath, "train")
    assert classes == ("cat", "dog", "ship") and x.shape == (12, 32, 32, 3)
    # JPEG of a flat colour decodes to (almost) that colour, labels follow the folder
    assert np.abs(x[y == 2].astype(int).mean(axis=(1, 2, 3)) - (80 + np.arange(4))).max() <= 2
    assert not x.flags.writeable
    ds = D.load_dataset("cifar10", tmp_path, train_subset=6, test_subset=3, seed=1)
    assert ds.x_train_NCHW.shape == (6, 3, 32, 32)
    assert np.bincount(ds.y_train_N.numpy(), minlength=3).tolist() == [2, 2, 2]
    assert np.bincount(ds.y_test_N.numpy(), minlength=3).tolist() == [1, 1, 1]
    # the zip path itself is accepted too, and the same seed gives the same subset
    again = D.load_dataset("cifar10", zpath, train_subset=6, test_subset=3, seed=1)
    assert torch.equal(ds.x_train_NCHW, again.x_train_NCHW)


def test_cifar100_fine_and_coarse(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split, n, seed in (("train", 6, 0), ("test", 3, 1)):
        imgs = _images(n, 32, 32, 3, seed)
        _pickle(
            root / split,
            {
                b"data": _rows(imgs),
                b"fine_labels": list(range(n)),
                b"coarse_labels": [k % 2 for k in range(n)],
            },
        )
    _pickle(
        root / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    x, fine, coarse, fnames, cnames = D.read_cifar100(root, "train")
    assert x.shape == (6, 32, 32, 3) and fine.tolist() == list(range(6)) and coarse.tolist() == [0, 1] * 3
    assert len(fnames) == 100 and len(cnames) == 20
    assert D.load_dataset("cifar100", tmp_path).num_classes == 100
    coarse_ds = D.load_dataset("cifar100", tmp_path, label="coarse")
    assert coarse_ds.num_classes == 20 and coarse_ds.y_train_N.tolist() == [0, 1] * 3


def test_svhn_mat_label_ten_is_zero(tmp_path):
    for split, n in (("train", 5), ("test", 3)):
        imgs = _images(n, 32, 32, 3, n)
        labels = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": imgs.transpose(1, 2, 3, 0), "y": labels})
    x, y = D.read_svhn(tmp_path, "train")
    assert np.array_equal(x, _images(5, 32, 32, 3, 5)) and y.tolist() == [0, 1, 2, 0, 9]
    ds = D.load_dataset("svhn", tmp_path)
    assert ds.x_test_NCHW.shape == (3, 3, 32, 32) and ds.y_test_N.tolist() == [0, 1, 2]


def test_digits_default_needs_no_files():
    ds = D.load_dataset("digits", train_subset=100, test_subset=50)
    assert ds.x_train_NCHW.shape == (100, 1, 8, 8) and ds.x_test_NCHW.shape == (50, 1, 8, 8)
    assert ds.num_classes == 10 and set(ds.y_train_N.tolist()) == set(range(10))
    full_train, full_test = D.read_digits("train"), D.read_digits("test")
    assert len(full_train[1]) + len(full_test[1]) == 1797


def test_patchify_shapes_and_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = D.patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    assert torch.equal(tokens[0, 1].reshape(3, 2, 2), x[0, :, 0:2, 2:4])
    with pytest.raises(ConfigError, match="model.patch"):
        D.patchify(x, 3)


def test_bad_names_and_missing_files_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(ConfigError, match="data.name"):
        D.load_dataset("imagenet")
    with pytest.raises(DataError, match="data directory for 'svhn'"):
        D.load_dataset("svhn", tmp_path / "nowhere")
    with pytest.raises(DataError, match="train_32x32.mat"):
        D.load_dataset("svhn", tmp_path)
    with pytest.raises(DataError, match="cifar10_jpeg.zip"):
        D.load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        D.load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(ConfigError, match="data.train_subset"):
        D.load_dataset("digits", train_subset=0)


def test_dataset_root_follows_the_data_root_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_DATA", str(tmp_path / "env"))
    assert D.dataset_root("cifar10") == tmp_path / "env" / "cifar10"
    # --data-dir names the data root ...
    (tmp_path / "root" / "cifar10").mkdir(parents=True)
    assert D.dataset_root("cifar10", tmp_path / "root") == tmp_path / "root" / "cifar10"
    # ... or directly the folder (or zip) that holds the dataset's files.
    (tmp_path / "c10.zip").write_bytes(b"")
    assert D.dataset_root("cifar10", tmp_path / "c10.zip") == tmp_path / "c10.zip"
    monkeypatch.setattr(D, "SYSTEM_FASHION_MNIST", tmp_path / "debian")
    assert D.dataset_root("fashion-mnist") == tmp_path / "env" / "fashion-mnist"
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert D.dataset_root("fashion-mnist") == tmp_path / "debian"
    assert D.dataset_root("fashion-mnist", tmp_path / "root") == tmp_path / "debian"  # root lacks it
    (tmp_path / "env" / "fashion-mnist").mkdir(parents=True)
    (tmp_path / "env" / "fashion-mnist" / "train-images-idx3-ubyte").write_bytes(b"")
    assert D.dataset_root("fashion-mnist") == tmp_path / "env" / "fashion-mnist"  # the data root first


def test_missing_dataset_says_where_files_go_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_DATA", str(tmp_path))
    with pytest.raises(DataError) as err:
        D.load_dataset("cifar10")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'cifar10'}: data directory for 'cifar10' not found")
    assert "EDGEMOE_DATA" in message and "cifar-10-python.tar.gz" in message
