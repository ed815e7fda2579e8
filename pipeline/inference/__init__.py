"""Checkpoints in, label maps out: the sliding-window predictor with TTA and ensembles (`predictor`), DICOM-SEG
output (`dicomseg`) and the MLflow pyfunc wrapper that `mlflow models serve` runs (`serving`)."""
