"""Reading and writing the IDX format of MNIST and its siblings, with errors that say what is wrong.

An IDX file is a 4-byte magic number ``00 00 <dtype> <ndim>``, ``ndim`` big-endian uint32 dimension sizes, then
the data. Only unsigned-byte data (dtype code ``0x08``) occurs in the MNIST family and only it is supported.
Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from noisy_lightning.files import atomic_write

UNSIGNED_BYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"cannot read IDX file {path}: {error} (the file is truncated or corrupt)") from None


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> Tensor:
    """Read an unsigned-byte IDX file (optionally ``.gz``) into a ``uint8`` tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a wrong magic number, an unexpected number of dimensions, or a file shorter or longer than
            its header declares (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    zero1, zero2, dtype_code, ndim = data[:4]
    if zero1 != 0 or zero2 != 0 or dtype_code != UNSIGNED_BYTE or ndim == 0:
        raise ValueError(
            f"{path} has magic number 0x{data[:4].hex()}, expected 0x0000080N (unsigned-byte IDX with N "
            "dimensions); it is not an MNIST-style IDX file"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path} has {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header_size}-byte header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_size = header_size + math.prod(shape)  # Python ints: a forged header cannot overflow
    if len(data) != expected_size:
        state = "truncated" if len(data) < expected_size else "longer than its header declares"
        raise ValueError(f"{path} is {state}: header says shape {shape} ({expected_size} bytes), file has {len(data)}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)
    return torch.from_numpy(array.copy())


def write_idx(path: str | os.PathLike[str], array: np.ndarray | Tensor) -> None:
    """Write a ``uint8`` array as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    The file is written to a temporary neighbour and renamed into place, so a crash leaves no partial file.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx needs a uint8 array, got {array.dtype}")
    payload = bytes([0, 0, UNSIGNED_BYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array).tobytes()
    with atomic_write(path, "wb") as raw:
        if Path(path).suffix == ".gz":
            # mtime=0 keeps the bytes reproducible, so a rebuilt file diffs clean in git
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as compressed:
                compressed.write(payload)
        else:
            raw.write(payload)
