"""Reading and writing images, displacement fields and output folders.

World convention: fastimpact works in nibabel's RAS+ millimetres everywhere. This module is the
one place that converts to ITK's LPS convention (:func:`ras_to_lps`, :func:`lps_to_ras`,
:func:`ras_matrix_to_lps`), for displacement fields that ITK, ANTs, SimpleITK and 3D Slicer read.

nibabel is imported inside the functions, so ``import fastimpact.io`` stays cheap.

Errors: :class:`~fastimpact.errors.ImageIOError` (an ``OSError``) for files that cannot be read or
written, :class:`~fastimpact.errors.ImageError` (a ``ValueError``) for content that cannot be
registered. Every message is one line and names the role ("fixed image", ...) and the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import ImageError, ImageIOError
from .image import Image, to_numpy, check_affine, check_finite, describe

__all__ = [
    "load_image",
    "save_image",
    "save_displacement_itk",
    "load_displacement_itk",
    "ras_to_lps",
    "lps_to_ras",
    "ras_matrix_to_lps",
    "output_dir",
    "remove_stale_temporaries",
    "atomic_write_path",
    "NIFTI_EXTENSIONS",
    "ITK_EXTENSIONS",
    "affine_from_itk",
    "itk_from_affine",
    "XFORM_CODE",
]

#: File name endings read and written (case-insensitive).
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

#: Endings read and written through SimpleITK (the ``itk`` extra); a folder is read as a DICOM series.
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr")

#: The two-file formats among them (a header plus a data file named after it).
ITK_HEADER_EXTENSIONS = (".mhd", ".nhdr")

_ITK_HINT = 'pip install "fastimpact[itk]"'

#: sform/qform code written by :func:`save_image` and :func:`save_displacement_itk`:
#: 1 = NIFTI_XFORM_SCANNER_ANAT. The same affine goes into both sform and qform, so readers that
#: prefer either one see the same grid (the qform cannot hold shear: a sheared affine is exact in
#: the sform only). Code 1 is the one every reader treats as a valid world transform.
XFORM_CODE = 1

_NIFTI_INTENT_VECTOR = 1007
_NIFTI_INTENT_DISPVECT = 1006
_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


# -- world convention ----------------------------------------------------------------------------

def ras_to_lps(points) -> np.ndarray:
    """RAS+ mm points or vectors (..., 3) -> ITK's LPS mm: ``(-x, -y, z)``.

    The flip is its own inverse and applies alike to points and displacement vectors.
    """
    return np.asarray(points, dtype=np.float64) * _LPS_FLIP


def lps_to_ras(points) -> np.ndarray:
    """ITK's LPS mm points or vectors (..., 3) -> RAS+ mm: ``(-x, -y, z)``."""
    return np.asarray(points, dtype=np.float64) * _LPS_FLIP


def ras_matrix_to_lps(matrix) -> np.ndarray:
    """A 4x4 world->world (or voxel->world) matrix in RAS -> the same map in LPS.

    For a world->world transform ``T`` (RAS -> RAS) the LPS version is ``F @ T @ F`` with
    ``F = diag(-1, -1, 1, 1)``. For a voxel->world affine use ``F @ A`` instead (voxel indices
    have no world convention); this function handles the world->world case only.
    """
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    return f @ np.asarray(matrix, dtype=np.float64) @ f


# -- helpers -----------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_extension(p: Path, who: str, nifti_only: bool = False) -> None:
    ok = NIFTI_EXTENSIONS if nifti_only else NIFTI_EXTENSIONS + ITK_EXTENSIONS
    if not p.name.lower().endswith(ok):
        suffix = "".join(p.suffixes) or "(none)"
        raise ImageIOError(
            f"{who} has an unsupported extension {suffix}; fastimpact reads and writes NIfTI "
            + ("(.nii, .nii.gz)" if nifti_only else "(.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr) "
               "and DICOM series folders")
            + ": convert it first (e.g. with SimpleITK or 3D Slicer)"
        )


def _is_itk_path(p: Path) -> bool:
    return p.name.lower().endswith(ITK_EXTENSIONS)


