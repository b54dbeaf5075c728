"""Build pyrovae's bundled MNIST sample (``pyrovae/_data/``) from the original MNIST IDX files.

The sample is the first ``--num-train`` (6000) images and labels of the MNIST training set and the
first ``--num-test`` (1000) of the MNIST test set, written as gzipped IDX files in exactly the
original format (so :func:`pyrovae.data.read_idx` reads them like the originals). The gzip streams
are written with no file name and mtime 0, so the output is byte-for-byte reproducible.

Run from the repository root::

    python scripts/make_default_sample.py --source /work/shared/data/mnist --out pyrovae/_data

(``--source`` defaults to ``$PYROVAE_DATA/mnist``.)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyrovae.data import read_idx  # noqa: E402

SPLITS = {"train": "train", "test": "t10k"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (magic 2049 for 1-D, 2051 for 3-D)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                              compresslevel=9) as gz:
        gz.write(header + array.tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_source = Path(os.environ.get("PYROVAE_DATA", ".")) / "mnist"
    parser.add_argument("--source", type=Path, default=default_source,
                        help="folder with the original MNIST *-idx*-ubyte.gz files")
    parser.add_argument("--out", type=Path, default=Path("pyrovae/_data"))
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-test", type=int, default=1000)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": args.num_train, "test": args.num_test}
    for split, prefix in SPLITS.items():
        n = counts[split]
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = args.out / f"mnist-sample-{split}-{kind}-ubyte.gz"
            write_idx(path, array)
            back = read_idx(path)
            assert np.array_equal(back, array), path
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{path}  shape={back.shape}  bytes={path.stat().st_size}  sha256={digest}")


if __name__ == "__main__":
    main()
