"""The slab reader of single-file NRRD scans (`nrrd_voxels`) gives ITK's voxels, refuses what ITK
refuses with the same words, and leaves every other file to ITK; `full_field.preprocess_scan`
gives the same array through it as through ITK's whole read."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from deepssm_workflow import full_field, nrrd_voxels
from deepssm_workflow.full_field import preprocess_scan
from deepssm_workflow.nrrd_voxels import voxel_slabs
from deepssm_workflow.scan_checks import ScanError, read_header

RNG = np.random.default_rng(3)
SHAPE = (13, 9, 11)  # z, y, x: 13 planes, so slabs of 4 leave a short last one


def _image(dtype) -> sitk.Image:
    values = RNG.normal(100, 40, SHAPE) if np.dtype(dtype).kind == "f" else RNG.integers(0, 200, SHAPE)
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetOrigin((-12.5, 3.0, 40.25))
    image.SetSpacing((0.8, 1.1, 1.7))
    return image


def _slabs(path, planes):
    slabs = voxel_slabs(path, read_header(path, "scan"), planes)
    return None if slabs is None else list(slabs)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("compressed", [True, False])
def test_slabs_are_itks_voxels(tmp_path, monkeypatch, dtype, compressed):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(_image(dtype), str(path), useCompression=compressed)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    monkeypatch.setattr(nrrd_voxels, "_INPUT_PIECE", 97)  # many pieces, none a whole plane
    for planes in (1, 4, 50):
        slabs = _slabs(path, planes)
        sizes = [len(s) for s in slabs]
        assert min(sizes[:-1], default=planes) >= planes and sum(sizes) == SHAPE[0]
        voxels = np.concatenate(slabs)
        assert voxels.dtype == expected.dtype and np.array_equal(voxels, expected)


def test_a_big_endian_file_written_by_hand_reads_as_itk_reads_it(tmp_path):
    """Another writer's NRRD (teem's fields, big-endian, 'gz', comments and a key/value pair)."""
    values = RNG.integers(-1024, 3000, SHAPE).astype(">i2")
    header = ("NRRD0004\n# written by hand\ntype: int16\ndimension: 3\nspace: right-anterior-superior\n"
              f"sizes: {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\nspace directions: (1,0,0) (0,1,0) (0,0,2)\n"
              "kinds: domain domain domain\nendian: big\nencoding: gz\nspace origin: (10,20,30)\nmodality:=CT\n\n")
    path = tmp_path / "teem.nrrd"
    path.write_bytes(header.encode() + gzip.compress(values.tobytes()))
    voxels = np.concatenate(_slabs(path, 5))
    assert np.array_equal(voxels, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert np.array_equal(voxels, values.astype(np.int16)) and voxels.dtype.isnative


def test_files_it_does_not_read_are_left_to_itk(tmp_path):
    image = _image(np.int16)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "detached.nhdr"))
    sitk.WriteImage(image, str(tmp_path / "skip.nrrd"), useCompression=False)
    text = (tmp_path / "skip.nrrd").read_bytes()
    end = text.index(b"\n\n")
    (tmp_path / "skip.nrrd").write_bytes(text[:end] + b"\nbyte skip: 0" + text[end:])
    for name in ("scan.nii.gz", "detached.nhdr", "skip.nrrd"):
        assert _slabs(tmp_path / name, 4) is None, name


META = {"spacing_mm": 2.5, "size": [6, 6, 8], "normalization": {"mean": 90.0, "std": 30.0}}


def _through_itk(monkeypatch, path, what="scan", meta=META):
    with monkeypatch.context() as patch:
        patch.setattr(full_field, "voxel_slabs", lambda *args: None)
        return preprocess_scan(path, meta, what)


@pytest.mark.parametrize("compressed", [True, False])
def test_preprocess_scan_gives_the_same_array_streamed(tmp_path, monkeypatch, compressed):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(_image(np.int16), str(path), useCompression=compressed)
    streamed, through_itk = preprocess_scan(path, META), _through_itk(monkeypatch, path)
    assert np.array_equal(streamed[0], through_itk[0])
    assert np.array_equal(streamed[1], through_itk[1]) and streamed[2] == through_itk[2]
    wide = dict(META, size=[12, 12, 14])  # wider than the scan: filled with the same median outside
    assert np.array_equal(preprocess_scan(path, wide)[0], _through_itk(monkeypatch, path, meta=wide)[0])


@pytest.mark.parametrize("compressed", [True, False])
def test_a_truncated_file_is_refused_as_itk_refuses_it(tmp_path, monkeypatch, compressed):
    path = tmp_path / "cut.nrrd"
    sitk.WriteImage(_image(np.int16), str(path), useCompression=compressed)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - len(data) // 3])
    words = "subject s1: cut.nrrd: image data cannot be read: truncated or corrupt ("
    for read in (lambda: preprocess_scan(path, META, "subject s1: cut.nrrd"),
                 lambda: _through_itk(monkeypatch, path, "subject s1: cut.nrrd")):
        with pytest.raises(ScanError) as error:
            read()
        assert str(error.value).startswith(words), error.value


@pytest.mark.parametrize("edit", [lambda a: a.__setitem__((5, 4, 3), np.nan), lambda a: a.fill(7.0),
                                  lambda a: a.__imul__(1e30)])
def test_bad_intensities_are_refused_with_read_scans_words(tmp_path, monkeypatch, edit):
    values = RNG.normal(100, 40, SHAPE).astype(np.float32)
    edit(values)
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)
    with pytest.raises(ScanError) as streamed:
        preprocess_scan(path, META, "subject s2: bad.nrrd")
    with pytest.raises(ScanError) as whole:
        _through_itk(monkeypatch, path, "subject s2: bad.nrrd")
    assert str(streamed.value) == str(whole.value)


def _big_gzip_scan(path) -> bytes:
    """A compressed scan of several input pieces (about 1 MB of gzip), so slabs are yielded before the end."""
    values = np.random.default_rng(5).integers(0, 2000, (60, 100, 110)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["flip in the middle", "flip near the end", "trailer cut"])
def test_corrupt_gzip_is_refused_though_slabs_were_given_before(tmp_path, monkeypatch, damage):
    path = tmp_path / "corrupt.nrrd"
    data = bytearray(_big_gzip_scan(path))
    assert len(data) > 3 * nrrd_voxels._INPUT_PIECE
    if damage == "trailer cut":  # the voxels all there, the checksum and size that vouch for them missing
        data = data[:-8]
    else:
        data[len(data) // 2 if damage == "flip in the middle" else len(data) - 300] ^= 0x01
    path.write_bytes(bytes(data))
    words = "subject s3: corrupt.nrrd: image data cannot be read: truncated or corrupt ("
    for read in (lambda: preprocess_scan(path, META, "subject s3: corrupt.nrrd"),
                 lambda: _through_itk(monkeypatch, path, "subject s3: corrupt.nrrd")):
        with pytest.raises(ScanError) as error:
            read()
        assert str(error.value).startswith(words), error.value


def test_a_gzip_stream_without_its_size_field_is_refused_though_itk_reads_it(tmp_path, monkeypatch):
    # stricter than ITK on purpose: without the whole trailer the stream's end is not verified
    path = tmp_path / "short.nrrd"
    path.write_bytes(_big_gzip_scan(path)[:-4])
    _through_itk(monkeypatch, path)
    with pytest.raises(ScanError, match="ends before its checksum"):
        preprocess_scan(path, META, "subject s4: short.nrrd")
