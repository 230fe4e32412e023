"""Row stores: training data read a batch of rows at a time, so that memory does not grow
with the number of augmented samples.

* `NpyRows`: rows of a .npy file, or of one array stored uncompressed in an .npz, read with pread.
* `StackedRows`: several row stores (or in-memory arrays) seen as one.
* `ScaledRows`: a row store's rows as float32 times a factor (uint8-quantized segmentations).
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np


class NpyRows:
    """Rows of a C-ordered float (or uint8) .npy array read on demand with os.pread: a .npy file, or one
    array inside an uncompressed .npz (what np.savez writes), e.g. `NpyRows(samples.npz, "points")`.

    Unlike a memory map, the pages read stay in the kernel's page cache and out of this
    process's resident set, so training's peak RSS does not grow with the number of
    augmented samples (a memory map's touched pages count toward it, and np.load reads a
    whole array)."""

    def __init__(self, path, member: str | None = None):
        self.path = Path(path)
        where = f"{self.path}" + (f" [{member}]" if member else "")
        start = 0 if member is None else _stored_member_offset(self.path, member + ".npy")
        with open(self.path, "rb") as handle:
            handle.seek(start)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            self.data_offset = handle.tell()
        if fortran_order or dtype not in (np.float32, np.float64, np.uint8) or len(shape) < 2:
            raise ValueError(f"{where}: expected a C-ordered float32, float64 or uint8 stack of rows, got dtype "
                             f"{dtype}, shape {shape}{', Fortran order' if fortran_order else ''}")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        expected = self.data_offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size < expected:
            raise ValueError(f"{where}: truncated ({self.path.stat().st_size} bytes, header says {expected})")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = _row_indices(idx, len(self))
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k, row in enumerate(idx):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} outside the {self.shape[0]} rows of {self.path}")
            view = memoryview(out[k]).cast("B")
            if os.preadv(self._fd, [view], self.data_offset + int(row) * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.path}: short read at row {row}")
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _stored_member_offset(path: Path, name: str) -> int:
    """Byte offset of member `name`'s data in the zip file `path`; it must be stored uncompressed."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{path}: no array {name[:-4]!r} (has {', '.join(archive.namelist())})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {name} is compressed (np.savez_compressed?); rows can only be read "
                         f"from arrays stored uncompressed, as np.savez writes them")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)  # the zip local file header; name and extra-field lengths at bytes 26-29
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _row_indices(idx, n: int) -> np.ndarray:
    """A slice, an int or a sequence of rows as an int64 array of row numbers."""
    if isinstance(idx, slice):
        return np.arange(n)[idx]
    return np.atleast_1d(np.asarray(idx, dtype=np.int64))


class StackedRows:
    """Several row-indexable arrays (real data in memory, generated samples read by NpyRows)
    seen as one, reading only the rows asked for."""

    def __init__(self, *arrays):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), *arrays[0].shape[1:])
        self.dtype = np.result_type(*(a.dtype for a in arrays))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = _row_indices(idx, len(self))
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k, array in enumerate(self.arrays):
            inside = (idx >= self.offsets[k]) & (idx < self.offsets[k + 1])
            if inside.any():
                out[inside] = array[idx[inside] - self.offsets[k]]
        return out


class ScaledRows:
    """The rows of a row store (or array) as float32 times `factor`, e.g. uint8 segmentations as fractions."""

    def __init__(self, rows, factor: float):
        self.rows, self.factor = rows, np.float32(factor)
        self.shape, self.dtype = tuple(rows.shape), np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.rows[idx], dtype=np.float32) * self.factor
