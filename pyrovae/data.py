r"""Image data sets for VAEs: MNIST, Fashion-MNIST, statically binarized MNIST, Frey faces, and a
small MNIST sample bundled with the package.

Everything in pyrovae works on *flat* images: a data set of ``N`` images of shape ``image_shape``
(e.g. ``(28, 28)``) is a float tensor of shape ``(N, D)`` with ``D = prod(image_shape)`` and values
in ``[0, 1]``. :class:`ImageData` holds such a tensor and serves minibatches ``(x, idx)``: the
images ``x`` of shape ``(B, D)`` and their positions ``idx`` of shape ``(B,)`` in the data set
(the ``"data"`` plate of :class:`~pyrovae.VAE` subsamples with them).

Binarization. A Bernoulli likelihood needs pixels in ``{0, 1}``. With ``binarize="dynamic"``
every access redraws each pixel as :math:`x_{nd} \sim \mathrm{Bernoulli}(\mu_{nd})`, with
:math:`\mu_{nd}` the grey value (Burda, Grosse & Salakhutdinov 2016), so each epoch sees a fresh
binarization; ``binarize="none"`` keeps the grey values; :func:`load_binarized_mnist` is the fixed
binarization of Larochelle & Murray (2011), the standard benchmark for log-likelihoods.

Where the files are. The loaders read the original files from a *data root*: the ``root``
argument, else the folder named by the environment variable ``PYROVAE_DATA``. The root is laid
out as::

    root/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    root/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    root/binarized-mnist/binarized_mnist_{train,valid,test}.amat.gz
    root/frey-faces/frey_rawface.mat

(IDX files may also lie in ``root/`` itself or in torchvision's ``root/MNIST/raw/`` and
``root/FashionMNIST/raw/``, gzipped or not). Nothing is downloaded unless you pass
``download=True``. :func:`load_default` needs no root: it reads the MNIST sample shipped in the
package (the first 6000 training and 1000 test images).

Example::

    >>> from pyrovae.data import load_dataset
    >>> train = load_dataset("mnist", "train", root="/data", binarize="dynamic")
    >>> x, idx = train[[0, 1, 2]]          # x: (3, 784) in {0, 1}, idx: tensor([0, 1, 2])
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, DataNotFoundError

__all__ = [
    "DATA_ENV",
    "ImageData",
    "DataIndexError",
    "DatasetInfo",
    "DATASETS",
    "resolve_root",
    "read_idx",
    "read_amat",
    "read_frey",
    "load_mnist",
    "load_fashion_mnist",
    "load_binarized_mnist",
    "load_frey_faces",
    "load_default",
    "load_dataset",
    "FREY_NUM_TRAIN",
]

#: The environment variable naming the data root (a folder laid out like the shared data folder).
DATA_ENV = "PYROVAE_DATA"

#: Frey faces: the first ``FREY_NUM_TRAIN`` of the 1965 frames are ``split="train"``, the last 200
#: are ``split="test"``.
FREY_NUM_TRAIN = 1765
FREY_NUM_IMAGES = 1965

_BINARIZE = ("dynamic", "none")


class DataIndexError(ConfigError, IndexError):
    """An index into an :class:`ImageData` is out of range (an ``IndexError`` too, as the
    :class:`~torch.utils.data.Dataset` protocol expects)."""


# --------------------------------------------------------------------------------- the data set
def _check_image_shape(image_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in image_shape)
        ok = all(int(s) == s for s in image_shape)
    except (TypeError, ValueError):
        shape, ok = (), False
    if not ok or not 1 <= len(shape) <= 3 or any(s < 1 for s in shape):
        raise ConfigError(
            f"image_shape must be 1 to 3 positive integers like (28, 28) or (1, 28, 20), "
            f"got {image_shape!r}"
        )
    return shape


class ImageData(Dataset):
    r"""A data set of flat images in ``[0, 1]``, served as minibatches ``(x, idx)``.

    :param images: float tensor of shape ``(N, D)`` with values in ``[0, 1]``, one flattened image
        per row; ``D`` must equal ``prod(image_shape)``.
    :param image_shape: the shape of one image, e.g. ``(28, 28)`` (kept for plotting).
    :param dynamic_binarization: if true, every access redraws every pixel as
        ``Bernoulli(intensity)`` (Burda et al. 2016), so ``x`` is in ``{0, 1}``.
    :param name: a label for messages and ``repr`` (e.g. ``"mnist-train"``).
    :param labels: optional class labels, a tensor of shape ``(N,)`` (not used for training).
    :param generator: optional :class:`torch.Generator` for the dynamic draws (on the device of
        ``images``); also settable later as the attribute :attr:`generator`.
    :raises DataError: if ``images`` is empty, not 2-D, not floating point, not finite, outside
        ``[0, 1]``, or its width does not match ``image_shape``.

    ``data[i]`` with an int ``i`` returns ``(x, idx)`` with ``x`` of shape ``(D,)`` and ``idx`` a
    0-dim LongTensor; ``data[indices]`` with a list of ints, a 1-D integer tensor or array, or a
    slice returns ``x`` of shape ``(B, D)`` and ``idx`` of shape ``(B,)``. A batch costs one gather
    (and, with dynamic binarization, one :func:`torch.bernoulli`), so a
    ``DataLoader(data, sampler=BatchSampler(RandomSampler(data), B, drop_last=False),
    batch_size=None)`` is fast. ``x`` and ``idx`` live on the device of :attr:`images`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        image_shape: Sequence[int],
        *,
        dynamic_binarization: bool = False,
        name: str = "",
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        what = f"ImageData {name!r}" if name else "ImageData images"
        if not isinstance(images, torch.Tensor):
            if isinstance(images, np.ndarray):
                images = torch.from_numpy(images)
            else:
                raise DataError(
                    f"{what} must be a torch.Tensor of shape (N, D), got {type(images).__name__}; "
                    "convert it with torch.as_tensor(images, dtype=torch.float32)"
                )
        shape = _check_image_shape(image_shape)
        if images.dim() != 2:
            raise DataError(
                f"{what} must be 2-D (N, D) flat images, got shape {tuple(images.shape)}; "
                "flatten them with images.reshape(len(images), -1)"
            )
        if images.numel() == 0:
            raise DataError(
                f"{what} is empty (shape {tuple(images.shape)}); pass at least one image"
            )
        if not images.is_floating_point():
            raise DataError(
                f"{what} must be floating point with values in [0, 1], got dtype {images.dtype}; "
                "convert with images.float() / 255 for 8-bit pixels"
            )
        if images.shape[1] != math.prod(shape):
            raise DataError(
                f"{what} has {images.shape[1]} features per row but image_shape {shape} has "
                f"{math.prod(shape)} pixels; pass the image_shape the rows were flattened from"
            )
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DataError(
                f"{what} contains {bad} NaN or infinite value(s); remove or replace them "
                "(e.g. torch.nan_to_num) before building ImageData"
            )
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{what} must have values in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "rescale them (e.g. divide 8-bit pixels by 255)"
            )
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (images.shape[0],):
                raise DataError(
                    f"labels of {what} must have shape ({images.shape[0]},), one per image, got "
                    f"{tuple(labels.shape)}; pass labels=None or one label per image"
                )
        self._init(images, shape, bool(dynamic_binarization), str(name), labels, generator)

    def _init(
        self,
        images: torch.Tensor,
        image_shape: tuple[int, ...],
        dynamic_binarization: bool,
        name: str,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
        is_binary: bool | None = None,
    ) -> None:
        #: The grey values, float tensor ``(N, D)`` in ``[0, 1]`` (never redrawn).
        self.images = images
        #: The shape of one image, e.g. ``(28, 28)``.
        self.image_shape = image_shape
        #: Whether every access redraws the pixels as ``Bernoulli(images)``.
        self.dynamic_binarization = dynamic_binarization
        self.name = name
        #: Class labels ``(N,)`` or ``None``.
        self.labels = labels
        #: Generator for the dynamic draws (``None``: torch's global generator).
        self.generator = generator
        self._is_binary = is_binary

    @classmethod
    def _trusted(
        cls,
        images: torch.Tensor,
        like: ImageData,
        *,
        labels: torch.Tensor | None,
        dynamic_binarization: bool | None = None,
        generator: torch.Generator | None = None,
        is_binary: bool | None = None,
    ) -> ImageData:
        """A new ImageData from already validated values (no second validation pass)."""
        new = cls.__new__(cls)
        new._init(
            images,
            like.image_shape,
            like.dynamic_binarization if dynamic_binarization is None else dynamic_binarization,
            like.name,
            labels,
            generator,
            is_binary,
        )
        return new

    # -------------------------------------------------------------------------------- protocol
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _indices(self, index: Any) -> tuple[torch.Tensor, bool]:
        """``index`` as a LongTensor of non-negative positions, and whether it was a scalar."""
        n = len(self)
        if isinstance(index, slice):
            return torch.arange(n)[index], False
        if isinstance(index, (bool, np.bool_)):
            raise ConfigError(f"cannot index {self._what()} with a bool; pass an int or a list of ints")
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -n <= i < n:
                raise DataIndexError(
                    f"index {i} is out of range for {self._what()} of {n} images; use 0..{n - 1}"
                )
            return torch.tensor(i + n if i < 0 else i), True
        try:
            idx = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"cannot index {self._what()} with {type(index).__name__}; pass an int, a list of "
                "ints, a slice or a 1-D integer tensor"
            ) from None
        if idx.numel() == 0:
            return torch.zeros(0, dtype=torch.long), False
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex() or idx.dim() > 1:
            raise ConfigError(
                f"cannot index {self._what()} with a {idx.dim()}-D {idx.dtype} tensor; pass an int, "
                "a list of ints, a slice or a 1-D integer tensor"
            )
        scalar = idx.dim() == 0
        idx = idx.long()
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -n or hi >= n:
            bad = lo if lo < -n else hi
            raise DataIndexError(
                f"index {bad} is out of range for {self._what()} of {n} images; use 0..{n - 1}"
            )
        if lo < 0:
            idx = torch.where(idx < 0, idx + n, idx)
        return idx, scalar

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, idx)``: images ``(B, D)`` (or ``(D,)`` for an int) and their indices."""
        idx, _ = self._indices(index)
        idx = idx.to(self.images.device)
        x = self.images[idx]
        if self.dynamic_binarization:
            x = torch.bernoulli(x, generator=self.generator)
        return x, idx

    # ------------------------------------------------------------------------------ properties
    @property
    def event_shape(self) -> tuple[int]:
        """``(D,)``: the shape of one flat image."""
        return (int(self.images.shape[1]),)

    @property
    def num_features(self) -> int:
        """``D``, the number of pixels per image."""
        return int(self.images.shape[1])

    @property
    def device(self) -> torch.device:
        """Where :attr:`images` (and therefore every minibatch) lives."""
        return self.images.device

    @property
    def is_binary(self) -> bool:
        """Whether every ``x`` served is in ``{0, 1}`` (dynamic binarization, or binary images)."""
        if self.dynamic_binarization:
            return True
        if self._is_binary is None:
            self._is_binary = bool(((self.images == 0) | (self.images == 1)).all())
        return self._is_binary

    # --------------------------------------------------------------------------------- methods
    def to(self, device: torch.device | str) -> ImageData:
        """A copy on ``device`` (the same object's tensors if already there).

        The :attr:`generator` is kept only if it lives on the same device type; otherwise the copy
        draws from torch's global generator (set a new one with ``data.generator = ...``).
        """
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
        images = self.images.to(device)
        labels = None if self.labels is None else self.labels.to(device)
        g = self.generator
        if g is not None and g.device.type != device.type:
            g = None
        return ImageData._trusted(images, self, labels=labels, generator=g, is_binary=self._is_binary)

    def subset(self, indices_or_n: int | Sequence[int] | torch.Tensor) -> ImageData:
        """A new data set of the first ``n`` images (an int) or of the given indices (a list, a
        1-D integer tensor, or a boolean mask of length ``N``), re-indexed from 0.

        :raises ConfigError: if ``n`` is not in ``1..N`` or an index is out of range.
        """
        n = len(self)
        if isinstance(indices_or_n, (int, np.integer)) and not isinstance(indices_or_n, bool):
            k = int(indices_or_n)
            if not 1 <= k <= n:
                raise ConfigError(
                    f"subset({k}) of {self._what()}: n must be between 1 and {n}; "
                    f"pass n <= {n} (e.g. min(k, len(data)))"
                )
            idx = torch.arange(k)
        else:
            if isinstance(indices_or_n, torch.Tensor) and indices_or_n.dtype == torch.bool:
                if indices_or_n.shape != (n,):
                    raise ConfigError(
                        f"a boolean mask for {self._what()} needs shape ({n},), got "
                        f"{tuple(indices_or_n.shape)}"
                    )
                indices_or_n = indices_or_n.nonzero().flatten()
            idx, scalar = self._indices(indices_or_n)
            if scalar:
                idx = idx.reshape(1)
            if idx.numel() == 0:
                raise ConfigError(f"subset of {self._what()} got no indices; pass at least one")
        idx = idx.to(self.images.device)
        labels = None if self.labels is None else self.labels[idx.to(self.labels.device)]
        return ImageData._trusted(
            self.images[idx], self, labels=labels, generator=self.generator,
            is_binary=True if self._is_binary else None,
        )

    def binarized(self, generator: torch.Generator | None = None) -> ImageData:
        """A static copy with one fixed draw ``Bernoulli(images)`` (e.g. a fixed test set).

        :param generator: makes the draw reproducible (on the device of :attr:`images`).
        """
        x = torch.bernoulli(self.images, generator=generator)
        return ImageData._trusted(
            x, self, labels=self.labels, dynamic_binarization=False, generator=None, is_binary=True
        )

    def _what(self) -> str:
        return f"ImageData {self.name!r}" if self.name else "ImageData"

    def __repr__(self) -> str:
        kind = "dynamically binarized" if self.dynamic_binarization else (
            "binary" if self.is_binary else "grey"
        )
        name = f"{self.name!r}, " if self.name else ""
        return (
            f"ImageData({name}{len(self)} images of shape {self.image_shape}, {kind}, "
            f"device={self.images.device})"
        )


# -------------------------------------------------------------------------------------- readers
def _read_bytes(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """The file's bytes, decompressed if it is gzip (checked by content, not by name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"data file {p} does not exist; check the path or the data root")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {p} ({e.strerror or e}); check its permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{p} is a damaged or truncated gzip file ({e}); re-download it or replace it "
                "with the original file"
            ) from None
    elif p.suffix == ".gz":
        raise DataError(
            f"{p} is named .gz but is not gzip data; re-download it or replace it with the "
            "original file"
        )
    return p, raw


