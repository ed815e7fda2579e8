"""pipeline.evaluate: every metric against hand-computed values, the empty-structure rules, the files, the report in a
real browser, and logging into the training run."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import project_root
from pipeline.core.errors import InputError
from pipeline.evaluation.metrics import case_scores, paired_difference, summarize
from pipeline.evaluation.plots import OVERLAY_SIZE
from pipeline.evaluation.scoring import evaluate
from pipeline.inference.predictor import checkpoints
from pipeline.models import checkpoint
from pipeline.training.run import train
from tests.conftest import compose_config, tiny_config

CLASSES = ["background", "a", "b"]
SPACING = (0.8, 0.8, 2.5)  # anisotropic: a distance along z counts 2.5 mm a voxel, in-plane 0.8


def slabs(shape=(16, 12, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Truth: a 10x10x2 slab of class a at z 2-3; prediction: the same slab one voxel higher (z 3-4). Two voxels
    thick, so every voxel is a surface voxel: half of each surface lies on the other (0 mm), half one z step away."""
    truth, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    truth[1:11, 1:11, 2:4] = 1
    pred[1:11, 1:11, 3:5] = 1
    return pred, truth


def test_every_metric_on_anisotropic_slabs_matches_hand_computed_values():
    pred, truth = slabs()
    a, b = case_scores(pred, truth, SPACING, CLASSES, tolerance_mm=1.0)
    tp = fp = fn = 100
    tn = 16 * 12 * 8 - tp - fp - fn
    assert a["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 0.5
    assert a["iou"] == pytest.approx(tp / (tp + fp + fn))  # 1/3
    assert a["precision"] == pytest.approx(tp / (tp + fp)) and a["recall"] == pytest.approx(tp / (tp + fn))
    assert a["specificity"] == pytest.approx(tn / (tn + fp))
    assert a["f1"] == pytest.approx(0.5)
    assert a["accuracy"] == pytest.approx((tp + tn) / (16 * 12 * 8))
    # each direction: 100 surface voxels at 0 mm and 100 at one z step, 2.5 mm (not 1 voxel, not 0.8 mm)
    assert a["hd95_mm"] == pytest.approx(2.5)
    assert a["assd_mm"] == pytest.approx((100 * 2.5 + 100 * 2.5) / 400)  # 1.25
    assert a["nsd"] == pytest.approx(0.5)  # within 1 mm: the coinciding half of each surface
    assert case_scores(pred, truth, SPACING, CLASSES, tolerance_mm=3.0)[0]["nsd"] == pytest.approx(1.0)
    voxel_ml = 0.8 * 0.8 * 2.5 / 1000
    assert a["truth_ml"] == pytest.approx(200 * voxel_ml) and a["pred_ml"] == pytest.approx(200 * voxel_ml)
    assert a["diff_ml"] == pytest.approx(0.0)
    assert b["empty"] == "both"


def test_hd95_ignores_a_few_outliers_that_assd_averages_in():
    _, truth = slabs()
    pred = truth.copy()
    pred[5, 5, 6] = 1   # 3 z steps above the slab: 7.5 mm
    pred[13, 5, 3] = 1  # 3 x steps beside it: 2.4 mm
    (a, _) = case_scores(pred, truth, SPACING, CLASSES)
    # pred -> truth: 200 voxels at 0 and the two outliers; the 95th percentile of 202 values is still 0
    assert a["hd95_mm"] == pytest.approx(0.0)
    assert a["assd_mm"] == pytest.approx((7.5 + 2.4) / (202 + 200))
    assert a["diff_ml"] == pytest.approx(2 * 0.8 * 0.8 * 2.5 / 1000)


def test_empty_structures_follow_the_documented_rules():
    _, truth = slabs()
    pred = np.zeros_like(truth)
    pred[12:14, 8:10, 5:7] = 2  # class b invented; class a missed
    a, b = case_scores(pred, truth, SPACING, CLASSES)
    diagonal = math.dist((0, 0, 0), (16 * 0.8, 12 * 0.8, 8 * 2.5))
    assert a["empty"] == "pred" and b["empty"] == "truth"
    for row in (a, b):
        assert (row["dice"], row["iou"], row["f1"], row["nsd"]) == (0, 0, 0, 0)
        assert row["hd95_mm"] == row["assd_mm"] == pytest.approx(diagonal)
    assert math.isnan(a["precision"]) and a["recall"] == 0  # nothing predicted: precision undefined
    assert math.isnan(b["recall"]) and b["precision"] == 0  # nothing to find: recall undefined

    both = case_scores(np.zeros_like(truth), np.zeros_like(truth), SPACING, CLASSES)[0]
    assert (both["dice"], both["iou"], both["f1"], both["nsd"], both["hd95_mm"], both["assd_mm"]) == (1, 1, 1, 1, 0, 0)
    assert math.isnan(both["precision"]) and math.isnan(both["recall"])

    rows = [{"case": "x"} | r for r in (a, b)] + [{"case": "y"} | r for r in case_scores(*slabs(), SPACING, CLASSES)]
    summary = summarize(rows, CLASSES)
    assert summary["classes"]["a"]["dice"] == {"mean": 0.25, "std": 0.25, "median": 0.25, "n": 2}
    assert summary["classes"]["a"]["precision"]["n"] == 1  # the undefined value is counted out, visibly
    assert summary["empty"]["a"] == {"truth": 0, "pred": 1, "both": 0}
    assert summary["empty"]["b"] == {"truth": 1, "pred": 0, "both": 1}


def predictions_from_truth(phantom, folder) -> list[str]:
    """Predictions for three phantom cases: exact, with a spurious far blob of class 1, and with class 2 missed."""
    folder.mkdir()
    cases = json.loads((phantom / "dataset.json").read_text())["training"][:3]
    ids = []
    for i, case in enumerate(cases):
        label = nib.load(phantom / case["label"])
        pred = np.asarray(label.dataobj).astype(np.uint8)
        if i == 1:
            pred[:3, :3, :3] = 1
        if i == 2:
            pred[pred == 2] = 1
        name = os.path.basename(case["label"])
        nib.save(nib.Nifti1Image(pred, label.affine), folder / name)
        ids.append(name.removesuffix(".nii.gz"))
    return ids


@pytest.fixture(scope="module")
def folder_run(tiny_phantom, tmp_path_factory):
    """One evaluation of hand-made predictions against the phantom's dataset.json (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    ids = predictions_from_truth(tiny_phantom, tmp / "pred")
    cfg = compose_config("evaluate", [f"pred={tmp / 'pred'}", f"truth={tiny_phantom / 'dataset.json'}",
                                      f"output={tmp / 'out'}", "overlays=2", f"cases=[{ids[0]}]",
                                      "data.name=evaluate-test"], tmp)
    return evaluate(cfg), tmp / "out", ids


def test_folder_run_writes_csv_summary_overlays_and_postprocessing_advice(folder_run):
    summary, out, ids = folder_run
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [(i, c) for i in ids for c in ("organ", "lesion")]
    exact = [r for r in rows if r["case"] == ids[0]]
    assert all(float(r["dice"]) == 1 and float(r["hd95_mm"]) == 0 for r in exact)
    missed = next(r for r in rows if r["case"] == ids[2] and r["class"] == "lesion")
    assert (missed["dice"], missed["precision"], missed["empty"]) == ("0.0", "", "pred")  # NaN written as an empty cell
    dice_organ = [float(r["dice"]) for r in rows if r["class"] == "organ"]
    assert (json.loads((out / "summary.json").read_text())["classes"]["organ"]["dice"]["mean"]
            == pytest.approx(np.mean(dice_organ)))
    assert summary["cases"] == 3

    # the spurious blob of class 1 goes with its largest component, so that option is recommended for class 1
    advice = json.loads((out / "postprocessing.json").read_text())
    assert advice["mean_dice"]["organ"]["largest_component"] > advice["mean_dice"]["organ"]["none"]
    assert advice["recommended"]["largest_component"] == [1]

    # the two worst cases and the one asked for by id
    pngs = sorted(p.stem for p in (out / "overlays").glob("*.png"))
    assert pngs == sorted(ids)
    image = np.asarray(Image.open(out / "overlays" / f"{ids[1]}.png").convert("RGB"))
    assert image.shape == (OVERLAY_SIZE[1], OVERLAY_SIZE[0], 3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # grey levels of the input plus blended class colours, not a blank canvas
    tab_blue, tab_orange = np.array([31, 119, 180]), np.array([255, 127, 14])
    assert (np.abs(image - tab_blue).sum(-1) < 10).any() and (np.abs(image - tab_orange).sum(-1) < 10).any()  # legend


def test_regions_score_a_set_of_labels_as_one_structure(tiny_phantom, tmp_path):
    """BRATS scores whole tumour, core and enhancing tumour, each a set of labels; here organ + lesion as one."""
    ids = predictions_from_truth(tiny_phantom, tmp_path / "pred")
    summary = evaluate(compose_config("evaluate", [
        f"pred={tmp_path / 'pred'}", f"truth={tiny_phantom / 'dataset.json'}", f"output={tmp_path / 'out'}",
        "overlays=0", "check_postprocessing=false", "regions={whole:[1,2],lesion_alone:[2]}", "data.name=regions"],
        tmp_path))
    with open(tmp_path / "out" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    whole = {r["case"]: float(r["dice"]) for r in rows if r["class"] == "whole"}
    alone = {r["case"]: float(r["dice"]) for r in rows if r["class"] == "lesion_alone"}
    # case 2 labelled its lesion as organ: the lesion is missed, the whole structure is exact; case 1's blob is extra
    assert whole[ids[0]] == whole[ids[2]] == 1.0 and whole[ids[1]] < 1.0
    assert alone == {ids[0]: 1.0, ids[1]: 1.0, ids[2]: 0.0}
    assert summary["regions"]["whole"]["dice"]["mean"] == pytest.approx(np.mean(list(whole.values())))
    assert summary["region_labels"] == {"whole": [1, 2], "lesion_alone": [2]}
    assert summary["mean"]["dice"] == pytest.approx(np.mean([summary["classes"][c]["dice"]["mean"]
                                                             for c in ("organ", "lesion")]))  # classes alone


def test_a_truth_stored_in_another_axis_direction_is_scored_on_the_same_voxels_and_another_grid_is_refused(tmp_path):
    """TotalSegmentator writes its map of a DICOM series LAS where the series reads LPS: the same voxels, so Dice 1;
    a truth on a shifted grid is an error naming the file."""
    labels = np.zeros((12, 10, 6), np.uint8)
    labels[2:6, 1:4, 1:5] = 1
    lps = np.diag([-0.9, -0.9, 2.0, 1.0])
    lps[:3, 3] = [40, 60, -100]
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = labels.shape[1] - 1  # voxel j -> 9 - j: the y axis read the other way
    for folder, array, affine in (("pred", labels, lps), ("truth", labels[:, ::-1], lps @ flip)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), tmp_path / folder / "case.nii.gz")
    ask = ["overlays=0", "check_postprocessing=false", f"output={tmp_path / 'out'}"]
    summary = evaluate(compose_config("evaluate", [f"pred={tmp_path / 'pred'}", f"truth={tmp_path / 'truth'}", *ask],
                                      tmp_path))
    assert summary["classes"]["class1"]["dice"]["mean"] == 1.0
    shifted = lps.copy()
    shifted[0, 3] += 5
    (tmp_path / "shifted").mkdir()
    nib.save(nib.Nifti1Image(labels, shifted), tmp_path / "shifted" / "case.nii.gz")
    with pytest.raises(InputError, match="differs from the ground truth's .* in shape or affine"):
        evaluate(compose_config("evaluate", [f"pred={tmp_path / 'shifted'}", f"truth={tmp_path / 'truth'}", *ask],
                                tmp_path))


def test_an_empty_test_split_is_skipped_when_asked_and_an_error_otherwise(threshold_ckpt, tmp_path):
    """make cv on a dataset without a test split (experiment=auto below 30 cases) asks if_empty=skip."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(threshold_ckpt(), run / "checkpoints" / "last.pt")
    (run / "splits.json").write_text(json.dumps({"train": ["case_0"], "val": ["case_1"], "test": []}))
    ask = [f"ckpt={run / 'checkpoints' / 'last.pt'}", "split=test", "tracking=none", f"output={tmp_path / 'out'}"]
    assert evaluate(compose_config("evaluate", [*ask, "if_empty=skip"], tmp_path)) == {}
    assert not (tmp_path / "out").exists()  # nothing scored, nothing written
    with pytest.raises(InputError, match="split 'test' is missing or empty"):
        evaluate(compose_config("evaluate", ask, tmp_path))


def test_folder_run_is_one_new_mlflow_run(folder_run, mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["evaluate-test"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["evaluation"] == "true"
    assert runs[0].data.metrics["eval_dice_organ"] == pytest.approx(folder_run[0]["classes"]["organ"]["dice"]["mean"])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "evaluation")}
    assert {"evaluation/per_case.csv", "evaluation/summary.json", "evaluation/report.html",
            "evaluation/overlays"} <= logged


def test_paired_difference_matches_hand_computed_values():
    theirs = {c: 0.8 for c in "abcde"}
    ours = dict(zip("abcde", (0.9, 0.85, 0.8, 0.7, 0.95)))  # differences +0.1 +0.05 0 -0.1 +0.15
    d = paired_difference(ours, theirs)
    assert d["cases"] == 5 and d["difference"] == pytest.approx(0.04)
    assert (d["higher"], d["lower"]) == (3, 1)
    assert -0.1 < d["ci95"][0] < 0.04 < d["ci95"][1] < 0.15  # resampled means lie within the differences' range
    # Wilcoxon, zeros dropped: |d| ranks 0.05 -> 1, 0.1 and 0.1 -> 2.5 each, 0.15 -> 4; the negative ranks sum to 2.5
    assert d["wilcoxon_p"] > 0.2
    shifted = paired_difference({c: v + 0.01 for c, v in theirs.items()}, theirs)
    assert shifted["difference"] == pytest.approx(0.01) and shifted["ci95"] == pytest.approx([0.01, 0.01])
    same = paired_difference(theirs, theirs)
    assert (same["difference"], same["ci95"], same["wilcoxon_p"]) == (0.0, [0.0, 0.0], 1.0)


def test_compare_scores_the_paired_difference_against_an_earlier_evaluation(folder_run, tiny_phantom, tmp_path):
    _, earlier, ids = folder_run
    with open(earlier / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    def case_mean(metric):
        return {i: np.mean([float(r[metric]) for r in rows if r["case"] == i]) for i in ids}
    perfect = tmp_path / "perfect"  # the ground truth itself as the prediction: Dice 1 for every case and class
    perfect.mkdir()
    for i in ids:
        shutil.copy(tiny_phantom / "labelsTr" / f"{i}.nii.gz", perfect / f"{i}.nii.gz")
    args = [f"truth={tiny_phantom / 'dataset.json'}", "overlays=0", "tracking=none"]
    summary = evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={earlier}",
                                                   f"output={tmp_path / 'out'}", *args], tmp_path))
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written["against"] == str((earlier / "per_case.csv").resolve())
    mean = written["dice"]["mean"]
    assert mean["difference"] == pytest.approx(np.mean([1 - v for v in case_mean("dice").values()]))
    assert (mean["cases"], mean["higher"], mean["lower"]) == (3, 2, 0)  # the exact case ties
    assert written["dice"]["classes"]["lesion"]["difference"] == pytest.approx(
        np.mean([1 - float(r["dice"]) for r in rows if r["class"] == "lesion"]))
    # a perfect prediction: NSD 1 and HD95 0 mm in every case, so the differences are 1 - NSD and -HD95 of the earlier
    assert written["nsd"]["mean"]["difference"] == pytest.approx(np.mean([1 - v for v in case_mean("nsd").values()]))
    hd95 = written["hd95_mm"]["mean"]
    assert hd95["difference"] == pytest.approx(-np.mean(list(case_mean("hd95_mm").values())))
    assert hd95["higher"] == 0 and hd95["difference"] < 0
    assert summary["source"]["compared with"].startswith(f"{written['against']}: mean Dice +{mean['difference']:.4f}")
    assert f"; mean HD95 mm {hd95['difference']:+.4f} (95% paired" in summary["source"]["compared with"]
    assert "<th>compared with</th>" in (tmp_path / "out" / "report.html").read_text()

    itself = evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={tmp_path / 'out'}",
                                                  f"output={tmp_path / 'again'}", *args], tmp_path))
    assert "mean Dice +0.0000 (95% paired bootstrap +0.0000..+0.0000, 3 cases" in itself["source"]["compared with"]

    fewer = tmp_path / "fewer.csv"  # an evaluation of other cases cannot be paired
    fewer.write_text("".join(line for line in open(earlier / "per_case.csv") if not line.startswith(ids[2])))
    with pytest.raises(InputError, match=rf"^{fewer}: has no score for case {ids[2]} \(lesion\); a paired"):
        evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={fewer}", f"output={tmp_path / 'x'}",
                                             *args], tmp_path))
    with pytest.raises(InputError, match=rf"^{tmp_path / 'nowhere'}: not found; compare= takes"):
        evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={tmp_path / 'nowhere'}",
                                             f"output={tmp_path / 'x'}", *args], tmp_path))
    with pytest.raises(InputError, match=rf"^{earlier / 'per_case.csv'}: this evaluation would overwrite it"):
        evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={earlier}", f"output={earlier}", *args],
                                tmp_path))
    junk = tmp_path / "junk.csv"
    junk.write_text("case,score\nphantom_000,0.9\n")
    with pytest.raises(InputError, match=rf"^{junk}: not a per_case.csv of pipeline.evaluate"):
        evaluate(compose_config("evaluate", [f"pred={perfect}", f"compare={junk}", f"output={tmp_path / 'x'}",
                                             *args], tmp_path))
    assert not (tmp_path / "x").exists()  # nothing written by any of them


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium missing under CI (.ci/run installs it)")
        pytest.skip("no chromium on this machine (apt-get install chromium); the report test needs a real browser")
    return found


