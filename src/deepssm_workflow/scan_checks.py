"""Checks of a scan before anything is computed from it: a readable 3D scalar image whose voxels
are intensities.

A broken scan (NaN voxels from a failed conversion, an all-zero export, a float image scaled
by a wrong rescale slope) otherwise passes registration and the network and comes out as
garbage particles, or as an error far from its cause. Ingestion, preprocessing and
`predict-image` call these functions, so every stage refuses the same scans with the same words.

Messages read "<what>: <problem>"; `what` names the scan (e.g. "subject X: /path/file.nrrd").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# No real scan comes near this magnitude: CT is stored in Hounsfield units, about -1024..3071
# (12-bit), at most +-32768 in 16-bit files; MRI intensities are arbitrary but rarely exceed
# 1e5 (16-bit, sometimes rescaled float). 1e7 leaves two orders of magnitude of headroom over
# MRI while catching a wrong rescale slope or data type, which gives 1e9..1e38.
MAX_ABS_INTENSITY = 1e7


class ScanError(ValueError):
    """A scan that cannot be used; `problem` is the message without the scan's name."""

    def __init__(self, what: str, problem: str):
        super().__init__(f"{what}: {problem}")
        self.what, self.problem = what, problem


def intensity_problem(array: np.ndarray) -> str | None:
    """What is wrong with a scan's voxel values, or None: non-finite voxels, a constant image,
    magnitudes beyond MAX_ABS_INTENSITY. Reads the array without copying it whole."""
    array = np.asarray(array)
    if array.size == 0:
        return "image has no voxels"
    if np.issubdtype(array.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(array)))
        n_inf = int(np.count_nonzero(np.isinf(array)))
        if n_nan or n_inf:
            kinds = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "inf")) if n)
            return (f"{n_nan + n_inf} of {array.size} voxels are not finite ({kinds}): "
                    "a broken conversion or export")
    low, high = array.min(), array.max()
    if low == high:
        return f"image is constant (every voxel is {float(low):g}): no intensity variation, a blank or empty scan"
    largest = max(abs(float(low)), abs(float(high)))
    if largest > MAX_ABS_INTENSITY:
        return (f"absurd intensities (range {float(low):.3g} to {float(high):.3g}; |value| above "
                f"{MAX_ABS_INTENSITY:.0e}, where CT spans about -1024..3071 HU and MRI rarely exceeds 1e5): "
                "wrong rescale slope or data type?")
    return None


def check_intensities(array: np.ndarray, what: str) -> None:
    """Raise ScanError (a ValueError) naming `what` if the voxel values are not a usable scan."""
    problem = intensity_problem(array)
    if problem:
        raise ScanError(what, problem)


def check_scan_path(path, kind: str = "image") -> str | None:
    """What is wrong with a path given as a `kind` file before any reader touches it, or None.

    A folder is refused here because ITK's readers, handed one, try every format in turn and
    print pages of HDF5 diagnostics before failing with "file not found"."""
    path = Path(path)
    if path.is_dir():
        return f"is a folder, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} file"
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return f"is not a regular file (a device or socket?), not {'an' if kind[0] in 'aeiou' else 'a'} {kind} file"
    return None


def read_scan(path, what: str, *, intensities: bool = True) -> sitk.Image:
    """A 3D scalar image from its file, checked: the path, the header (dimension, components per
    voxel, read before the voxels so a 4D or vector image is named as such), the full read (a
    truncated file has a valid header) and, unless `intensities` is False (segmentations), the
    voxel values (`check_intensities`). Returns the image with its stored pixel type.
    Raises ScanError (a ValueError) "<what>: <problem>"."""
    problem = check_scan_path(path)
    if problem:
        raise ScanError(what, problem)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ScanError(what, f"not a readable image ({itk_reason(error)})") from None
    if reader.GetDimension() != 3:
        raise ScanError(what, f"image is {reader.GetDimension()}D; a 3D image is needed")
    if reader.GetNumberOfComponents() != 1:
        raise ScanError(what, f"image has {reader.GetNumberOfComponents()} components per voxel; "
                              "a scalar image is needed")
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ScanError(what, f"image data cannot be read: truncated or corrupt ({itk_reason(error)})") from None
    if intensities:
        check_intensities(sitk.GetArrayViewFromImage(image), what)
    return image


def itk_reason(error: Exception) -> str:
    """The last line of an ITK exception (the rest is source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