_IDX_MAGIC = {2051: "images", 2049: "labels"}


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    fix = "re-download it or replace it with the original IDX file"
    if len(raw) < 8:
        raise DataError(f"{where} is too short ({len(raw)} bytes) to be an IDX file; {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(
            f"{where} is not an IDX file of uint8 images or labels (magic number {magic}, "
            f"expected 2051 or 2049); {fix}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where} ends inside its IDX header ({len(raw)} bytes); {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    found = len(raw) - header
    if found != expected:
        state = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"{where} is {state}: its header says {' x '.join(map(str, dims))} = {expected} bytes "
            f"of data but it holds {found}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of uint8 images (magic 2051) or labels (magic 2049), plain or gzipped.

    :param path: e.g. ``root/mnist/train-images-idx3-ubyte.gz``.
    :returns: a writable uint8 array, ``(N, rows, cols)`` for images or ``(N,)`` for labels.
    :raises DataNotFoundError: if the file does not exist.
    :raises DataError: if it is not IDX, is truncated or garbled (the message names the file).
    """
    p, raw = _read_bytes(path)
    return _parse_idx(raw, str(p))


_AMAT_FIELDS = 784
_AMAT_ROW = 2 * _AMAT_FIELDS  # "d d d ... d\n"


def read_amat(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` (or ``.amat.gz``) text file of 0/1 values.

    The original files hold one image per line: 784 digits ``0``/``1`` separated by single spaces.
    Those are parsed as raw bytes in a few vectorized steps; other whitespace layouts (CRLF, runs of
    spaces or tabs) fall back to a slower line-by-line parse.

    :returns: a uint8 array ``(N, 784)`` of 0/1.
    :raises DataNotFoundError: if the file does not exist.
    :raises DataError: if a row does not have 784 fields or a field is not 0 or 1.
    """
    p, raw = _read_bytes(path)
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size and buf.size % _AMAT_ROW == 0:
        rows = buf.reshape(-1, _AMAT_ROW)
        digits = rows[:, 0::2] - np.uint8(48)  # '0' -> 0, '1' -> 1, anything else > 1
        seps = rows[:, 1::2]
        if (
            (seps[:, :-1] == 32).all()
            and (seps[:, -1] == 10).all()
            and (digits <= 1).all()
        ):
            return digits
    return _read_amat_slow(p, raw)


def _read_amat_slow(p: Path, raw: bytes) -> np.ndarray:
    fix = "re-download it or replace it with the original file"
    out: list[bytes] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _AMAT_FIELDS:
            raise DataError(
                f"{p} line {number} has {len(fields)} fields, expected {_AMAT_FIELDS} "
                f"(0/1 values of a 28 x 28 image); {fix}"
            )
        joined = b"".join(fields)
        if len(joined) != _AMAT_FIELDS or joined.strip(b"01"):
            bad = next(f for f in fields if f not in (b"0", b"1"))
            raise DataError(
                f"{p} line {number} holds the value {bad.decode(errors='replace')!r}, expected "
                f"only 0 and 1; {fix}"
            )
        out.append(joined)
    if not out:
        raise DataError(f"{p} holds no rows of 0/1 values; {fix}")
    return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(-1, _AMAT_FIELDS) - np.uint8(48)


def read_frey(path: str | os.PathLike[str]) -> np.ndarray:
    """Read Frey faces from ``frey_rawface.mat`` (variable ``ff``, shape ``(560, N)``).

    :returns: a uint8 array ``(N, 28, 20)``: column ``n`` of ``ff`` is image ``n``, row-major.
    :raises DataNotFoundError: if the file does not exist.
    :raises DataError: if it is not a MAT file, has no variable ``ff``, or ``ff`` is not
        ``(560, N)`` with values in ``0..255``.
    """
    import scipy.io

    p = Path(path).expanduser()
    fix = "re-download frey_rawface.mat or replace it with the original file"
    if not p.is_file():
        raise DataNotFoundError(f"data file {p} does not exist; check the path or the data root")
    try:
        mat = scipy.io.loadmat(str(p))
    except Exception as e:  # scipy raises many types (ValueError, MatReadError, TypeError, ...)
        raise DataError(f"{p} is not a readable MATLAB file ({type(e).__name__}: {e}); {fix}") from None
    if "ff" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{p} has no variable 'ff' (it holds {names}); {fix}")
    ff = np.asarray(mat["ff"])
    if ff.ndim != 2 or ff.shape[0] != 28 * 20 or ff.shape[1] == 0:
        raise DataError(
            f"{p}: variable 'ff' has shape {ff.shape}, expected (560, N) for N images of 28 x 20; "
            f"{fix}"
        )
    if ff.dtype != np.uint8:
        if not np.issubdtype(ff.dtype, np.number) or not np.isfinite(ff).all() or (
            ff.min() < 0 or ff.max() > 255
        ):
            raise DataError(f"{p}: variable 'ff' must hold pixel values in 0..255; {fix}")
        ff = ff.astype(np.uint8)
    return np.ascontiguousarray(ff.T.reshape(-1, 28, 20))


# --------------------------------------------------------------------------------- data roots
def resolve_root(root: str | os.PathLike[str] | None = None, *, must_exist: bool = True) -> Path:
    """The data root: ``root`` if given, else the folder in ``$PYROVAE_DATA``.

    :param must_exist: raise if the folder does not exist (``False`` when about to download).
    :raises DataNotFoundError: if neither is set, or the folder does not exist.
    """
    if root is None:
        env = os.environ.get(DATA_ENV, "").strip()
        if not env:
            raise DataNotFoundError(
                f"no data root given; pass root=... (a folder holding mnist/, fashion-mnist/, ...) "
                f"or set {DATA_ENV}, or use the bundled sample (load_default / dataset 'default')"
            )
        path, source = Path(env).expanduser(), f"${DATA_ENV}"
    else:
        try:
            path, source = Path(root).expanduser(), "root"
        except TypeError:
            raise ConfigError(f"root must be a path or None, got {type(root).__name__}") from None
    if must_exist and not path.is_dir():
        raise DataNotFoundError(
            f"data root {path} (from {source}) is not a folder; pass root=... or set {DATA_ENV} "
            "to the folder that holds mnist/, fashion-mnist/, binarized-mnist/, frey-faces/"
        )
    return path


def _find(root: Path, folders: Sequence[str], name: str) -> Path | None:
    for folder in folders:
        for candidate in (name, name + ".gz"):
            p = root / folder / candidate
            if p.is_file():
                return p
    return None


def _check_choice(value: Any, valid: Sequence[str], what: str, dataset: str) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(
            f"{what}={value!r} is not valid for {dataset}; use one of {', '.join(map(repr, valid))}"
        )
    return value


def _image_data(
    pixels: np.ndarray,
    *,
    binarize: str,
    name: str,
    labels: np.ndarray | None = None,
    scale: float = 255.0,
) -> ImageData:
    """uint8 ``(N, *shape)`` -> :class:`ImageData` of float32 ``pixels / scale`` (values trusted)."""
    n, shape = pixels.shape[0], tuple(int(s) for s in pixels.shape[1:])
    images = torch.from_numpy(pixels.reshape(n, -1)).to(torch.float32)
    if scale != 1.0:
        images.div_(scale)
    return ImageData(
        images,
        shape,
        dynamic_binarization=binarize == "dynamic",
        name=name,
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
    )


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_idx_dataset(
    title: str,
    folder: str,
    tv_folder: str,
    tv_class: str,
    root: Any,
    split: str,
    binarize: str,
    download: bool,
    name: str,
) -> ImageData:
    _check_choice(split, ("train", "test"), "split", title)
    _check_choice(binarize, _BINARIZE, "binarize", title)
    if not isinstance(download, bool):
        raise ConfigError(f"download must be True or False, got {download!r}")
    base = resolve_root(root, must_exist=not download)
    folders = (folder, ".", f"{tv_folder}/raw")
    image_name, label_name = _IDX_FILES[split]
    image_path = _find(base, folders, image_name)
    if image_path is None and download:
        _download(tv_class, base, split, title)
        image_path = _find(base, folders, image_name)
    if image_path is None:
        raise DataNotFoundError(
            f"{title} {split} images not found: expected {image_name}.gz (or {image_name}) and "
            f"{label_name}.gz in {base / folder}/ (or in {base}/ or {base / tv_folder / 'raw'}/); "
            f"put the original files there, or pass download=True to fetch them with torchvision"
        )
    images = read_idx(image_path)
    if images.ndim != 3:
        raise DataError(
            f"{image_path} holds labels, not images (shape {images.shape}); replace it with the "
            f"original {image_name}.gz"
        )
    label_path = _find(base, (str(image_path.parent.relative_to(base)),) + tuple(folders),
                       label_name)
    labels = None
    if label_path is not None:
        labels = read_idx(label_path)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{label_path} has shape {labels.shape} but {image_path} holds "
                f"{images.shape[0]} images; replace both with the original {split} files"
            )
    return _image_data(images, binarize=binarize, name=name, labels=labels)


