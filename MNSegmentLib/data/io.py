"""Reading and writing images (SimpleITK) and small files, always atomically."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MNSegmentLib.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


def case_name(path: str | Path) -> str:
    """File name without its image extension (``a/b/ct_01.nii.gz`` -> ``ct_01``); a DICOM folder's own name."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | Path) -> sitk.Image:
    """Reads a NIfTI/NRRD/NHDR/MHA/MHD file or a DICOM series folder as one 3D scalar image."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path in your datalist or command line")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path}: a folder, but no DICOM series was found in it")
            if len(series) > 1:
                raise InputError(
                    f"{path}: holds {len(series)} DICOM series; put each series in its own folder"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise InputError(f"{path}: cannot be read as an image ({first}); use NIfTI, NRRD, MHA or DICOM") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "MNSegment needs a scalar (grey-level) 3D image")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is {image.GetDimension()}D; MNSegment needs a 3D image")
    _check_finite(image, path)
    return image


def _check_finite(image: sitk.Image, path: Path) -> None:
    """NaN or infinite voxels would poison normalisation and every loss: refused, not guessed at."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return  # integer voxels are always finite
    values = sitk.GetArrayViewFromImage(image)
    if np.isfinite(values.sum(dtype=np.float64)):  # one pass, no temporary array: the usual case
        return
    nan = int(np.count_nonzero(np.isnan(values)))
    infinite = int(np.count_nonzero(np.isinf(values)))
    if nan or infinite:
        raise InputError(f"{path}: {nan} NaN and {infinite} infinite voxel(s) of {values.size}; MNSegment does not "
                         "guess values for them: replace them (e.g. with the background intensity) and save the "
                         "image again")


def array_xyz(image: sitk.Image, dtype: Any = np.float32) -> np.ndarray:
    """Voxel array in (x, y, z) index order (SimpleITK gives (z, y, x))."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0)).astype(dtype, copy=False)


def image_from_xyz(array: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    if like is not None:
        image.CopyInformation(like)
    return image


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``: renamed to ``path`` if the block succeeds, removed in any case, so
    ``path`` is either absent (or its old self) or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Writes so that ``path`` is either absent or complete: temp file in the same folder, read back, then
    renamed. (SimpleITK's NIfTI writer does not report a full disk: it leaves a truncated file and returns.)"""
    path = Path(path)
    with _replacing(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
            sitk.ReadImage(str(tmp))
        except RuntimeError as err:
            raise write_failed(path, err) from None
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    with _replacing(path) as tmp:
        try:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as err:
            raise write_failed(path, err) from None
    return path


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file-size limit, quota


def write_failed(path: Path, err: Exception) -> InputError:
    """One message for a write that failed half-way (full disk, file-size limit or quota, a lost drive)."""
    if isinstance(err, OSError) and err.errno is not None:
        reason = os.strerror(err.errno)
    else:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    return InputError(f"{path}: could not be written ({reason}; {free:.1f} GB free there); nothing half-written "
                      "was kept. Free disk space or choose another folder, then run the command again (a stopped "
                      "training continues from its last checkpoint with 'mnsegment resume RUN_DIR')")


def writable_folder(folder: Path, option: str) -> None:
    """Creates ``folder`` (and its parents) and checks a file can be made in it, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mnsegment-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{folder}: cannot write there ({os.strerror(err.errno) if err.errno else err}); "
                         f"choose an {option} folder you can write to") from None
