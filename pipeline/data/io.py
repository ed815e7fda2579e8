"""Volumes in and label maps out: NIfTI with nibabel; NRRD, MHA and DICOM series with SimpleITK.

Preprocessing reads NIfTI (MONAI LoadImaged + NibabelReader), so a SimpleITK input is handed to it as a temporary
NIfTI whose affine is the SimpleITK geometry converted from LPS to RAS; results are written back through SimpleITK
with the input's own spacing, origin and direction (CopyInformation), so the geometry is exact by construction.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.core.errors import InputError, first_line
from pipeline.core.files import atomic

NIFTI = (".nii", ".nii.gz")
SITK = (".nrrd", ".mha")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# nnU-Net/MSD naming: case_0000.nii.gz, case_0001...
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


@dataclass
class Volume:
    """One input: a NIfTI file, a NRRD/MHA file, a DICOM series folder, or one NIfTI file per channel."""

    path: Path
    channels: list[Path] = field(default_factory=list)  # case_0000, case_0001, ...: stacked in this order

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "dicom"
        return "nifti" if self.path.name.endswith(NIFTI) else "sitk"

    @property
    def stem(self) -> str:
        if self.channels:
            return CHANNEL.match(self.path.name)["case"]
        name = self.path.name
        for ext in (".nii.gz", ".nii", *SITK):
            name = name.removesuffix(ext)
        return name

    def output_name(self, fmt: str, suffix: str = "") -> str:
        """`nifti`: <stem>.nii.gz; `input`: the input's own format (NIfTI for a DICOM series)."""
        if fmt == "input" and self.kind != "dicom":
            ext = ".nii.gz" if self.path.name.endswith(".nii.gz") else self.path.suffix
        else:
            ext = ".nii.gz"
        return f"{self.stem}{suffix}{ext}"


def is_dicom_series(folder: Path) -> bool:
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without a series
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def find_inputs(path: str | Path) -> list[Volume]:
    """A file, a DICOM series folder, or a folder of files and DICOM series folders (sorted)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input not found")
    if path.is_file():
        if not path.name.endswith(NIFTI + SITK):
            raise InputError(f"{path}: unsupported format (NIfTI .nii/.nii.gz, NRRD .nrrd, MHA .mha or a DICOM folder)")
        return [Volume(path)]
    if is_dicom_series(path):
        return [Volume(path)]
    found, groups = [], {}
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and (m := CHANNEL.match(p.name)):
            groups.setdefault(m["case"], []).append(p)
        elif (p.is_file() and p.name.endswith(NIFTI + SITK)) or (p.is_dir() and is_dicom_series(p)):
            found.append(Volume(p))
    found += [Volume(files[0], files) for files in groups.values()]  # sorted names: channel order
    found.sort(key=lambda v: v.stem)
    if not found:
        raise InputError(f"{path}: holds no NIfTI, NRRD, MHA files or DICOM series")
    return found


def read_sitk(volume: Volume) -> sitk.Image:
    if volume.kind == "dicom":
        reader = sitk.ImageSeriesReader()
        # GDCM orders the slices by their position along the normal, not by file name
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(volume.path)))
        return reader.Execute()
    return sitk.ReadImage(str(volume.path))


def spatial(array: np.ndarray) -> np.ndarray:
    """The array without trailing singleton axes past the third: files distributed as (x, y, z, 1), often with a
    zero fourth zoom (IBSR18, some FSL and SPM outputs), are one 3D volume. MONAI's NibabelReader reads them as one
    channel already; this is the same view for code that reads voxels with nibabel."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def read_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (x, y, z[, channel]), RAS affine) of a NIfTI, NRRD or MHA file, as stored (no resampling; a trailing
    singleton axis dropped, see spatial)."""
    path = Path(path)
    try:
        if path.name.endswith(NIFTI):
            image = nib.load(path)
            return spatial(np.asanyarray(image.dataobj)), image.affine
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
        return array.transpose(2, 1, 0, *range(3, array.ndim)), sitk_affine(image)
    except Exception as err:  # nibabel and SimpleITK raise many types for unreadable files
        raise InputError(f"{path}: not a readable image ({first_line(err)})") from None


def in_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An (x, y, z) array reoriented to RAS (x right, y anterior, z superior), e.g. for display."""
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the RAS axes of in_ras(array, affine)."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)
    return spacing


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image (which is LPS)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return affine