def test_report_renders_in_headless_chromium(folder_run, tmp_path):
    _, out, ids = folder_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    # the page's own script counts, after load, the images the browser decoded and the rows of the per-case table
    assert 'data-images-decoded="3"' in dom, dom[:500]
    assert f'data-case-rows="{2 * len(ids)}"' in dom
    assert '<table id="summary">' in dom and "hd95_mm" in dom


def test_checkpoint_split_is_predicted_and_logged_as_an_evaluation_of_the_training_run(tiny_phantom, tmp_path,
                                                                                       mlflow_store):
    trained = train(tiny_config(tiny_phantom, tmp_path, overrides=["trainer.overlay_every=1"]))
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "overlays" / "epoch0001.png").is_file()
    cfg = compose_config("evaluate", [f"ckpt={tmp_path / 'checkpoints' / 'best.pt'}", "split=test",
                                      f"output={tmp_path / 'eval'}"], tmp_path)
    client = mlflow.MlflowClient(mlflow_store)
    before = client.get_run(trained["run_id"])
    summary = evaluate(cfg)
    test_ids = json.loads((tmp_path / "splits.json").read_text())["test"]
    predicted = sorted(p.name for p in (tmp_path / "eval" / "predictions").iterdir())
    assert predicted == [*(f"{i}.nii.gz" for i in test_ids), "predicted_with.json"]
    assert summary["cases"] == len(test_ids) == 1
    # the scores go to a run of their own that names the training run; the training run stays as it ended
    (run,) = client.search_runs([before.info.experiment_id], f"tags.scored_run_id = '{trained['run_id']}'")
    assert run.data.metrics["test_dice_mean"] == pytest.approx(summary["mean"]["dice"])
    assert "test_hd95_mm_organ" in run.data.metrics and run.data.tags["evaluation"] == "true"
    after = client.get_run(trained["run_id"])
    assert after.info.end_time == before.info.end_time and "test_dice_mean" not in after.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    assert "evaluation/test/report.html" in logged
    assert {"curves.png", "overlays"} <= {a.path for a in client.list_artifacts(trained["run_id"])}
    assert "Training curves" in (tmp_path / "eval" / "report.html").read_text()


