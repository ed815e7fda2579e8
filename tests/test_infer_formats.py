"""Inference on NRRD, MHA and DICOM series with exact geometry; TTA, ensembles, post-processing, folder runs."""

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline import project_root
from pipeline.data.io import find_inputs
from pipeline.inference.predictor import MirrorAveraged, Predictor, infer, postprocess
from pipeline.models import checkpoint
from tests.conftest import shared_dataset


def oblique_sitk(shape=(22, 18, 9), seed=0) -> sitk.Image:
    """An (x, y, z) volume with a rotated direction, anisotropic spacing and an offset origin."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(np.float32)
    data[4:14, 3:9, 2:6] += 4.0
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection([c, -s, 0, s, c, 0, 0, 0, -1])
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-12.5, 40.0, 3.25))
    return image


def assert_same_grid(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_sitk_formats_round_trip_in_their_own_format(ext, threshold_ckpt, tmp_path):
    src = tmp_path / "in" / f"case{ext}"
    src.parent.mkdir()
    sitk.WriteImage(oblique_sitk(), str(src))
    [out] = infer(threshold_ckpt(), src, tmp_path / "out", amp=False, format="input")["written"]
    assert out.name == f"case{ext}"
    pred, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(src))
    assert_same_grid(pred, ref)
    values = sitk.GetArrayFromImage(ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pred), (values > values.mean()).astype(np.uint8))


def shuffled_copy(study, folder, seed: int = 0):
    """The series' files copied under random names: file names no longer follow slice order."""
    folder.mkdir()
    files = sorted(p for p in study.rglob("*") if p.is_file())
    for i, f in zip(np.random.default_rng(seed).permutation(len(files)), files):
        shutil.copy(f, folder / f"{i:04d}.dcm")
    return folder


def test_dicom_series_is_read_by_slice_position_not_file_name(threshold_ckpt, tmp_path):
    study = shared_dataset("dicom_hippocampus_crops") / "Study1"
    shuffled = shuffled_copy(study, tmp_path / "shuffled")
    ckpt = threshold_ckpt()
    [a] = infer(ckpt, study, tmp_path / "a", amp=False)["written"]
    [b] = infer(ckpt, shuffled, tmp_path / "b", amp=False)["written"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(study)))
    series = reader.Execute()
    for out in (a, b):
        assert out.name.endswith(".nii.gz")
        assert_same_grid(sitk.ReadImage(str(out)), series)
    np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    assert 0 < nib.load(a).get_fdata().mean() < 1


