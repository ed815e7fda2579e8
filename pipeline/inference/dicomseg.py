"""DICOM Segmentation objects from label maps, with highdicom (MONAI core has no DICOM-SEG writer; it lives only in
the MONAI Deploy SDK): one segment per foreground class, frames referencing the source series' slices."""

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline import __version__
from pipeline.core.errors import InputError, first_line
from pipeline.core.files import atomic

log = logging.getLogger(__name__)

# What a DICOM-SEG needs from every source slice (the referenced instances, the frame of reference, the plane).
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


# Type 2 attributes of the patient and study modules: the SEG must carry them, empty when the source has none.
EMPTY_ALLOWED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_slices(series: Path) -> list[pydicom.Dataset]:
    """The series' slices (in memory; the files are never written) in the order SimpleITK (GDCM) reads them, by
    position along the slice normal: the order of the label map's z axis."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))
    slices = [pydicom.dcmread(f) for f in files]
    for ds in slices:
        # Some exports (TotalSegmentator's example CT among them) leave the dataset's SOP Class and Instance UIDs
        # empty and keep them in the file meta header only: take them from there.
        for keyword, meta in (("SOPClassUID", "MediaStorageSOPClassUID"),
                              ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not ds.get(keyword) and getattr(ds, "file_meta", None) is not None and ds.file_meta.get(meta):
                setattr(ds, keyword, ds.file_meta.get(meta))
    # De-identified exports may blank the study and series UIDs of every slice: the SEG then references UIDs derived
    # from the series (the same on every run), and its per-slice references (SOP Instance UIDs) still hold.
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if slices and all(not ds.get(keyword) for ds in slices):
            uid = pydicom.uid.generate_uid(entropy_srcs=[keyword, *(str(ds.get("SOPInstanceUID")) for ds in slices)])
            log.warning(f"{files[0]}: the series has no {keyword} (blanked by its export?); the DICOM-SEG references "
                        f"{uid}, derived from its slices, which a viewer will not match to this series by that UID")
            for ds in slices:
                setattr(ds, keyword, uid)
    for f, ds in zip(files, slices):
        if missing := [a for a in REQUIRED if a not in ds or ds.get(a) in ("", None)]:
            raise InputError(f"{f}: no {missing[0]}; a DICOM-SEG needs it")
        for keyword in EMPTY_ALLOWED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return slices


def write_seg(series: Path, labels: np.ndarray, class_names: list[str], path: Path) -> Path | None:
    """`labels` (x, y, z) on the series' grid (as SimpleITK reads it) written as a DICOM-SEG at `path`, atomically:
    one segment per class found in the label map (its name from the checkpoint, numbered 1.. in class order, as
    DICOM numbers segments), one frame per slice and segment (empty ones included, so every frame lines up with a
    source slice). A label map with no foreground gets no DICOM-SEG (one has at least one segment)."""
    import highdicom as hd  # imported here: only DICOM-SEG output needs it (about 1 s)
    from pydicom.sr.codedict import codes

    slices = source_slices(series)
    found = [int(k) for k in np.unique(labels) if k > 0]
    if not found:
        log.warning(f"{series}: no class found, so no DICOM-SEG (one holds a segment or more); the NIfTI is written")
        return None
    numbers = np.zeros(max(found) + 1, np.uint8)
    numbers[found] = np.arange(1, len(found) + 1)  # class -> segment number
    frames = np.ascontiguousarray(numbers[labels].transpose(2, 1, 0))  # (slice, row, column)
    if frames.shape != (len(slices), slices[0].Rows, slices[0].Columns):
        raise InputError(f"{series}: label map {labels.shape} does not match the series "
                         f"({slices[0].Columns}x{slices[0].Rows}x{len(slices)})")
    algorithm = hd.AlgorithmIdentificationSequence(name="pipeline", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=class_names[k],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            # the class has no standard code here: a private coding scheme carries its name
            segmented_property_type=hd.sr.CodedConcept(value=f"class{k}", scheme_designator="99PIPELINE",
                                                       meaning=class_names[k]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, k in enumerate(found, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=slices, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9000, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="pipeline", manufacturer_model_name="pipeline",
            software_versions=__version__, device_serial_number="0", series_description="pipeline segmentation",
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as err:  # highdicom's checks of the source series
        raise InputError(f"{series}: no DICOM-SEG ({first_line(err)})") from None
    with atomic(path) as tmp:
        seg.save_as(tmp)
    return path