def test_bad_predictions_are_one_line_errors_naming_the_file(tiny_phantom, tmp_path):
    ids = predictions_from_truth(tiny_phantom, tmp_path / "pred")
    spec = tiny_phantom / "dataset.json"
    wrong = tmp_path / "pred" / f"{ids[0]}.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), wrong)
    cfg = compose_config("evaluate", [f"pred={tmp_path / 'pred'}", f"truth={spec}", f"output={tmp_path / 'out'}",
                                      "tracking=none"], tmp_path)
    with pytest.raises(InputError, match=f"{wrong}: grid"):
        evaluate(cfg)
    wrong.rename(tmp_path / "pred" / "stranger.nii.gz")
    with pytest.raises(InputError, match="stranger.nii.gz: no ground truth for case stranger"):
        evaluate(cfg)
    assert not (tmp_path / "out" / "per_case.csv").exists()  # nothing half-written

    done = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"pred={tmp_path / 'nothing'}", f"truth={spec}",
                           "tracking=none", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=project_root())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nothing'}: pred must be a folder of label maps"


@pytest.fixture(scope="module")
def two_folds(tiny_phantom, tmp_path_factory):
    """Folds 0 and 1 of a 5-fold cross-validation, in the layout `make cv` leaves: <sweep dir>/<job>/checkpoints/."""
    folder = tmp_path_factory.mktemp("cv")
    for fold in (0, 1):
        train(tiny_config(tiny_phantom, folder / str(fold), overrides=["tracking=none", f"data.fold={fold}"]))
    return folder