def _download(tv_class: str, root: Path, split: str, title: str) -> None:
    """Fetch the IDX files with torchvision (only when the user passed ``download=True``)."""
    import torchvision.datasets as tvd

    try:
        getattr(tvd, tv_class)(str(root), train=split == "train", download=True)
    except Exception as e:  # network errors come as URLError, RuntimeError, OSError, ...
        raise DataNotFoundError(
            f"downloading {title} into {root} failed ({type(e).__name__}: {e}); download the IDX "
            f".gz files by hand and put them in {root}/"
        ) from None


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    binarize: str = "dynamic",
    download: bool = False,
) -> ImageData:
    """MNIST digits (LeCun et al.): 60000 train / 10000 test images of 28 x 28.

    :param root: the data root (default ``$PYROVAE_DATA``); files are looked up in
        ``root/mnist/``, ``root/`` and ``root/MNIST/raw/``, gzipped or not.
    :param split: ``"train"`` or ``"test"``.
    :param binarize: ``"dynamic"`` (redraw pixels as Bernoulli on every access) or ``"none"``
        (grey values in ``[0, 1]``).
    :param download: fetch missing files with :class:`torchvision.datasets.MNIST` into
        ``root/MNIST/raw/`` (never done unless asked).
    :returns: :class:`ImageData` with float32 images ``(N, 784)``, ``image_shape=(28, 28)``, and
        ``labels`` ``(N,)`` when the label file is present.
    """
    return _load_idx_dataset(
        "MNIST", "mnist", "MNIST", "MNIST", root, split, binarize, download, f"mnist-{split}"
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    binarize: str = "none",
    download: bool = False,
) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017): 60000 train / 10000 test clothing images of 28 x 28.

    Files are looked up in ``root/fashion-mnist/``, ``root/`` and ``root/FashionMNIST/raw/``;
    otherwise as :func:`load_mnist` (default ``binarize="none"``: grey values).
    """
    return _load_idx_dataset(
        "Fashion-MNIST", "fashion-mnist", "FashionMNIST", "FashionMNIST", root, split, binarize,
        download, f"fashion-mnist-{split}",
    )


_AMAT_SPLITS = ("train", "valid", "test")


def load_binarized_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "train"
) -> ImageData:
    """The statically binarized MNIST of Larochelle & Murray (2011): 50000 train, 10000 valid,
    10000 test images of 28 x 28 in ``{0, 1}`` (one fixed binarization; no labels).

    :param root: the data root; reads ``root/binarized-mnist/binarized_mnist_<split>.amat[.gz]``
        (or the same name in ``root/``).
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    """
    _check_choice(split, _AMAT_SPLITS, "split", "binarized-mnist")
    base = resolve_root(root)
    name = f"binarized_mnist_{split}.amat"
    path = _find(base, ("binarized-mnist", "."), name)
    if path is None:
        raise DataNotFoundError(
            f"binarized MNIST {split} not found: expected {name}.gz (or {name}) in "
            f"{base / 'binarized-mnist'}/; put the Larochelle & Murray .amat files there"
        )
    pixels = read_amat(path).reshape(-1, 28, 28)
    data = _image_data(pixels, binarize="none", name=f"binarized-mnist-{split}", scale=1.0)
    data._is_binary = True
    return data


_FREY_SPLITS = ("all", "train", "test")


def load_frey_faces(
    root: str | os.PathLike[str] | None = None,
    split: str = "all",
    *,
    binarize: str = "none",
) -> ImageData:
    """Frey faces (Frey et al. 1998; used by Kingma & Welling 2014): 1965 grey frames of 28 x 20
    of one face, scaled by 1/255.

    The data has no official split. This one is fixed and deterministic: ``"train"`` is the first
    1765 frames (:data:`FREY_NUM_TRAIN`), ``"test"`` the last 200, ``"all"`` all 1965. The frames
    come from a video, so neighbours are near duplicates; a contiguous split keeps the test frames
    away from the training frames better than a random one.

    :param root: the data root; reads ``root/frey-faces/frey_rawface.mat`` (or ``root/``).
    :param split: ``"all"``, ``"train"`` or ``"test"``.
    :param binarize: ``"none"`` (grey values, the usual choice with a Gaussian likelihood) or
        ``"dynamic"``.
    """
    _check_choice(split, _FREY_SPLITS, "split", "frey-faces")
    _check_choice(binarize, _BINARIZE, "binarize", "frey-faces")
    base = resolve_root(root)
    path = _find(base, ("frey-faces", "."), "frey_rawface.mat")
    if path is None:
        raise DataNotFoundError(
            f"Frey faces not found: expected frey_rawface.mat in {base / 'frey-faces'}/; put the "
            "file from https://cs.nyu.edu/~roweis/data.html there"
        )
    pixels = read_frey(path)
    if split == "train":
        pixels = pixels[:FREY_NUM_TRAIN]
    elif split == "test":
        pixels = pixels[FREY_NUM_TRAIN:]
        if pixels.shape[0] == 0:
            raise DataError(
                f"{path} holds only {FREY_NUM_TRAIN} or fewer frames, none left for the test "
                "split; replace it with the original frey_rawface.mat (1965 frames)"
            )
    return _image_data(pixels, binarize=binarize, name=f"frey-faces-{split}")


#: File names of the bundled MNIST sample in ``pyrovae/_data/``.
_SAMPLE_FILES = {
    "train": ("mnist-sample-train-images-idx3-ubyte.gz", "mnist-sample-train-labels-idx1-ubyte.gz"),
    "test": ("mnist-sample-test-images-idx3-ubyte.gz", "mnist-sample-test-labels-idx1-ubyte.gz"),
}


def _read_package_idx(name: str) -> np.ndarray:
    ref = resources.files(__package__).joinpath("_data", name)
    try:
        with resources.as_file(ref) as path:
            return read_idx(path)
    except DataNotFoundError:
        raise DataNotFoundError(
            f"the bundled sample file pyrovae/_data/{name} is missing; reinstall pyrovae (its "
            "package data _data/* must be installed)"
        ) from None


def load_default(split: str = "train", *, binarize: str = "dynamic") -> ImageData:
    """The MNIST sample bundled with pyrovae; needs no data root and no download.

    It is the first 6000 images of the MNIST training set (``split="train"``) and the first 1000
    of the MNIST test set (``split="test"``), 28 x 28, with labels, stored as IDX files in
    ``pyrovae/_data/`` (see its README).

    :param split: ``"train"`` or ``"test"``.
    :param binarize: ``"dynamic"`` (default) or ``"none"``.
    """
    _check_choice(split, ("train", "test"), "split", "the default sample")
    _check_choice(binarize, _BINARIZE, "binarize", "the default sample")
    image_name, label_name = _SAMPLE_FILES[split]
    images = _read_package_idx(image_name)
    labels = _read_package_idx(label_name)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(
            f"the bundled sample files for {split} do not match (shapes {images.shape}, "
            f"{labels.shape}); reinstall pyrovae"
        )
    return _image_data(images, binarize=binarize, name=f"default-{split}", labels=labels)


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` knows about one data set.

    :ivar name: the registry name.
    :ivar splits: the valid ``split`` values.
    :ivar binarize: the valid ``binarize`` values; ``default_binarize`` is used for ``None``.
    :ivar image_shape: the shape of one image.
    :ivar needs_root: whether it reads from the data root.
    :ivar description: one line.
    """

    name: str
    loader: Callable[..., ImageData]
    splits: tuple[str, ...]
    binarize: tuple[str, ...]
    default_binarize: str
    image_shape: tuple[int, ...]
    needs_root: bool
    description: str


