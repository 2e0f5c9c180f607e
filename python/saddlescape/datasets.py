"""Small real data sets for the experiments, with no download.

* :func:`digits`: scikit-learn's bundled handwritten digits (1797 images of 8 x 8 pixels, shipped
  inside scikit-learn, so nothing is fetched); needs ``pip install 'saddlescape[experiments]'``.
* :func:`read_idx`: one IDX file (the format MNIST is distributed in), optionally gzip-compressed.
* :func:`mnist`: MNIST (or any set laid out like it) from a folder holding the IDX files.

The IDX format: a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then NDIM big-endian int32
dimensions, then the prod(dims) values, big-endian, in row-major order. TYPE is one of 0x08
(unsigned byte), 0x09 (signed byte), 0x0B (int16), 0x0C (int32), 0x0D (float32) or 0x0E (float64).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_TYPES", "digits", "mnist", "read_idx"]

#: IDX type code -> the big-endian numpy dtype of the values.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_EXTRAS_HINT = "pip install 'saddlescape[experiments]'"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``).

    Returns:
        (X, y): X float64 of shape (1797, 64), the 8 x 8 pixel intensities (0..16) divided by 16,
        so in [0, 1], C-contiguous; y int64 of shape (1797,), the digits 0..9.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'saddlescape[experiments]'``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data set ships with scikit-learn, which is not installed: "
                          f"{_EXTRAS_HINT}") from e
    X, y = load_digits(return_X_y=True)
    X = np.ascontiguousarray(X, dtype=np.float64) / 16.0
    return X, np.ascontiguousarray(y, dtype=np.int64)


def _read_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    return path.read_bytes()


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Reads an IDX file (MNIST's format; see the module docstring), gzip-compressed if the name
    ends in ``.gz``.

    Args:
        path: the file.
        ndim: if given, the number of dimensions the file must have (3 for MNIST images, 1 for
            labels).

    Returns:
        The array, of the file's shape, in native byte order, with dtype uint8, int8, int16, int32,
        float32 or float64 for the type codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file (bad magic number, unknown type code, no dimensions, a
            truncated header or data, trailing bytes after the data, a broken gzip stream) or a
            number of dimensions other than ``ndim``; the message names the file and the problem.
    """
    path = Path(path)
    data = _read_bytes(path)

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: not a valid IDX file: {problem}")

    if len(data) < 4:
        raise bad(f"{len(data)} bytes, too short for the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise bad(f"bad magic number 0x{data[:4].hex()} (the first two bytes must be 0x00 0x00)")
    code, nd = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise bad(f"unknown data type code 0x{code:02X} (known: {known})")
    if nd == 0:
        raise bad("the header declares 0 dimensions")
    if ndim is not None and nd != ndim:
        raise bad(f"{nd} dimensions, expected {ndim}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise bad(f"truncated header: {nd} dimensions need {header} bytes, "
                  f"the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=nd, offset=4))
    if any(d < 0 for d in shape):
        raise bad(f"negative dimension in shape {shape}")
    dtype = IDX_TYPES[code]
    expected = math.prod(int(n) for n in shape) * dtype.itemsize  # Python ints: no overflow
    got = len(data) - header
    if got < expected:
        raise bad(f"truncated data: shape {shape} of {dtype.newbyteorder('=').name} needs "
                  f"{expected} bytes after the {header}-byte header, the file has {got}")
    if got > expected:
        raise bad(f"{got - expected} trailing bytes after the {expected} bytes of data for shape "
                  f"{shape}")
    values = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


_SPLITS = {"train": "train", "test": "t10k"}


def _find(folder: Path, prefix: str, kind: str, nd: int) -> Path:
    stems = [f"{prefix}-{kind}-idx{nd}-ubyte", f"{prefix}-{kind}.idx{nd}-ubyte"]
    candidates = [folder / (s + ext) for s in stems for ext in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no MNIST {kind} file in {folder}: looked for "
                            f"{', '.join(c.name for c in candidates)}")


def mnist(folder: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from a folder holding its IDX files, uncompressed or gzip-compressed.

    The files are ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (split "train") or
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (split "test"), each optionally
    ending in ``.gz`` (and ``-images.idx3-ubyte`` spellings are accepted too). Any data set in this
    layout (unsigned-byte images, labels 0..9) loads, e.g. Fashion-MNIST.

    Args:
        folder: the folder.
        split: "train" or "test".

    Returns:
        (X, y): X float64 of shape (n, rows * cols) ((60000, 784) for MNIST's training split), the
        pixel intensities divided by 255, so in [0, 1]; y int64 of shape (n,), labels in 0..9.

    Raises:
        FileNotFoundError: the folder or one of the two files is missing.
        ValueError: an unknown split, a malformed IDX file (see :func:`read_idx`), images that are
            not a 3-D array of unsigned bytes, labels that are not 1-D unsigned bytes in 0..9, or
            images and labels that differ in count.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder {root} does not exist or is not a folder")
    prefix = _SPLITS[split]
    images_path = _find(root, prefix, "images", 3)
    labels_path = _find(root, prefix, "labels", 1)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path}: MNIST images must be unsigned bytes (type 0x08), "
                         f"got {images.dtype}")
    if labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: MNIST labels must be unsigned bytes (type 0x08), "
                         f"got {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path.name} holds {images.shape[0]} images but "
                         f"{labels_path.name} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be in 0..9, got {int(labels.max())}")
    n, rows, cols = images.shape
    X = images.reshape(n, rows * cols).astype(np.float64) / 255.0
    return X, labels.astype(np.int64)