@pytest.mark.slow  # a two-fold multirun: `make test-slow`
def test_the_folds_of_a_multirun_are_scored_as_one_ensemble_on_the_test_split(two_folds, tmp_path, mlflow_store):
    members = [two_folds / str(fold) / "checkpoints" / "best.pt" for fold in (0, 1)]
    cfg = compose_config("evaluate", [f"ckpt={two_folds}", "split=test", f"output={tmp_path / 'eval'}"], tmp_path)
    summary = evaluate(cfg)
    test_ids = json.loads((two_folds / "0" / "splits.json").read_text())["test"]
    predicted = sorted(p.name for p in (tmp_path / "eval" / "predictions").iterdir())
    assert predicted == [*(f"{i}.nii.gz" for i in test_ids), "predicted_with.json"]
    assert summary["source"]["ckpt"] == ", ".join(str(m.resolve()) for m in members)
    runs = mlflow.MlflowClient(mlflow_store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(mlflow_store).search_experiments()], "tags.evaluation = 'true'")
    assert any(r.data.metrics.get("test_dice_mean") == pytest.approx(summary["mean"]["dice"]) for r in runs)
    with pytest.raises(InputError, match="val split differs"):  # each fold validates on its own cases
        evaluate(compose_config("evaluate", [f"ckpt={two_folds}", "split=val", f"output={tmp_path / 'val'}"], tmp_path))