def _load_default(split: str, root: Any, binarize: str) -> ImageData:
    return load_default(split, binarize=binarize)


def _load_mnist(split: str, root: Any, binarize: str) -> ImageData:
    return load_mnist(root, split, binarize=binarize)


def _load_fashion(split: str, root: Any, binarize: str) -> ImageData:
    return load_fashion_mnist(root, split, binarize=binarize)


def _load_binarized(split: str, root: Any, binarize: str) -> ImageData:
    return load_binarized_mnist(root, split)


def _load_frey(split: str, root: Any, binarize: str) -> ImageData:
    return load_frey_faces(root, split, binarize=binarize)


#: The data sets :func:`load_dataset` knows, by name.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("default", _load_default, ("train", "test"), _BINARIZE, "dynamic", (28, 28),
                    False, "bundled MNIST sample: first 6000 train / 1000 test digits"),
        DatasetInfo("mnist", _load_mnist, ("train", "test"), _BINARIZE, "dynamic", (28, 28),
                    True, "MNIST digits, 60000 train / 10000 test"),
        DatasetInfo("fashion-mnist", _load_fashion, ("train", "test"), _BINARIZE, "none",
                    (28, 28), True, "Fashion-MNIST clothing, 60000 train / 10000 test"),
        DatasetInfo("binarized-mnist", _load_binarized, _AMAT_SPLITS, _BINARIZE, "none",
                    (28, 28), True,
                    "Larochelle & Murray's fixed binarization, 50000 / 10000 / 10000 "
                    "(already binary: binarize='dynamic' changes nothing)"),
        DatasetInfo("frey-faces", _load_frey, ("train", "test", "all"), _BINARIZE, "none",
                    (28, 20), True, "Frey faces, 1965 frames of 28 x 20: 1765 train / 200 test"),
    )
}


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    binarize: str | None = None,
) -> ImageData:
    """Load a data set by name: ``"default"``, ``"mnist"``, ``"fashion-mnist"``,
    ``"binarized-mnist"`` or ``"frey-faces"`` (see :data:`DATASETS`).

    :param split: ``"train"`` or ``"test"``; ``"valid"`` for binarized-mnist, ``"all"`` for
        frey-faces.
    :param root: the data root (default ``$PYROVAE_DATA``; ignored by ``"default"``).
    :param binarize: ``"dynamic"``, ``"none"``, or ``None`` for the data set's default
        (dynamic for mnist and default, none otherwise).
    :raises ConfigError: for an unknown name, split or binarize value.
    """
    info = DATASETS.get(name) if isinstance(name, str) else None
    if info is None:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(map(repr, DATASETS))}")
    _check_choice(split, info.splits, "split", f"dataset {name!r}")
    if binarize is None:
        binarize = info.default_binarize
    _check_choice(binarize, info.binarize, "binarize", f"dataset {name!r}")
    return info.loader(split, root, binarize)
