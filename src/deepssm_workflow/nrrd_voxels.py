"""The voxels of a single-file NRRD scan, read as slabs of z-planes while they are inflated.

image2ssm's budget from file to particles is 0.2 s. An uncropped full-field scan (220^3 voxels,
gzip) took ITK about 0.08 s to inflate, then a copy to float32 and the resampling. Read in slabs,
the resampling of one slab runs on the second core while the next slab is inflated (ISA-L's
`isal`: the same DEFLATE stream, decoded with SIMD; it releases the GIL), so reading and
resampling together take little more than the inflate alone (`full_field.preprocess_scan`;
`python -m deepssm_workflow.bench --sections scans` times it against ITK's whole read).

Only the voxels are read here: the geometry (origin, spacing, direction, with NRRD's space
conventions turned into ITK's LPS) is ITK's own header reader's, so the voxels are those ITK
would give. Anything unusual (a detached header, skipped lines or bytes, another encoding, a
pixel type ITK does not map to a plain scalar) gets None, and the caller reads the file with ITK.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from isal import isal_zlib

# ITK pixel types of a scalar image, as numpy dtypes (byte order set from the header)
_DTYPES = {sitk.sitkInt8: "i1", sitk.sitkUInt8: "u1", sitk.sitkInt16: "i2", sitk.sitkUInt16: "u2",
           sitk.sitkInt32: "i4", sitk.sitkUInt32: "u4", sitk.sitkInt64: "i8", sitk.sitkUInt64: "u8",
           sitk.sitkFloat32: "f4", sitk.sitkFloat64: "f8"}
_ENCODINGS = {"gzip": "gzip", "gz": "gzip", "raw": "raw"}
_UNSUPPORTED_FIELDS = {"data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"}
_MAX_HEADER_BYTES = 1 << 16
_INPUT_PIECE = 1 << 18  # compressed bytes inflated per call: about 4 planes of a 220^2 int16 scan


class TruncatedVoxels(ValueError):
    """The file holds fewer voxels than its header promises, or a corrupt compressed stream."""


def _header(data: bytes) -> tuple[dict, int] | None:
    """The header's fields (lower-case keys) and the offset of the data (after the blank line
    that ends the header), or None."""
    end = data.find(b"\n\n", 0, _MAX_HEADER_BYTES)
    if not data.startswith(b"NRRD") or end < 0:
        return None
    fields = {}
    for line in data[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue  # comments and key/value pairs do not affect the voxels
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields, end + 2


def voxel_slabs(path, reader: sitk.ImageFileReader, planes: int = 22) -> Iterator[np.ndarray] | None:
    """The scan's voxels as (n, Y, X) arrays of its stored type, in z order (n about `planes`), for a
    single-file NRRD with gzip or raw data; None for any other file. `reader` has read the header
    (`ReadImageInformation`). Iterating raises TruncatedVoxels if the data ends early or is corrupt."""
    path = Path(path)
    dtype = _DTYPES.get(reader.GetPixelID())
    if path.suffix.lower() != ".nrrd" or dtype is None or reader.GetNumberOfComponents() != 1:
        return None
    data = path.read_bytes()
    parsed = _header(data)
    if parsed is None:
        return None
    fields, offset = parsed
    encoding = _ENCODINGS.get(fields.get("encoding", "").lower())
    if encoding is None or _UNSUPPORTED_FIELDS & set(fields):
        return None
    dtype = np.dtype(dtype).newbyteorder(">" if fields.get("endian", "little").lower() == "big" else "<")
    nx, ny, nz = reader.GetSize()
    plane_bytes = nx * ny * dtype.itemsize
    payload = memoryview(data)[offset:]

    def slab(buffer) -> np.ndarray:
        return np.frombuffer(buffer, dtype).reshape(-1, ny, nx).astype(dtype.newbyteorder("="), copy=False)

    def raw() -> Iterator[np.ndarray]:
        if len(payload) < nz * plane_bytes:
            raise TruncatedVoxels(f"{len(payload)} bytes of voxel data where the header's size needs "
                                  f"{nz * plane_bytes}")
        for z in range(0, nz, planes):
            yield slab(payload[z * plane_bytes:min(z + planes, nz) * plane_bytes])

    def inflated() -> Iterator[np.ndarray]:
        # fed in bounded pieces into one buffer: a decompress call limited by output instead copies
        # all the input it has not consumed yet, at every call
        stream, voxels = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS), np.empty(nz * plane_bytes, np.uint8)
        filled = given = 0  # bytes inflated, planes yielded
        try:
            for start in range(0, len(payload), _INPUT_PIECE):
                piece = stream.decompress(payload[start:start + _INPUT_PIECE])[:len(voxels) - filled]
                voxels[filled:filled + len(piece)] = np.frombuffer(piece, np.uint8)
                filled += len(piece)
                complete = filled // plane_bytes
                if given < nz and (complete - given >= planes or complete == nz):
                    yield slab(voxels[given * plane_bytes:complete * plane_bytes])
                    given = complete
                if stream.eof:  # read to the gzip trailer: its checksum vouches for every voxel yielded
                    break
        except isal_zlib.error as error:
            raise TruncatedVoxels(f"corrupt gzip data after {filled} bytes of voxels ({error})") from None
        if given < nz:
            raise TruncatedVoxels(f"the gzip data ends after {filled} of {nz * plane_bytes} bytes of voxels")
        if not stream.eof:
            raise TruncatedVoxels("the gzip data ends before its checksum: the voxels cannot be verified")

    return raw() if encoding == "raw" else inflated()
