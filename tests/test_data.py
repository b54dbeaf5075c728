"""Tests of pyrovae.data: the ImageData container, the file readers, the loaders, the bundled sample.

Real-data tests read the data root from ``PYROVAE_DATA`` (laid out like the shared data folder)
and skip when it is unset; everything else runs on the bundled sample and on small files written
to ``tmp_path``.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from pyrovae.data import (
    DATA_ENV,
    DATASETS,
    FREY_NUM_TRAIN,
    ImageData,
    load_binarized_mnist,
    load_dataset,
    load_default,
    load_fashion_mnist,
    load_frey_faces,
    load_mnist,
    read_amat,
    read_frey,
    read_idx,
    resolve_root,
)
from pyrovae.errors import ConfigError, DataError, DataNotFoundError

# Label counts of the MNIST training set, from the shared data MANIFEST.
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
# The same for the MNIST test set (the well-known t10k counts).
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data_root() -> Path:
    """The real-data root from ``PYROVAE_DATA``; skips when it is unset or not a folder."""
    root = os.environ.get(DATA_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(f"real data not available: set {DATA_ENV} to the shared data folder")
    return Path(root)


@pytest.fixture(scope="module")
def mnist_train(data_root: Path) -> ImageData:
    return load_mnist(data_root, "train", binarize="none")


@pytest.fixture(scope="module")
def mnist_test(data_root: Path) -> ImageData:
    return load_mnist(data_root, "test", binarize="none")


@pytest.fixture(scope="module")
def sample_grey() -> ImageData:
    return load_default("train", binarize="none")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write a uint8 array in IDX format (the original file layout)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_mnist(folder: Path, n: int = 5, *, seed: int = 0, gz: bool = True) -> np.ndarray:
    """Write a small MNIST-like train split (images and labels) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images, gz=gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)
    return images


# ------------------------------------------------------------------------ real data: counts
def test_mnist_train_shape_values_labels(mnist_train: ImageData) -> None:
    assert len(mnist_train) == 60000
    assert mnist_train.images.shape == (60000, 784)
    assert mnist_train.images.dtype == torch.float32
    assert mnist_train.image_shape == (28, 28)
    assert mnist_train.event_shape == (784,) and mnist_train.num_features == 784
    assert float(mnist_train.images.min()) == 0.0 and float(mnist_train.images.max()) == 1.0
    # Grey values are exactly the 8-bit pixels / 255.
    k = mnist_train.images[:100] * 255
    assert torch.equal(k, k.round())
    assert not mnist_train.is_binary
    assert mnist_train.labels is not None
    assert torch.bincount(mnist_train.labels, minlength=10).tolist() == MNIST_TRAIN_LABEL_COUNTS


def test_mnist_test_shape_and_labels(mnist_test: ImageData) -> None:
    assert mnist_test.images.shape == (10000, 784)
    assert torch.bincount(mnist_test.labels, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS


def test_mnist_default_is_dynamic(data_root: Path) -> None:
    test = load_mnist(data_root, "test")
    assert test.dynamic_binarization and test.is_binary
    x, idx = test[list(range(50))]
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert idx.tolist() == list(range(50))


def test_fashion_mnist_counts(data_root: Path) -> None:
    train = load_fashion_mnist(data_root, "train")
    test = load_fashion_mnist(data_root, "test")
    assert train.images.shape == (60000, 784) and test.images.shape == (10000, 784)
    assert not train.dynamic_binarization  # grey by default
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) == 1.0
    assert not torch.equal(train.images[:10], load_mnist(data_root, "test").images[:10])