class Reference:
    """The input's grid: what a result must be written on."""

    def __init__(self, volume: Volume, tmp_dir: Path):
        self.volume = volume
        try:
            if volume.channels:
                self.sitk = None
                self.nifti, self.nifti_path = stack_channels(volume, tmp_dir)
                self.shape = self.nifti.shape[:3]
            elif volume.kind == "nifti":
                self.nifti = nib.load(volume.path)
                self.sitk = None
                self.shape = self.nifti.shape[:3]
                self.nifti_path = volume.path
            else:
                self.sitk = read_sitk(volume)
                if self.sitk.GetDimension() != 3:
                    raise InputError(f"{volume.path}: a {self.sitk.GetDimension()}D image; expected 3D")
                array = sitk.GetArrayFromImage(self.sitk).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
                self.nifti = nib.Nifti1Image(array.astype(np.float32), sitk_affine(self.sitk))
                self.shape = array.shape
                self.nifti_path = tmp_dir / f"{volume.stem}.nii.gz"
                nib.save(self.nifti, self.nifti_path)
        except InputError:
            raise
        except Exception as err:  # nibabel and SimpleITK raise many types for unreadable files
            raise InputError(f"{volume.path}: not a readable image "
                             f"({first_line(err)})") from None

    @property
    def affine(self) -> np.ndarray:
        return self.nifti.affine

    def write(self, array: np.ndarray, path: Path) -> None:
        """Write an (x, y, z) array on this grid, in the format of path's extension, atomically (temp + rename)."""
        with atomic(path) as tmp:
            if self.sitk is not None:
                image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
                image.CopyInformation(self.sitk)  # spacing, origin, direction: exactly the input's
                sitk.WriteImage(image, str(tmp), useCompression=True)
            else:
                write_nifti(array, self.nifti, tmp)


def stack_channels(volume: Volume, tmp_dir: Path) -> tuple[nib.Nifti1Image, Path]:
    """One 4D NIfTI (x, y, z, channel) from per-channel files that share a grid."""
    images = [nib.load(p) for p in volume.channels]
    first = images[0]
    for p, image in zip(volume.channels[1:], images[1:]):
        if image.shape[:3] != first.shape[:3] or not np.allclose(image.affine, first.affine, atol=1e-4):
            raise InputError(f"{p}: grid differs from {volume.channels[0].name}'s; "
                             "the channels of a case must share one")
    stacked = nib.Nifti1Image(np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in images], axis=-1),
                              first.affine, first.header)
    path = tmp_dir / f"{volume.stem}.nii.gz"
    nib.save(stacked, path)
    return stacked, path


def write_nifti(array: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """NIfTI on the reference's grid: its affine, qform/sform codes and units."""
    image = nib.Nifti1Image(array, reference.affine)
    header = reference.header
    image.header.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
    image.header.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    nib.save(image, path)


def label_dtype(num_classes: int):
    return np.uint8 if num_classes <= np.iinfo(np.uint8).max + 1 else np.int16


def label_fault(path, labels: np.ndarray, num_classes: int) -> str | None:
    """Why a label map cannot be scored or trained on (non-integer values, values outside 0..num_classes-1), as
    `path: problem`; None when it can."""
    if not np.array_equal(labels, np.round(labels)):
        return f"{path}: non-integer label values"
    outside = sorted(set(np.unique(labels).astype(int).tolist()) - set(range(num_classes)))
    if outside:
        return f"{path}: label values {outside[:8]} outside the declared classes 0..{num_classes - 1}"
    return None


def as_nifti(sources: list[Path], target: Path) -> Path:
    """One NIfTI at `target` (written atomically) from per-channel NIfTI, NRRD or MHA files that share a grid: a 3D
    volume from one file, (x, y, z, channel) from several; reused while it is newer than every source."""
    if target.is_file() and target.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return target
    arrays = [read_array(p) for p in sources]  # InputError naming an unreadable file
    array, affine = arrays[0]
    for p, (other, other_affine) in zip(sources[1:], arrays[1:]):
        if other.shape != array.shape or not np.allclose(other_affine, affine, atol=1e-4):
            raise InputError(f"{p}: grid differs from {sources[0].name}'s; the channels of a case must share one")
    data = np.stack([a for a, _ in arrays], axis=-1) if len(arrays) > 1 else array
    with atomic(target) as tmp:
        nib.save(nib.Nifti1Image(data, affine), tmp)
    return target