@pytest.mark.slow  # a two-fold multirun: `make test-slow`
def test_split_cv_scores_each_fold_on_its_own_validation_cases_with_its_final_model(two_folds, tmp_path):
    """nnU-Net's cross-validation score: fold k's last.pt (its best.pt was picked on these very cases) predicts the
    cases fold k validated on, and the pooled cases are scored as one set."""
    folds = (0, 1)
    last = [two_folds / str(fold) / "checkpoints" / "last.pt" for fold in folds]
    validated = [json.loads((two_folds / str(fold) / "splits.json").read_text())["val"] for fold in folds]
    cv = evaluate(compose_config("evaluate", [f"ckpt={two_folds}", "split=cv", f"output={tmp_path / 'out'}",
                                              "tracking=none"], tmp_path))
    assert cv["source"]["ckpt"] == ", ".join(str(p.resolve()) for p in last)
    assert cv["cases"] == len(validated[0]) + len(validated[1])
    predicted = tmp_path / "out" / "predictions"
    assert sorted(p.name for p in predicted.iterdir()) == sorted(
        [*(f"{i}.nii.gz" for ids in validated for i in ids), "predicted_with.json"])
    record = json.loads((predicted / "predicted_with.json").read_text())  # each case by its own fold's model
    assert [r["checkpoints"] for r in record["runs"]] == [[str(p.resolve())] for p in last]
    assert record["volumes"] == {f"{i}.nii.gz": fold for fold, ids in enumerate(validated) for i in ids}
    alone = [evaluate(compose_config("evaluate", [f"ckpt={ckpt}", "split=val", f"output={tmp_path / str(fold)}",
                                                  "tracking=none"], tmp_path)) for fold, ckpt in zip(folds, last)]
    for fold, ids in zip(folds, validated):  # each case's labels are its own fold's, alone
        for i in ids:
            mine = nib.load(tmp_path / str(fold) / "predictions" / f"{i}.nii.gz").get_fdata()
            assert np.array_equal(nib.load(predicted / f"{i}.nii.gz").get_fdata(), mine)
    pooled = sum(s["cases"] * s["mean"]["dice"] for s in alone) / sum(s["cases"] for s in alone)
    assert cv["mean"]["dice"] == pytest.approx(pooled)
    with pytest.raises(InputError, match=rf"{two_folds / '0' / 'splits.json'}: validates case {validated[0][0]}"):
        evaluate(compose_config("evaluate", [f"ckpt=[{last[0]},{last[0]}]", "split=cv", f"output={tmp_path / 'x'}",
                                             "tracking=none"], tmp_path))