def test_binarized_mnist_splits(data_root: Path, mnist_test: ImageData) -> None:
    sizes = {}
    for split in ("train", "valid", "test"):
        d = load_binarized_mnist(data_root, split)
        sizes[split] = tuple(d.images.shape)
        assert d.is_binary and not d.dynamic_binarization
        ones = int(d.images.sum())
        assert int((d.images == 0).sum()) + ones == d.images.numel() and 0 < ones
    assert sizes == {"train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}
    # MANIFEST: test row i binarizes MNIST t10k image argsort(labels, stable)[i]; a row has no 1
    # where the MNIST pixel is 0. This pins the row order and the pixel layout of the reader.
    test = d
    order = np.argsort(mnist_test.labels.numpy(), kind="stable")
    grey = mnist_test.images[torch.from_numpy(order)]
    assert not bool((test.images.bool() & (grey == 0)).any())
    # and the binarization is informative: ones sit on bright pixels.
    assert float(grey[test.images == 1].mean()) > 0.5 > float(grey[test.images == 0].mean())


def test_frey_faces(data_root: Path) -> None:
    all_ = load_frey_faces(data_root, "all")
    train = load_frey_faces(data_root, "train")
    test = load_frey_faces(data_root, "test")
    assert all_.images.shape == (1965, 560) and all_.image_shape == (28, 20)
    assert len(train) == FREY_NUM_TRAIN == 1765 and len(test) == 200
    assert torch.equal(torch.cat([train.images, test.images]), all_.images)
    # MANIFEST: uint8 values 8..238.
    assert float(all_.images.min()) == pytest.approx(8 / 255)
    assert float(all_.images.max()) == pytest.approx(238 / 255)
    assert not all_.is_binary
    raw = read_frey(data_root / "frey-faces" / "frey_rawface.mat")
    assert raw.shape == (1965, 28, 20) and raw.dtype == np.uint8
    ff = scipy.io.loadmat(str(data_root / "frey-faces" / "frey_rawface.mat"))["ff"]
    assert np.array_equal(raw[7].reshape(-1), ff[:, 7])


def test_load_dataset_names_with_env(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(data_root))
    assert len(load_dataset("frey-faces", "train")) == 1765
    assert len(load_dataset("binarized-mnist", "valid")) == 10000
    assert load_dataset("mnist", "test").dynamic_binarization
    assert not load_dataset("mnist", "test", binarize="none").dynamic_binarization
    assert not load_dataset("fashion-mnist", "test").dynamic_binarization


def test_bundled_sample_equals_real_mnist(
    mnist_train: ImageData, mnist_test: ImageData, sample_grey: ImageData
) -> None:
    test = load_default("test", binarize="none")
    assert torch.equal(sample_grey.images, mnist_train.images[:6000])
    assert torch.equal(sample_grey.labels, mnist_train.labels[:6000])
    assert torch.equal(test.images, mnist_test.images[:1000])
    assert torch.equal(test.labels, mnist_test.labels[:1000])


# ---------------------------------------------------------------------------- bundled sample
def test_bundled_sample_without_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    train = load_dataset("default", "train")
    test = load_dataset("default", "test")
    assert train.images.shape == (6000, 784) and test.images.shape == (1000, 784)
    assert train.image_shape == (28, 28)
    assert train.dynamic_binarization and train.is_binary
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    # The first 6000 MNIST training labels (pinned in pyrovae/_data/README.md).
    counts = [592, 671, 581, 608, 623, 514, 608, 651, 551, 601]
    assert torch.bincount(train.labels).tolist() == counts
    assert torch.bincount(test.labels).tolist() == [85, 126, 116, 107, 110, 87, 87, 99, 89, 94]
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's famous start


# ----------------------------------------------------------------------- dynamic binarization
def test_dynamic_binarization_mean_matches_intensities(sample_grey: ImageData) -> None:
    data = ImageData(sample_grey.images[:20], (28, 28), dynamic_binarization=True)
    data.generator = torch.Generator().manual_seed(1)
    draws = 2000
    x, idx = data[torch.arange(20).repeat(draws)]
    assert x.shape == (20 * draws, 784)
    assert bool(((x == 0) | (x == 1)).all())
    mean = x.reshape(draws, 20, 784).double().mean(0)
    p = data.images.double()
    std = (p * (1 - p) / draws).sqrt()
    # Every pixel within 6 binomial standard deviations (plus a little for p near 0 or 1) ...
    assert bool(((mean - p).abs() <= 6 * std + 1e-3).all())
    # ... and pixels with intensity exactly 0 or 1 are never flipped.
    assert bool((mean[p == 0] == 0).all()) and bool((mean[p == 1] == 1).all())
    # The total number of ones matches its expectation (z-score of the sum).
    z = float((mean - p).sum() / std.pow(2).sum().sqrt())
    assert abs(z) < 5


def test_dynamic_binarization_redraws_on_every_access(sample_grey: ImageData) -> None:
    data = ImageData(sample_grey.images[:64], (28, 28), dynamic_binarization=True)
    a, _ = data[list(range(64))]
    b, _ = data[list(range(64))]
    assert not torch.equal(a, b)
    # A seeded generator makes the draws reproducible.
    data.generator = torch.Generator().manual_seed(3)
    c, _ = data[list(range(64))]
    data.generator = torch.Generator().manual_seed(3)
    d, _ = data[list(range(64))]
    assert torch.equal(c, d)


def test_binarized_is_one_fixed_draw(sample_grey: ImageData) -> None:
    labels = torch.arange(100) % 10
    dyn = ImageData(sample_grey.images[:100], (28, 28), dynamic_binarization=True, name="s",
                    labels=labels)
    s1 = dyn.binarized(generator=torch.Generator().manual_seed(0))
    s2 = dyn.binarized(generator=torch.Generator().manual_seed(0))
    assert not s1.dynamic_binarization and s1.is_binary and s1.name == "s"
    assert torch.equal(s1.images, s2.images)
    assert torch.equal(s1[[0, 1]][0], s1[[0, 1]][0])  # static: the same on every access
    assert set(s1.images.unique().tolist()) == {0.0, 1.0}
    assert s1.labels is not None and torch.equal(s1.labels, labels)  # the labels come along


# -------------------------------------------------------------------------- indexing protocol
def test_batched_getitem_equals_per_item(sample_grey: ImageData) -> None:
    idx_list = [3, 1, 4, 1, 5, 9, 2, 6]
    xb, ib = sample_grey[idx_list]
    assert xb.shape == (8, 784) and ib.dtype == torch.long and ib.tolist() == idx_list
    per_item = [sample_grey[i] for i in idx_list]
    assert all(x.shape == (784,) and i.dim() == 0 for x, i in per_item)
    assert torch.equal(xb, torch.stack([x for x, _ in per_item]))
    assert torch.equal(ib, torch.stack([i for _, i in per_item]))
    # The same through a LongTensor, a numpy array and a slice.
    assert torch.equal(sample_grey[torch.tensor(idx_list)][0], xb)
    assert torch.equal(sample_grey[np.array(idx_list)][0], xb)
    xs, is_ = sample_grey[2:5]
    assert torch.equal(xs, sample_grey.images[2:5]) and is_.tolist() == [2, 3, 4]
    # Negative indices are normalised, so idx is a valid plate subsample.
    x_neg, i_neg = sample_grey[[-1]]
    assert i_neg.tolist() == [len(sample_grey) - 1]
    assert torch.equal(x_neg[0], sample_grey.images[-1])


def test_dataloader_batches_cover_the_data_once(sample_grey: ImageData) -> None:
    data = sample_grey.subset(1000)
    loader = DataLoader(
        data, sampler=BatchSampler(RandomSampler(data), 128, drop_last=False), batch_size=None
    )
    seen = []
    for x, idx in loader:
        assert x.shape == (len(idx), 784) and x.dtype == torch.float32
        assert torch.equal(x, data.images[idx])
        seen.append(idx)
    assert len(seen) == math.ceil(1000 / 128)
    assert torch.sort(torch.cat(seen)).values.tolist() == list(range(1000))


def test_out_of_range_and_bad_index_types(sample_grey: ImageData) -> None:
    n = len(sample_grey)
    for bad in (n, -n - 1, [0, n]):
        with pytest.raises(IndexError, match="out of range"):
            sample_grey[bad]
    with pytest.raises(ConfigError, match="out of range"):
        sample_grey[[n + 5]]
    with pytest.raises(ConfigError, match="cannot index"):
        sample_grey[torch.tensor([0.5, 1.0])]
    with pytest.raises(ConfigError, match="cannot index"):
        sample_grey["0"]


def test_subset_to_and_properties(sample_grey: ImageData) -> None:
    first = sample_grey.subset(10)
    assert len(first) == 10 and torch.equal(first.images, sample_grey.images[:10])
    assert torch.equal(first.labels, sample_grey.labels[:10])
    picked = sample_grey.subset(torch.tensor([5, 2, 7]))
    assert torch.equal(picked.images, sample_grey.images[[5, 2, 7]])
    assert picked[0][1].item() == 0  # re-indexed from 0
    mask = torch.zeros(len(sample_grey), dtype=torch.bool)
    mask[[1, 3]] = True
    assert torch.equal(sample_grey.subset(mask).images, sample_grey.images[[1, 3]])
    dyn = load_default("test").subset([0, 1])
    assert dyn.dynamic_binarization
    moved = first.to("cpu")
    assert isinstance(moved, ImageData) and torch.equal(moved.images, first.images)
    assert moved.image_shape == (28, 28) and moved.device.type == "cpu"
    for bad in (0, len(sample_grey) + 1):
        with pytest.raises(ConfigError, match="subset"):
            sample_grey.subset(bad)
    with pytest.raises(ConfigError):
        sample_grey.subset([])


def test_is_binary_for_static_data() -> None:
    assert ImageData(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), (2,)).is_binary
    assert not ImageData(torch.tensor([[0.0, 0.5], [1.0, 1.0]]), (2,)).is_binary
    assert ImageData(torch.tensor([[0.0, 0.5]]), (1, 2), dynamic_binarization=True).is_binary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda(sample_grey: ImageData) -> None:
    dyn = ImageData(sample_grey.images[:50], (28, 28), dynamic_binarization=True)
    dyn.generator = torch.Generator().manual_seed(0)
    gpu = dyn.to("cuda")
    x, idx = gpu[[0, 1, 2]]
    assert x.device.type == "cuda" and idx.device.type == "cuda"
    assert gpu.generator is None  # a CPU generator cannot draw on the GPU
    assert set(x.unique().tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------- ImageData errors
@pytest.mark.parametrize(
    ("images", "shape", "message"),
    [
        (torch.tensor([[0.0, 1.5]]), (2,), r"\[0, 1\]"),
        (torch.tensor([[-0.1, 0.5]]), (2,), r"\[0, 1\]"),
        (torch.tensor([[0.0, float("nan")]]), (2,), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), (2,), "NaN or infinite"),
        (torch.zeros(0, 784), (28, 28), "empty"),
        (torch.zeros(3, 28, 28), (28, 28), "2-D"),
        (torch.zeros(3, 784), (28, 20), "560 pixels"),
        (torch.zeros(3, 4, dtype=torch.uint8), (4,), "floating point"),
        ([[0.0, 1.0]], (2,), "torch.Tensor"),
    ],
)
def test_imagedata_rejects_bad_images(images, shape, message) -> None:
    with pytest.raises(DataError, match=message):
        ImageData(images, shape)