def _check_readable_file(p: Path, who: str) -> None:
    if not p.exists():
        raise ImageIOError(f"{who} does not exist; check the path")
    if p.is_dir():
        raise ImageIOError(f"{who} is a folder, not a file; give the path of a .nii or .nii.gz file")
    _check_extension(p, who)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageIOError(f"{who} cannot be read ({_one_line(e)})") from None
    if size == 0:
        raise ImageIOError(f"{who} is empty (0 bytes); the file is incomplete: copy or export it again")
    if not os.access(p, os.R_OK):
        raise ImageIOError(f"{who} is not readable (permission denied); fix its permissions")


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs (and then silently 'fixes') bad pixdims; we report them ourselves."""
    log = logging.getLogger("nibabel.global")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _nib_load(p: Path, who: str):
    import nibabel as nib

    with _quiet_nibabel():
        try:
            img = nib.load(str(p), mmap=False)
        except MemoryError:
            raise
        except Exception as e:  # nibabel raises many types (ImageFileError, OSError, EOFError, ...)
            raise ImageIOError(
                f"{who} cannot be read as NIfTI ({_one_line(e)}); check that it is a valid "
                ".nii/.nii.gz file"
            ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageIOError(
            f"{who} is a {type(img).__name__}, not NIfTI; convert it to .nii/.nii.gz first"
        )
    return img


def _raw_pixdim(p: Path, img) -> np.ndarray:
    """pixdim[1:4] as stored in the file (nibabel's loaded header has them 'fixed' already)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(p), "rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # unreadable here means readable above: fall back to the loaded header
        return np.asarray(img.header["pixdim"][1:4], dtype=np.float64)


def _checked_affine(p: Path, img, who_role: str, name: str) -> np.ndarray:
    """nibabel's affine (sform if its code > 0, else qform, else pixdim only), validated.

    When loading, nibabel replaces zero pixdims by 1 and negative ones by their absolute value;
    when the affine is built from the pixdims (no sform) such a header is broken, so we refuse it.
    """
    hdr = img.header
    who = describe(who_role, name)
    sform_code = int(hdr["sform_code"])
    if sform_code == 0:
        pix = _raw_pixdim(p, img)
        if not np.all(np.isfinite(pix)) or np.any(pix <= 0):
            raise ImageError(
                f"{who} has invalid voxel spacing (pixdim) {tuple(pix.tolist())} mm: spacing must "
                "be finite and > 0; fix the header (e.g. nibabel header.set_zooms)"
            )
    with _quiet_nibabel():
        affine = img.affine
    if affine is None:
        raise ImageError(f"{who} has no affine; fix the header")
    return check_affine(affine, who_role, name)


def _squeeze_to_3d(shape: tuple, who: str) -> tuple:
    shape = tuple(int(n) for n in shape)
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        return shape[:3]
    if len(shape) == 3:
        return shape
    raise ImageError(
        f"{who} is {len(shape)}-D {shape}; fastimpact registers 3-D images: "
        + ("extract one volume first" if len(shape) > 3 else "give a 3-D volume")
    )


def _has_scaling(img) -> bool:
    """True when the stored values are scaled (scl_slope/scl_inter) on reading.

    nibabel moves the scale factors from the header into ``img.dataobj`` when it loads a file.
    """
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return bool(slope != 1.0 or inter != 0.0)


# -- images ------------------------------------------------------------------------------------

def load_image(path, *, role: str = "image", dtype=None, allow_nonfinite: bool = False) -> Image:
    """Read a 3-D NIfTI image (.nii or .nii.gz).

    Parameters
    ----------
    path : str or PathLike.
    role : how messages name the image, e.g. ``"fixed image"``, ``"moving mask"``.
    dtype : None keeps the stored type: integer images (labels, masks) stay integer, float stays
        float; data with a scale factor (scl_slope/scl_inter) become float32 (scaled by nibabel).
        A float dtype reads through ``get_fdata`` (scaled); an integer dtype rounds, and values
        out of that type's range are an error.
    allow_nonfinite : False (default) rejects float images containing NaN/Inf.

    Returns
    -------
    Image with ``data`` (X, Y, Z) indexed as nibabel gives it and ``affine`` = nibabel's
    ``img.affine`` (sform when its code > 0, else qform), voxel -> RAS+ mm, kept in full
    (oblique, flipped and permuted axes included). A 4-D file with a single volume
    (X, Y, Z, 1) is squeezed to 3-D.

    Raises
    ------
    ImageIOError : missing file, folder, empty, truncated or corrupt file, not NIfTI,
        unsupported extension.
    ImageError : not 3-D, singular / non-finite affine, bad spacing, NaN/Inf voxels,
        unsupported data type.
    """
    p = Path(path)
    name = str(path)
    who = describe(role, name)
    if p.is_dir() or (_is_itk_path(p) and p.exists()):
        return _load_itk(p, role, name, dtype, allow_nonfinite)
    _check_readable_file(p, who)
    img = _nib_load(p, who)
    shape3 = _squeeze_to_3d(img.shape, who)
    affine = _checked_affine(p, img, role, name)

    hdr = img.header
    disk = np.dtype(hdr.get_data_dtype())
    if disk.kind not in "biuf" or disk.fields is not None:
        raise ImageError(
            f"{who} stores data of type {disk} (complex or RGB); fastimpact registers scalar "
            "images: convert it to a grey-level image first"
        )
    target = None if dtype is None else np.dtype(dtype)
    if target is not None and target.kind not in "biuf":
        raise ImageError(f"dtype {target} is not supported; use a float or integer type")

    try:
        if target is not None and target.kind == "f":
            data = img.get_fdata(dtype=target)
        elif target is None and _has_scaling(img):
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageIOError(
            f"{who} is truncated or corrupt: reading its voxels failed ({_one_line(e)}); copy "
            "or export the file again"
        ) from None
    data = np.asarray(data).reshape(shape3)

    if target is not None and target.kind in "biu" and data.dtype != target:
        data = _to_integer(data, target, who)

    image = Image(data, affine, name)
    if not allow_nonfinite:
        check_finite(image, role)
    return image


def _to_integer(data: np.ndarray, target: np.dtype, who: str) -> np.ndarray:
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise ImageError(f"{who} contains NaN/Inf voxels, which cannot become {target}")
        data = np.rint(data)
    info = np.iinfo(target) if target.kind in "iu" else None
    if info is not None and data.size:
        lo, hi = data.min(), data.max()
        if lo < info.min or hi > info.max:
            raise ImageError(
                f"{who} has values in [{lo}, {hi}], outside the range of {target} "
                f"[{info.min}, {info.max}]; choose a wider dtype"
            )
    return data.astype(target)


def _nifti_dtype(dtype: np.dtype) -> np.dtype:
    """The NIfTI type used for an in-memory dtype (NIfTI has no bool/float16)."""
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    if dtype.kind == "f" and dtype.itemsize > 8:
        return np.dtype(np.float64)
    if dtype.kind in "iuf":
        return dtype
    raise ImageError(f"cannot write data of type {dtype}; use a float or integer type")


def _set_geometry(nimg, affine: np.ndarray) -> None:
    nimg.set_sform(affine, code=XFORM_CODE)
    nimg.set_qform(affine, code=XFORM_CODE)
    nimg.header.set_xyzt_units(xyz="mm")


def _write(nimg, p: Path, who: str) -> None:
    try:
        if p.name.lower().endswith(".gz") and _fast_gzip() is not None:
            # ISA-L's deflate at level 1 is ~10x faster than zlib's for these volumes (a 1 mm
            # brain displacement field: 0.24 s vs 2.8 s) and any gzip reader reads it.
            with open(p, "wb") as fh:
                _write_gzip(fh, nimg.to_bytes())
        else:
            nimg.to_filename(str(p))
    except MemoryError:
        raise
    except Exception as e:
        raise ImageIOError(f"{who} cannot be written ({_one_line(e)}); choose another path") from None


def _write_raw(header, disk_order: np.ndarray, p: Path, who: str) -> None:
    """Write a NIfTI-1 single file from its header and the voxel data already in disk order."""
    import io as _io

    hdr = _io.BytesIO()
    header.write_to(hdr)
    offset = int(header.get_data_offset()) or 352
    head = hdr.getvalue()
    blob = head + b"\x00" * (offset - len(head))
    data = memoryview(np.ascontiguousarray(disk_order)).cast("B")
    try:
        if p.name.lower().endswith(".gz"):
            with open(p, "wb") as fh:
                _write_gzip(fh, blob, data)
        else:
            with open(p, "wb") as fh:
                fh.write(blob)
                fh.write(data)
    except MemoryError:
        raise
    except OSError as e:
        raise ImageIOError(f"{who} cannot be written ({_one_line(e)}); choose another path") from None


#: Bytes compressed per call when writing gzip: the compressed output is written as it comes,
#: so a volume never has a second (compressed) copy in memory.
GZIP_CHUNK = 16 << 20


def _write_gzip(fh, *buffers) -> None:
    """Write ``buffers`` (bytes-like, in order) to ``fh`` as one gzip member, deflate level 1.

    The gzip header carries mtime 0 (no timestamp, so identical runs write identical bytes) and
    the data go through in :data:`GZIP_CHUNK` pieces (no whole compressed copy in memory).
    """
    try:
        from isal import isal_zlib as zlib_mod  # ISA-L deflate, ~10x faster than zlib
    except ImportError:  # pragma: no cover - platforms without isal wheels
        import zlib as zlib_mod
    co = zlib_mod.compressobj(1, zlib_mod.DEFLATED, 31)  # wbits 31: a gzip member, mtime 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        for start in range(0, len(view), GZIP_CHUNK):
            fh.write(co.compress(view[start:start + GZIP_CHUNK]))
    fh.write(co.flush())


def _fast_gzip():
    """isal.igzip when installed (a dependency; optional only for platforms without wheels)."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - depends on the platform
        return None
    return igzip


def save_image(img: Image, path, dtype=None) -> None:
    """Write ``img`` as NIfTI (.nii or .nii.gz, chosen by the file name).

    The affine goes into both the sform and the qform with code :data:`XFORM_CODE` (1, scanner
    anatomical). ``dtype`` None keeps the data type (integer label images stay integer, bool
    becomes uint8, float16 becomes float32). An integer ``dtype`` rounds float data itself (so no
    scale factor is stored) and refuses values out of range. Data are written without scaling
    (scl_slope unset). The file is written in place: wrap the call in :func:`atomic_write_path`
    or :func:`output_dir` for all-or-nothing outputs.
    """
    import nibabel as nib

    p = Path(path)
    who = describe("output", str(path))
    _check_extension(p, who)
    data = to_numpy(img.data)
    if _is_itk_path(p):
        return _save_itk(data, img.affine, p, who, dtype)
    data, out = _output_data(data, dtype, who)
    header = nib.Nifti1Header()
    header.set_data_dtype(out)
    nimg = nib.Nifti1Image(data, img.affine, header=header)
    _set_geometry(nimg, img.affine)
    # Values are stored exactly as given: no slope/intercept.
    nimg.header.set_slope_inter(np.nan, np.nan)
    _write(nimg, p, who)


# -- ITK formats (MetaImage, NRRD, DICOM) through SimpleITK ---------------------------------------

def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """ITK geometry (LPS origin, spacing, row-major 3x3 direction cosines) -> voxel -> RAS affine.

    ITK places index ``(i, j, k)`` at ``origin + D @ diag(spacing) @ (i, j, k)`` in LPS; RAS flips
    the first two world axes: ``A = F @ [D diag(s) | origin]`` with ``F = diag(-1, -1, 1)``.
    """
    a = np.eye(4)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    a[:3, :3] = d * np.asarray(spacing, dtype=np.float64).reshape(1, 3)
    a[:3, 3] = np.asarray(origin, dtype=np.float64).reshape(3)
    a[:3] *= _LPS_FLIP[:, None]
    return a


def itk_from_affine(affine) -> tuple:
    """Voxel -> RAS affine -> ITK geometry ``(origin, spacing, direction)`` (LPS; direction row-major
    9-tuple with unit columns). Exact inverse of :func:`affine_from_itk`; a sheared affine keeps its
    (non-orthogonal) direction columns."""
    a = np.asarray(affine, dtype=np.float64)[:3] * _LPS_FLIP[:, None]
    spacing = np.linalg.norm(a[:, :3], axis=0)
    direction = a[:, :3] / spacing
    return tuple(a[:, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _sitk(who: str, what: str):
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ImageIOError(f"{who}: {what} needs SimpleITK, which is not installed: {_ITK_HINT}") from None
    return sitk


def _read_dicom_series(sitk, p: Path, who: str):
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    except Exception as e:
        raise ImageIOError(f"{who} cannot be read as a DICOM series folder ({_one_line(e)})") from None
    if not ids:
        raise ImageIOError(
            f"{who} is a folder with no DICOM series in it; give an image file (.nii, .nii.gz, .mha, .mhd, .nrrd) "
            "or the folder of one DICOM series"
        )
    if len(ids) > 1:
        raise ImageIOError(
            f"{who} holds {len(ids)} DICOM series ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}); "
            "give the folder of one series (move the others out)"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _load_itk(p: Path, role: str, name: str, dtype, allow_nonfinite: bool) -> Image:
    """load_image for MetaImage / NRRD files and DICOM series folders (see :func:`load_image`)."""
    who = describe(role, name)
    if p.is_dir():
        sitk = _sitk(who, "reading a DICOM series folder")
        simg = _read_dicom_series(sitk, p, who)
    else:
        _check_readable_file(p, who)
        sitk = _sitk(who, f"reading {''.join(p.suffixes[-1:])} files")
        try:
            simg = sitk.ReadImage(str(p))
        except MemoryError:
            raise
        except Exception as e:
            raise ImageIOError(
                f"{who} cannot be read ({_one_line(e)}); check that it is a valid, complete "
                f"{p.suffix} file (and its data file, for .mhd/.nhdr)"
            ) from None
    if simg.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{who} has {simg.GetNumberOfComponentsPerPixel()} components per voxel (a vector, RGB or complex "
            "image); fastimpact registers scalar images: convert it to a grey-level image first"
        )
    size = tuple(int(n) for n in simg.GetSize())
    shape3 = _squeeze_to_3d(size, who)
    if simg.GetDimension() > 3:
        simg = simg[:, :, :, 0] if simg.GetDimension() == 4 else simg
    data = sitk.GetArrayFromImage(simg)  # (z, y, x): ITK index (i, j, k) is data[k, j, i]
    data = np.ascontiguousarray(data.reshape(shape3[::-1]).transpose(2, 1, 0))
    if data.dtype.kind not in "biuf":
        raise ImageError(f"{who} stores data of type {data.dtype}; fastimpact registers scalar images")
    try:
        affine = affine_from_itk(simg.GetOrigin()[:3], simg.GetSpacing()[:3],
                                 np.asarray(simg.GetDirection()).reshape(simg.GetDimension(), -1)[:3, :3])
    except Exception:  # pragma: no cover - ITK has validated its geometry
        raise ImageError(f"{who} has an unreadable geometry (origin, spacing, direction); fix the header") from None
    spacing = np.asarray(simg.GetSpacing()[:3], dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(f"{who} has invalid voxel spacing {tuple(spacing.tolist())} mm: spacing must be finite and "
                         "> 0; fix the header")
    affine = check_affine(affine, role, name)
    target = None if dtype is None else np.dtype(dtype)
    if target is not None:
        if target.kind not in "biuf":
            raise ImageError(f"dtype {target} is not supported; use a float or integer type")
        data = _to_integer(data, target, who) if target.kind in "biu" else data.astype(target)
    image = Image(data, affine, name)
    if not allow_nonfinite:
        check_finite(image, role)
    return image


def _output_data(data: np.ndarray, dtype, who: str):
    """(data, dtype) as written: the stored type of ``data`` (or the requested ``dtype``) mapped to one
    every format stores; integers requested from floats are rounded and range-checked."""
    if dtype is None:
        out = _nifti_dtype(data.dtype)
        if out != data.dtype:
            data = data.astype(out)
    else:
        out = _nifti_dtype(np.dtype(dtype))
        if data.dtype != out:
            data = _to_integer(data, out, who) if out.kind in "iu" else data.astype(out)
    return data, out


def _save_itk(data: np.ndarray, affine, p: Path, who: str, dtype) -> None:
    """save_image for .mha / .mhd / .nrrd / .nhdr (compressed; the same dtype rules as NIfTI)."""
    sitk = _sitk(who, f"writing {p.suffix} files")
    data, out = _output_data(data, dtype, who)
    if data.ndim != 3:
        raise ImageError(f"{who}: data of shape {data.shape} is not 3-D; nothing was written")
    simg = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), isVector=False)
    origin, spacing, direction = itk_from_affine(affine)
    simg.SetOrigin(origin)
    simg.SetSpacing(spacing)
    simg.SetDirection(direction)
    try:
        sitk.WriteImage(simg, str(p), True)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageIOError(f"{who} cannot be written ({_one_line(e)}); choose another path") from None


# -- displacement fields (ITK convention) --------------------------------------------------------

def save_displacement_itk(field, reference: Image, path) -> None:
    """Write a dense displacement field as an ITK/ANTs displacement-field transform.

    Parameters
    ----------
    field : (X, Y, Z, 3) displacement in RAS+ mm on the grid of ``reference``. Convention: the
        fixed-image world point ``x`` corresponds to the moving-image point ``x + u(x)``.
    reference : Image whose shape and affine define the grid (normally the fixed image).
    path : .nii or .nii.gz.

    The file is NIfTI with shape (X, Y, Z, 1, 3), intent code 1007 ('vector'), float32, the
    reference affine as sform and qform, and vector components in LPS ``(-ux, -uy, uz)``, which is
    how ITK, SimpleITK (``sitk.DisplacementFieldTransform``), ANTs (``antsApplyTransforms``) and
    3D Slicer read a displacement field: ITK's ``TransformPoint(p_lps)`` returns ``p_lps + u_lps``,
    the moving point in LPS.
    """
    import nibabel as nib

    p = Path(path)
    who = describe("displacement field", str(path))
    _check_extension(p, who, nifti_only=True)
    u = to_numpy(field)
    if u.shape != reference.shape + (3,):
        raise ImageError(
            f"displacement field has shape {u.shape}; it must be the reference grid plus 3 "
            f"components {reference.shape + (3,)}"
        )
    if u.dtype.kind != "f":
        u = u.astype(np.float64)
    if not np.all(np.isfinite(u)):
        raise ImageError(f"{who}: the field contains NaN/Inf; nothing was written")
    # On disk NIfTI is Fortran-ordered (x fastest, then y, z, t, component): fill that layout
    # directly as a C-ordered (3, 1, Z, Y, X) array, flipping x and y to LPS on the way, so the
    # 100+ MB field of a 1 mm brain is copied once instead of three times.
    X, Y, Z = reference.shape
    disk = np.empty((3, 1, Z, Y, X), dtype=np.float32)
    for c, sign in enumerate(_LPS_FLIP):
        np.multiply(u[..., c].T, sign, out=disk[c, 0], casting="unsafe")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    nimg = nib.Nifti1Image(np.zeros((1, 1, 1, 1, 3), np.float32), reference.affine, header=header)
    _set_geometry(nimg, reference.affine)
    nimg.header.set_data_shape((X, Y, Z, 1, 3))
    nimg.header.set_intent("vector", (), name="")
    nimg.header.set_slope_inter(np.nan, np.nan)
    _write_raw(nimg.header, disk, p, who)


def load_displacement_itk(path) -> tuple[np.ndarray, Image]:
    """Read an ITK-style displacement field written by :func:`save_displacement_itk`, ANTs or ITK.

    Returns
    -------
    field : (X, Y, Z, 3) float64, displacement in RAS+ mm (fixed point ``x`` -> moving point
        ``x + u(x)``).
    reference : Image with the field's grid (shape and affine). Its ``data`` is a read-only
        zero placeholder of shape (X, Y, Z), dtype uint8, that takes no memory.

    The file must be 5-D (X, Y, Z, 1, 3) with intent 'vector' (1007) or 'dispvect' (1006). The
    intent decides the vector convention, as ITK (5.3 and later) reads and writes them: 1007
    holds LPS components (ITK's own, ANTs, :func:`save_displacement_itk`); 1006 holds RAS
    components, NIfTI's world frame (current ITK, 3D Slicer and FreeSurfer write 1006 so and ITK
    flips them to LPS on reading).
    """
    p = Path(path)
    name = str(path)
    who = describe("displacement field", name)
    _check_readable_file(p, who)
    img = _nib_load(p, who)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
        raise ImageError(
            f"{who} has shape {shape}; an ITK displacement field has shape (X, Y, Z, 1, 3): "
            "write it with fastimpact, ANTs or ITK"
        )
    intent = int(img.header["intent_code"])
    if intent not in (_NIFTI_INTENT_VECTOR, _NIFTI_INTENT_DISPVECT):
        raise ImageError(
            f"{who} has NIfTI intent code {intent}; an ITK displacement field has intent 1007 "
            "('vector'): write it with fastimpact, ANTs or ITK"
        )
    affine = _checked_affine(p, img, "displacement field", name)
    try:
        lps = img.get_fdata(dtype=np.float64)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageIOError(
            f"{who} is truncated or corrupt: reading its voxels failed ({_one_line(e)})"
        ) from None
    stored = lps.reshape(shape[:3] + (3,))
    field = stored if intent == _NIFTI_INTENT_DISPVECT else stored * _LPS_FLIP
    if not np.all(np.isfinite(field)):
        raise ImageError(f"{who} contains NaN/Inf displacements; the field is unusable")
    placeholder = np.broadcast_to(np.zeros((), dtype=np.uint8), shape[:3])
    return field, Image(placeholder, affine, name)


# -- atomic outputs ------------------------------------------------------------------------------

def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last), for clean-up on failure."""
    missing = []
    d = folder
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            # another run made it between the check and here (concurrent runs into one new
            # folder): fine when it is a folder, and not ours to remove on failure
            if not d.is_dir():
                raise
            continue
        created.append(d)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


_DEFER: dict = {"depth": 0, "pending": None}


@contextlib.contextmanager
def signals_deferred():
    """A block that an interruption must not cut (moving a set of outputs into place).

    A cooperating signal handler (the command line's SIGINT / SIGTERM handler) calls
    :func:`defer_interrupt` with the exception it would raise; inside this block the exception is
    kept and raised when the block ends, so the block runs to its end.
    """
    _DEFER["depth"] += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _DEFER["depth"] -= 1
        pending = _DEFER["pending"] if _DEFER["depth"] == 0 else None
        if _DEFER["depth"] == 0:
            _DEFER["pending"] = None
    if ok and pending is not None:
        raise pending


def defer_interrupt(exc: BaseException) -> bool:
    """For signal handlers: True when inside :func:`signals_deferred` (``exc`` is raised at its end)."""
    if _DEFER["depth"] > 0:
        if _DEFER["pending"] is None:
            _DEFER["pending"] = exc
        return True
    return False


#: Temporary outputs are named ``.fastimpact-tmp-<host>-<pid>-XXXX``: a later run can tell a
#: folder left by a killed process (SIGKILL, power loss) from one a running process is writing.
TMP_PREFIX = ".fastimpact-tmp-"

#: A temporary entry older than this (seconds) is removed whoever made it.
TMP_MAX_AGE_S = 7 * 24 * 3600


def _tmp_prefix() -> str:
    import socket

    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{TMP_PREFIX}{host}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists (another user's process) or cannot tell
        return True
    return True


def remove_stale_temporaries(folder) -> list[str]:
    """Remove ``.fastimpact-tmp-*`` entries in ``folder`` left by dead processes of this machine, and
    any older than :data:`TMP_MAX_AGE_S`. Returns the names removed; never raises."""
    import socket
    import time

    removed = []
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    try:
        entries = [e for e in Path(folder).iterdir() if e.name.startswith(TMP_PREFIX)]
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        rest = e.name[len(TMP_PREFIX):].split("-")
        stale = False
        if len(rest) >= 3 and rest[0] == host and rest[1].isdigit():
            pid = int(rest[1])
            stale = pid != os.getpid() and not _pid_alive(pid)
        if not stale:
            try:
                stale = now - e.lstat().st_mtime > TMP_MAX_AGE_S
            except OSError:
                continue
        if stale:
            try:
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e)
                else:
                    e.unlink()
                removed.append(e.name)
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def output_dir(path, *, force: bool, names=()):
    """All-or-nothing output folder.

    Checks that the folder ``path`` can be created and written and that none of ``names`` exists
    there (unless ``force``), then yields a temporary folder ``path/.fastimpact-tmp-XXXX`` to write
    into. When the block succeeds every entry of the temporary folder is moved into ``path`` with
    ``os.replace`` (atomic per file); when it raises, the temporary folder (and any folder this
    call created) is removed, so no partial output remains, and the exception propagates.

    Raises ImageIOError when the folder is not writable or an output exists without ``force``.
    """
    target = Path(path)
    who = f"output folder '{path}'"
    if target.exists() and not target.is_dir():
        raise ImageIOError(f"{who} exists and is a file; choose another -o")
    if not force:
        for n in names:
            if (target / n).exists():
                raise ImageIOError(
                    f"output '{target / n}' exists; pass --force to overwrite or choose another -o"
                )
    try:
        created = _make_dirs(target)
    except OSError as e:
        raise ImageIOError(f"{who} is not writable ({_one_line(e)}); choose another -o") from None
    try:
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=target))
    except OSError as e:
        _remove_empty(created)
        raise ImageIOError(f"{who} is not writable ({_one_line(e)}); choose another -o") from None

    try:
        yield tmp
        entries = sorted(tmp.iterdir())
        for src in entries:
            dst = target / src.name
            if dst.exists() and not force:
                raise ImageIOError(
                    f"output '{dst}' exists; pass --force to overwrite or choose another -o"
                )
        with signals_deferred():  # an interruption now would leave old and new outputs mixed
            for src in entries:
                dst = target / src.name
                if src.is_dir() and dst.is_dir():
                    shutil.rmtree(dst)
                try:
                    os.replace(src, dst)
                except OSError as e:
                    raise ImageIOError(f"output '{dst}' cannot be written ({_one_line(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_write_path(path, force: bool):
    """All-or-nothing single output file (e.g. ``fastimpact apply -o out.nii.gz``).

    Refuses an existing ``path`` unless ``force``; creates missing parent folders; yields a
    temporary path in the same folder with the same ending (so nibabel picks the same format) and,
    when the block succeeds, moves it onto ``path`` with ``os.replace``. On an exception the
    temporary file (and folders this call created) is removed.
    """
    p = Path(path)
    if p.is_dir():
        raise ImageIOError(f"output '{path}' is a folder; give a file name such as out.nii.gz")
    if p.exists() and not force:
        raise ImageIOError(f"output '{path}' exists; pass --force to overwrite or choose another -o")
    try:
        created = _make_dirs(p.parent)
    except OSError as e:
        raise ImageIOError(
            f"output folder '{p.parent}' is not writable ({_one_line(e)}); choose another -o"
        ) from None
    ending = ".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix
    try:
        remove_stale_temporaries(p.parent)
        fd, tmpname = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=ending, dir=p.parent)
        os.close(fd)
    except OSError as e:
        _remove_empty(created)
        raise ImageIOError(
            f"output folder '{p.parent}' is not writable ({_one_line(e)}); choose another -o"
        ) from None
    tmp = Path(tmpname)
    try:
        yield tmp
        if p.exists() and not force:
            raise ImageIOError(f"output '{path}' exists; pass --force to overwrite or choose another -o")
        try:
            os.replace(tmp, p)
        except OSError as e:
            raise ImageIOError(f"output '{path}' cannot be written ({_one_line(e)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_empty(created)
        raise


def check_output_dir(path, *, force: bool, names=()) -> None:
    """Fail early (before a long registration) when ``output_dir`` would refuse ``path``.

    Creates nothing: checks that ``path`` is not a file, that none of ``names`` exists there
    unless ``force``, and that the nearest existing folder on the way is writable.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ImageIOError(f"output folder '{path}' exists and is a file; choose another -o")
    if not force:
        for n in names:
            if (target / n).exists():
                raise ImageIOError(f"output '{target / n}' exists; pass --force to overwrite or choose another -o")
    d = target
    while not d.exists():
        d = d.parent
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise ImageIOError(f"output folder '{path}' is not writable ('{d}' cannot be written); choose another -o")