def test_a_folder_of_runs_gives_each_fold_s_best_pt_and_each_final_model_s_last_pt(tmp_path):
    """A multirun of data.fold=all models (several seeds) ensembles their last.pt: each best.pt was picked on cases the
    run trained on. A fold's best.pt was picked on cases it held out, so a folder of folds keeps its best.pt."""
    def run(name, train, val):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for ckpt in ("best.pt", "last.pt"):
            (tmp_path / name / "checkpoints" / ckpt).touch()
        (tmp_path / name / "splits.json").write_text(json.dumps({"train": train, "val": val, "test": ["t"]}))
        return tmp_path / name / "checkpoints"

    fold, final = run("0", ["a", "b"], ["c"]), run("1", ["a", "b", "c"], ["c"])
    assert checkpoints(tmp_path) == [fold / "best.pt", final / "last.pt"]
    assert checkpoints(tmp_path, final=True) == [fold / "last.pt", final / "last.pt"]  # split=cv
    (tmp_path / "1" / "splits.json").write_text('{"train": ["a", ')  # cut short
    with pytest.raises(InputError, match=rf"{tmp_path / '1' / 'splits.json'}: not a splits.json \(JSONDecodeError"):
        checkpoints(tmp_path)


def test_a_checkpoint_without_a_dataset_in_its_config_is_one_line_for_split(tmp_path):
    """A checkpoint saved by hand (or by an older pipeline) holds weights but no data config: split= cannot know its
    cases, and says so instead of an OmegaConf 'Missing key data'."""
    ckpt = checkpoint.save(tmp_path / "run" / "checkpoints" / "last.pt", torch.nn.Linear(2, 2), {"model": {}})
    (tmp_path / "run" / "splits.json").write_text(json.dumps({"test": ["a"]}))
    with pytest.raises(InputError, match=rf"^{ckpt}: its config names no dataset, so split=test cannot be predicted"):
        evaluate(compose_config("evaluate", [f"ckpt={ckpt}", "split=test", f"output={tmp_path / 'out'}"], tmp_path))
    assert not (tmp_path / "out" / "predictions").exists()