def test_imagedata_rejects_bad_image_shape() -> None:
    with pytest.raises(ConfigError, match="image_shape"):
        ImageData(torch.zeros(2, 4), (0, 4))
    with pytest.raises(ConfigError, match="image_shape"):
        ImageData(torch.zeros(2, 4), "22")


# ------------------------------------------------------------------------------- file readers
def test_read_idx_roundtrip_plain_and_gz(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        p = write_idx(tmp_path / f"x{int(gz)}", images, gz=gz)
        out = read_idx(p)
        assert out.dtype == np.uint8 and np.array_equal(out, images)
        out[0, 0, 0] = 7  # writable
    labels = read_idx(write_idx(tmp_path / "y.gz", np.array([3, 1, 2])))
    assert labels.tolist() == [3, 1, 2]


def test_truncated_idx_is_a_data_error(tmp_path: Path) -> None:
    full = np.zeros((10, 28, 28), dtype=np.uint8)
    p = write_idx(tmp_path / "train-images-idx3-ubyte", full, gz=False)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(p)
    assert "train-images-idx3-ubyte" in str(info.value) and "re-download" in str(info.value)


def test_truncated_gzip_is_a_data_error(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.ones((50, 28, 28), np.uint8) * 7)
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_garbage_files_are_data_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(garbage)
    fake_gz = tmp_path / "fake.gz"
    fake_gz.write_bytes(b"hello world, not gzip")
    with pytest.raises(DataError, match="not gzip"):
        read_idx(fake_gz)
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        read_frey(garbage)
    with pytest.raises(DataError, match="0/1|fields"):
        read_amat(garbage)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


def test_mat_without_ff_or_wrong_shape(tmp_path: Path) -> None:
    no_ff = tmp_path / "no_ff.mat"
    scipy.io.savemat(str(no_ff), {"faces": np.zeros((560, 3), np.uint8)})
    with pytest.raises(DataError, match="no variable 'ff'"):
        read_frey(no_ff)
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(str(wrong), {"ff": np.zeros((784, 3), np.uint8)})
    with pytest.raises(DataError, match=r"shape \(784, 3\)"):
        read_frey(wrong)
    good = tmp_path / "frey-faces" / "frey_rawface.mat"
    good.parent.mkdir()
    ff = np.arange(560 * 3).reshape(3, 560).T % 256
    scipy.io.savemat(str(good), {"ff": ff.astype(np.uint8)})
    faces = load_frey_faces(tmp_path, "all")
    assert faces.images.shape == (3, 560)
    assert torch.equal(faces.images[1], torch.from_numpy(ff[:, 1] / 255).float())
    with pytest.raises(DataError, match="test split"):
        load_frey_faces(tmp_path, "test")


def test_read_amat_fast_and_slow_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2, size=(4, 784), dtype=np.uint8)
    text = "".join(" ".join(map(str, r)) + "\n" for r in rows)
    fast = tmp_path / "a.amat.gz"
    fast.write_bytes(gzip.compress(text.encode()))
    assert np.array_equal(read_amat(fast), rows)
    slow = tmp_path / "b.amat"  # CRLF, tabs and double spaces, no final newline
    slow.write_text(text.replace("\n", "\r\n").replace(" ", "  ", 3).replace(" ", "\t", 1)[:-2])
    assert np.array_equal(read_amat(slow), rows)
    short = tmp_path / "c.amat"
    short.write_text(text + "0 1 1\n")
    with pytest.raises(DataError, match="line 5 has 3 fields, expected 784"):
        read_amat(short)
    two = tmp_path / "d.amat"
    two.write_text(text.replace("1", "2", 1))
    with pytest.raises(DataError, match="'2', expected only 0 and 1"):
        read_amat(two)