def test_tta_and_ensembles_change_nothing_for_a_flip_invariant_model(threshold_ckpt, tmp_path):
    """A 1x1x1 convolution commutes with mirroring, and two copies of it average to itself."""
    src = tmp_path / "case.mha"
    sitk.WriteImage(oblique_sitk(), str(src))
    ckpt = threshold_ckpt()
    plain = infer(ckpt, src, tmp_path / "plain", amp=False, save_probabilities=True)["written"][0]
    both = infer([ckpt, ckpt], src, tmp_path / "both", amp=False, tta=True, save_probabilities=True,
                 uncertainty="variance")["written"][0]
    np.testing.assert_array_equal(nib.load(plain).get_fdata(), nib.load(both).get_fdata())
    p0 = np.load(tmp_path / "plain" / "case_probabilities.npz")["probabilities"]
    p1 = np.load(tmp_path / "both" / "case_probabilities.npz")["probabilities"]
    assert p0.dtype == np.float16 and p0.shape == (2, 22, 18, 9)
    np.testing.assert_allclose(p0.astype(np.float32), p1.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(p0.astype(np.float32).sum(0), 1, atol=2e-3)
    variance = nib.load(tmp_path / "both" / "case_uncertainty.nii.gz").get_fdata()
    assert variance.shape == (22, 18, 9) and variance.max() < 1e-5  # identical members: no spread


def test_mirror_averaged_windows_are_the_mean_of_the_mirrored_passes_at_any_batch():
    """Hand-computed: for each window, the mean over mirrors of flip(softmax(net(flip(x)))), and its mean square."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()  # not mirror-invariant: a random 3x3x3 kernel
    x = torch.randn(2, 2, 8, 6, 5)
    flips = [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]
    with torch.no_grad():
        each = torch.stack([torch.flip(torch.softmax(net(torch.flip(x, [d + 2 for d in f])), 1), [d + 2 for d in f])
                            for f in flips])
        for batch in (1, 3, 16):
            out = MirrorAveraged(net, flips, batch, squares=True).eval()(x)
            torch.testing.assert_close(out[:, :3], each.mean(0), atol=1e-6, rtol=0)
            torch.testing.assert_close(out[:, 3:], each.square().mean(0), atol=1e-6, rtol=0)
    assert (out[:, 3:] - out[:, :3].square()).max() > 1e-4  # the mirrors disagree: a spread to report


def test_postprocessing_on_hand_built_masks():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:6, 1:6, 1:6] = 1          # 125 voxels
    labels[10:12, 10:12, 10:12] = 1    # 8 voxels: a second, smaller component
    labels[14:19, 14:19, 14:19] = 2    # a hollow cube of class 2
    labels[16, 16, 16] = 0
    labels[0, 19, 0] = 2               # one stray voxel of class 2
    out = postprocess(labels, largest_component=[1], fill_holes=[2], min_size=2, num_classes=3)
    assert (out == 1).sum() == 125 and out[10, 10, 10] == 0
    assert out[16, 16, 16] == 2 and out[0, 19, 0] == 0
    assert (out == 2).sum() == 125


def test_filling_a_class_s_holes_keeps_the_classes_it_encloses():
    """An organ with a lesion inside and a background void: the void becomes organ, the lesion stays (MONAI's
    FillHoles alone paints the lesion over too)."""
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[4:6, 4:6, 4:6] = 2          # 8 lesion voxels inside the organ
    labels[7, 7, 7] = 0                # one enclosed background voxel
    out = postprocess(labels, fill_holes=[1], num_classes=3)
    assert out[7, 7, 7] == 1 and (out == 2).sum() == 8
    assert (out != labels).sum() == 1


def test_folder_run_skips_existing_goes_on_after_a_bad_file_and_exits_nonzero(threshold_ckpt, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.nrrd", "c.mha"):
        sitk.WriteImage(oblique_sitk(), str(inputs / name))
    (inputs / "b.nii.gz").write_bytes(b"not a nifti at all")
    assert [v.path.name for v in find_inputs(inputs)] == ["a.nrrd", "b.nii.gz", "c.mha"]
    ckpt = threshold_ckpt()
    first = subprocess.run([sys.executable, "-m", "pipeline.infer", f"ckpt={ckpt}", f"input={inputs}",
                            f"output={tmp_path}/out", "amp=false"], capture_output=True, text=True, cwd=project_root())
    assert first.returncode == 1
    assert "b.nii.gz: not a readable image" in first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 inputs failed")
    assert "2 written, 0 skipped (exist; overwrite=true to redo), 1 failed" in first.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.nii.gz", "c.nii.gz", "predicted_with.json"]  # nothing half-written
    stamp = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    (inputs / "b.nii.gz").unlink()
    # The re-runs in this process: the command's exit status and error line are checked above, and a start costs ~10 s.
    second = infer(ckpt, inputs, tmp_path / "out", amp=False)
    assert (len(second["written"]), len(second["skipped"])) == (0, 2)
    assert (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == stamp
    third = infer(ckpt, inputs, tmp_path / "out", amp=False, overwrite=True)
    assert (len(third["written"]), len(third["skipped"])) == (2, 0)


def test_multichannel_cases_by_naming_rule_or_as_one_4d_file(threshold_ckpt, tmp_path):
    rng = np.random.default_rng(3)
    affine = np.diag([-1.2, 0.9, 2.0, 1.0])
    a, b = rng.normal(5, 2, (16, 20, 8)).astype(np.float32), rng.normal(-3, 4, (16, 20, 8)).astype(np.float32)
    (tmp_path / "split").mkdir()
    nib.save(nib.Nifti1Image(a, affine), tmp_path / "split" / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(b, affine), tmp_path / "split" / "case_0001.nii.gz")
    (tmp_path / "joint").mkdir()
    nib.save(nib.Nifti1Image(np.stack([a, b], -1), affine), tmp_path / "joint" / "case.nii.gz")
    ckpt = threshold_ckpt(channels=2)
    [split] = infer(ckpt, tmp_path / "split", tmp_path / "out_split", amp=False)["written"]
    [joint] = infer(ckpt, tmp_path / "joint", tmp_path / "out_joint", amp=False)["written"]
    assert split.name == joint.name == "case.nii.gz"
    expected = ((a - a.mean()) / a.std() + (b - b.mean()) / b.std()) > 0
    for out in (split, joint):
        pred = nib.load(out)
        assert pred.shape == (16, 20, 8) and np.allclose(pred.affine, affine, atol=1e-6)
        assert (np.asarray(pred.dataobj) == expected).mean() > 0.999  # float rounding at the threshold only


def test_a_wrong_channel_count_is_a_bad_file_and_a_model_error_stops_the_run(threshold_ckpt, tmp_path, monkeypatch):
    """The image's channels against the checkpoint's: a one-line error for that file, the others still written. An
    error of the model itself (a RuntimeError, as out-of-memory raises) stops the run instead of repeating per file."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 20, 8)).astype(np.float32), affine), inputs / "one.nii.gz")
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 20, 8, 2)).astype(np.float32), affine), inputs / "two.nii.gz")
    report = infer(threshold_ckpt(channels=2), inputs, tmp_path / "out", amp=False)
    assert [p.name for p in report["written"]] == ["two.nii.gz"]
    assert report["failed"] == {inputs / "one.nii.gz": f"{inputs / 'one.nii.gz'}: 1 image channel; the model takes 2"}

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr("pipeline.inference.predictor.predict", out_of_memory)
    with pytest.raises(RuntimeError, match="not enough memory"):
        infer(threshold_ckpt(channels=2), inputs, tmp_path / "out2", amp=False)
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def seg_frames(seg_path, slices: list) -> np.ndarray:
    """A DICOM-SEG read back with highdicom as a label map (slice, row, column), in the order of `slices`."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [s.SOPInstanceUID for s in slices]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                             skip_overlap_checks=True)


def test_a_dicom_series_gets_a_dicom_seg_that_matches_its_nifti_and_its_slices(threshold_ckpt, tmp_path):
    import highdicom as hd
    import pydicom

    from pipeline.inference.dicomseg import source_slices

    study = shared_dataset("dicom_hippocampus_crops") / "Study1"
    shuffled = shuffled_copy(study, tmp_path / "shuffled", seed=1)
    files = sorted(p for p in study.rglob("*") if p.is_file())
    ckpt = threshold_ckpt()
    [nifti] = infer(ckpt, study, tmp_path / "a", amp=False, format="dicom-seg")["written"]
    seg_path = nifti.with_name("Study1.seg.dcm")
    seg = hd.seg.segread(seg_path)
    slices = source_slices(study)
    source = slices[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["organ"]  # the checkpoint's class, background aside
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "pipeline" and algorithm.AlgorithmVersion
    assert seg.NumberOfFrames == len(slices)  # one frame per slice (one segment), empty ones included
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame sits on the slice it references
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        [slice_] = [s for s in slices if s.SOPInstanceUID == uid]
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in slice_.ImagePositionPatient])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))  # (z, y, x): slice, row, column
    assert labels.any() and labels.shape[0] == len(slices)
    np.testing.assert_array_equal(seg_frames(seg_path, slices), labels)

    [again] = infer(ckpt, shuffled, tmp_path / "b", amp=False, format="input")["written"]  # input: DICOM-SEG too
    other = again.with_name("shuffled.seg.dcm")
    np.testing.assert_array_equal(seg_frames(other, slices), labels)
    assert hd.seg.segread(other).FrameOfReferenceUID == source.FrameOfReferenceUID

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(broken / f.name)
    report = infer(ckpt, broken, tmp_path / "c", amp=False, format="dicom-seg")
    [(path, message)] = report["failed"].items()
    assert path == broken and "no FrameOfReferenceUID; a DICOM-SEG needs it" in message
    assert (tmp_path / "c" / "broken.nii.gz").is_file() and not (tmp_path / "c" / "broken.seg.dcm").exists()


def test_a_de_identified_ct_dicom_series_gets_a_dicom_seg_with_a_segment_per_class_found(threshold_ckpt, tmp_path):
    """TotalSegmentator's example CT series blanks its study, series and SOP UIDs in every dataset (the file meta keeps
    the SOP ones): read in Hounsfield units (RescaleIntercept -1024), it still gets a DICOM-SEG, one segment per class
    found, each frame referencing its slice; the study and series UIDs it references are derived, the same each run."""
    import highdicom as hd

    from pipeline.inference.dicomseg import source_slices

    series = shared_dataset("totalseg_ct_examples") / "ct_dicom"
    [nifti] = infer(threshold_ckpt(), series, tmp_path, amp=False, format="dicom-seg")["written"]
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    assert sitk.GetArrayViewFromImage(image).min() <= -1000  # air in HU: the rescale was applied
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    seg = hd.seg.segread(nifti.with_name("ct_dicom.seg.dcm"))
    assert [d.SegmentNumber for d in seg.SegmentSequence] == [1] and np.unique(labels).tolist() == [0, 1]
    np.testing.assert_array_equal(seg_frames(nifti.with_name("ct_dicom.seg.dcm"), source_slices(series)), labels)
    assert seg.StudyInstanceUID == source_slices(series)[0].StudyInstanceUID != ""  # derived, and stable


def test_tta_mirrors_only_the_axes_the_training_mirrored(threshold_ckpt, tmp_path):
    """As nnU-Net: a model trained with left-right flips alone is mirrored left-right alone; tta_axes= overrides."""
    def predictor(*bundles, **options):
        return Predictor({f"{i}.pt": b for i, b in enumerate(bundles)}, backend="torch", **options)

    every = checkpoint.load(threshold_ckpt())
    assert predictor(every, tta=True).flips == [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]
    left_right = checkpoint.load(threshold_ckpt(["transforms.augment.flip_y=null", "transforms.augment.flip_z.prob=0"]))
    assert predictor(left_right, tta=True).flips == [[], [0]]
    assert predictor(every, left_right, tta=True).flips == [[], [0]]  # the mirrors every member learned
    assert len(predictor(left_right, tta=True, tta_axes=(0, 1, 2)).flips) == 8
    assert predictor(left_right).flips == [[]]  # no tta: one pass
