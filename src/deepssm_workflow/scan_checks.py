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
UNREADABLE_VOXELS = "image data cannot be read: truncated or corrupt"


class ScanError(ValueError):
    """A scan that cannot be used; `problem` is the message without the scan's name."""

    def __init__(self, what: str, problem: str):
        super().__init__(f"{what}: {problem}")
        self.what, self.problem = what, problem


class IntensityTally:
    """Running counts of what `intensity_problem` checks, over a scan read in slabs."""

    def __init__(self):
        self.size = self.n_nan = self.n_inf = 0
        self.low, self.high = np.inf, -np.inf

    def add(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        self.size += array.size
        if array.size == 0:
            return
        if np.issubdtype(array.dtype, np.floating):
            n_nan, n_inf = int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))
            self.n_nan, self.n_inf = self.n_nan + n_nan, self.n_inf + n_inf
            if n_nan or n_inf:
                return  # the scan is refused for these; its range does not matter
        self.low, self.high = min(self.low, float(array.min())), max(self.high, float(array.max()))

    def problem(self) -> str | None:
        """What is wrong with the voxel values added so far, or None."""
        if self.size == 0:
            return "image has no voxels"
        if self.n_nan or self.n_inf:
            kinds = ", ".join(f"{n} {kind}" for n, kind in ((self.n_nan, "NaN"), (self.n_inf, "inf")) if n)
            return (f"{self.n_nan + self.n_inf} of {self.size} voxels are not finite ({kinds}): "
                    "a broken conversion or export")
        if self.low == self.high:
            return (f"image is constant (every voxel is {self.low:g}): no intensity variation, "
                    "a blank or empty scan")
        largest = max(abs(self.low), abs(self.high))
        if largest > MAX_ABS_INTENSITY:
            return (f"absurd intensities (range {self.low:.3g} to {self.high:.3g}; |value| above "
                    f"{MAX_ABS_INTENSITY:.0e}, where CT spans about -1024..3071 HU and MRI rarely exceeds 1e5): "
                    "wrong rescale slope or data type?")
        return None


def intensity_problem(array: np.ndarray) -> str | None:
    """What is wrong with a scan's voxel values, or None: non-finite voxels, a constant image,
    magnitudes beyond MAX_ABS_INTENSITY. Reads the array without copying it whole."""
    tally = IntensityTally()
    tally.add(array)
    return tally.problem()


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


def read_header(path, what: str) -> sitk.ImageFileReader:
    """The reader of a 3D scalar image's file with its header read and checked (the path, the
    dimension, the components per voxel: a 4D or vector image is named as such before any voxel
    is read). Raises ScanError "<what>: <problem>"."""
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
    return reader


def read_scan(path, what: str, *, intensities: bool = True) -> sitk.Image:
    """A 3D scalar image from its file, checked: the header (`read_header`), the full read (a
    truncated file has a valid header) and, unless `intensities` is False (segmentations), the
    voxel values (`check_intensities`). Returns the image with its stored pixel type.
    Raises ScanError (a ValueError) "<what>: <problem>"."""
    reader = read_header(path, what)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ScanError(what, f"{UNREADABLE_VOXELS} ({itk_reason(error)})") from None
    if intensities:
        check_intensities(sitk.GetArrayViewFromImage(image), what)
    return image


def itk_reason(error: Exception) -> str:
    """The last line of an ITK exception (the rest is source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