# ---------------------------------------------------------------------- roots and file layouts
@pytest.mark.parametrize("layout", ["mnist", ".", "MNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_file_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    images = tiny_mnist(tmp_path / layout, gz=gz)
    data = load_mnist(tmp_path, "train", binarize="none")
    assert data.images.shape == (5, 784)
    assert torch.equal(data.images, torch.from_numpy(images.reshape(5, -1)).float() / 255)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]


def test_fashion_mnist_layout(tmp_path: Path) -> None:
    tiny_mnist(tmp_path / "FashionMNIST" / "raw", n=3)
    assert len(load_fashion_mnist(tmp_path, "train")) == 3
    with pytest.raises(DataNotFoundError, match="fashion-mnist"):
        load_fashion_mnist(tmp_path, "test")


def test_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_mnist(tmp_path / "mnist", n=4)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_root() == tmp_path
    assert len(load_dataset("mnist", "train")) == 4
    assert resolve_root(tmp_path / "mnist") == tmp_path / "mnist"  # the argument wins


def test_missing_root_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataNotFoundError, match=r"pass root=\.\.\. .*PYROVAE_DATA"):
        load_mnist()
    with pytest.raises(DataNotFoundError, match="PYROVAE_DATA"):
        load_dataset("binarized-mnist", "test")
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        load_frey_faces(tmp_path / "does-not-exist")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match=r"\$PYROVAE_DATA"):
        load_mnist()