@pytest.mark.parametrize("layout", ["plain", "msd"])
def test_labels_without_images_draw_no_input_column_and_the_sources_are_a_table(layout, tiny_phantom, tmp_path):
    """A plain folder of labels has no images to show: truth and prediction alone. Labels in an MSD or nnU-Net
    layout (labelsTr/ beside imagesTr/) find their images."""
    ids = predictions_from_truth(tiny_phantom, tmp_path / "pred")
    truth = tiny_phantom / "labelsTr"
    if layout == "plain":
        truth = shutil.copytree(truth, tmp_path / "truth")
    cfg = compose_config("evaluate", [f"pred={tmp_path / 'pred'}", f"truth={truth}", f"output={tmp_path / 'out'}",
                                      "overlays=1", "tracking=none"], tmp_path)
    evaluate(cfg)
    png = next((tmp_path / "out" / "overlays").glob("*.png"))
    image = np.asarray(Image.open(png).convert("RGB"))
    width = OVERLAY_SIZE[0] * (2 if layout == "plain" else 3) // 3
    assert image.shape == (OVERLAY_SIZE[1], width, 3)
    grey = (np.ptp(image.astype(int), axis=-1) == 0) & (image[..., 0] > 20) & (image[..., 0] < 235)
    assert (grey.mean() > 0.05) == (layout == "msd")  # an image's mid greys, or black panels and white margins
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<pre>" not in page
    assert f'<tr><th>truth</th><td>{truth.resolve()}</td></tr>' in page
    assert f"<tr><th>cases</th><td>{len(ids)}</td></tr>" in page