def test_missing_files_name_the_files_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_mnist(tmp_path, "test")
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert str(tmp_path / "mnist") in msg and "download=True" in msg
    with pytest.raises(DataNotFoundError, match="binarized_mnist_valid.amat.gz"):
        load_binarized_mnist(tmp_path, "valid")
    with pytest.raises(DataNotFoundError, match="frey_rawface.mat"):
        load_frey_faces(tmp_path)


def test_labels_file_with_wrong_count(tmp_path: Path) -> None:
    tiny_mnist(tmp_path / "mnist", n=5)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(DataError, match="holds 5 images"):
        load_mnist(tmp_path)


def test_download_delegates_to_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True calls torchvision.datasets.MNIST(root, train=..., download=True) and reads
    the raw files it leaves in root/MNIST/raw (a fake stands in for the network)."""
    import torchvision.datasets

    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            tiny_mnist(Path(root) / "MNIST" / "raw", n=6, gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    target = tmp_path / "new-root"
    data = load_mnist(target, "train", download=True)
    assert calls == [(str(target), True, True)] and len(data) == 6
    load_mnist(target, "train", download=True)  # files present now: no second download
    assert len(calls) == 1

    class Offline:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataNotFoundError, match="downloading Fashion-MNIST .* failed"):
        load_fashion_mnist(tmp_path / "other", download=True)


# -------------------------------------------------------------------------------- the registry
def test_registry_and_bad_names() -> None:
    assert set(DATASETS) == {"default", "mnist", "fashion-mnist", "binarized-mnist", "frey-faces"}
    with pytest.raises(ConfigError, match="unknown dataset 'cifar10'.*'mnist'.*'frey-faces'"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="split='valid'.*'train', 'test'"):
        load_dataset("mnist", "valid")
    with pytest.raises(ConfigError, match="split='validation'.*'valid'"):
        load_dataset("binarized-mnist", "validation")
    with pytest.raises(ConfigError, match="binarize='static'.*'dynamic', 'none'"):
        load_dataset("default", binarize="static")
    with pytest.raises(ConfigError, match="binarize"):
        load_mnist(split="train", binarize="yes")
    with pytest.raises(ConfigError, match="split"):
        load_default("valid")
    assert not load_dataset("default", "test", binarize="none").dynamic_binarization
