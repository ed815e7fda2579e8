"""A trained checkpoint as an MLflow 3 pyfunc model: `mlflow.pyfunc.load_model(uri).predict(frame)` and
`mlflow models serve` turn a NIfTI volume into its label map, by the same code path as `pipeline.infer`.

The payload is the file itself, base64-encoded in a one-column frame (JSON has no bytes):

    {"dataframe_split": {"columns": ["nifti"], "data": [["<base64 of case.nii.gz>"]]}}
    -> {"predictions": [{"label_map": "<base64 of the label map's .nii.gz>"}]}

Written here because MLflow has no flavour for a MONAI sliding-window predictor with its preprocessing and inverse
(mlflow.pytorch would serve the bare network on tensors, not a volume on its grid).
"""

import base64
import binascii
import gzip
import importlib.metadata
import logging
import tempfile
import threading
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

log = logging.getLogger(__name__)

INPUT, OUTPUT = "nifti", "label_map"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", INPUT)]), outputs=Schema([ColSpec("string", OUTPUT)]))
NIFTI_MAGIC = (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0")  # at byte 344 (NIfTI-1) or 4 (NIfTI-2)
GZIP_MAGIC = b"\x1f\x8b"


def encode(path: str | Path) -> str:
    """A file's bytes as base64 text: one cell of the request frame."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode(text: str, where: str) -> bytes:
    """A request cell back to NIfTI bytes (gzipped or not); a malformed cell is one line naming `where`."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise bad_request(f"{where}: not base64 text") from None
    raw = data
    if data.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError):
            raise bad_request(f"{where}: a truncated or corrupt gzip stream") from None
    if raw[344:348] not in NIFTI_MAGIC and raw[4:8] not in NIFTI_MAGIC:
        raise bad_request(f"{where}: not a NIfTI file (no NIfTI magic in its header)")
    return data


def bad_request(message: str) -> MlflowException:
    """The scoring server answers an MlflowException with this code by HTTP 400 and the message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def requirements() -> list[str]:
    """The pinned dependencies of this package (pyproject.toml), torch first: what the model needs installed."""
    pins = [r for r in importlib.metadata.requires("pipeline") or [] if "extra ==" not in r]
    return sorted(pins, key=lambda r: not r.startswith("torch=="))


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The checkpoint artifact behind the Predictor (inference/predictor.py), with its default options (as
    pipeline.infer)."""

    # MLflow wraps `predict` to validate inputs against its type hints, and warns (resetting any warnings filter first)
    # where there are none; ours has a signature given (SIGNATURE), so the class opts out as MLflow's own models do
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.inference.predictor import Predictor
        from pipeline.models import checkpoint

        path = Path(context.artifacts["checkpoint"])
        self.predictor = Predictor({path: checkpoint.load(path)})
        # The scoring server calls predict from several threads at once; one volume at a time: each prediction
        # already uses every core, and OpenVINO's compiled model holds one infer request ("Infer Request is busy").
        self.one_at_a_time = threading.Lock()
        log.info(f"{path.name}: {self.predictor}")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a signature from them
        """A frame of base64 NIfTI (column `nifti`) -> a frame of base64 .nii.gz label maps (column `label_map`),
        each written by pipeline.infer's own writer."""
        from pipeline.core.errors import InputError
        from pipeline.data.io import Volume
        from pipeline.inference.predictor import predict_one

        if INPUT not in model_input.columns:
            raise bad_request(f"the request has no '{INPUT}' column (it has {list(model_input.columns)})")
        out = []
        with self.one_at_a_time, tempfile.TemporaryDirectory(prefix="pipeline-serve-") as tmp:
            for i, text in enumerate(model_input[INPUT]):
                data = decode(text, f"row {i}")
                source = Path(tmp) / f"case{i}.nii{'.gz' if data.startswith(GZIP_MAGIC) else ''}"
                source.write_bytes(data)
                target = Path(tmp) / f"case{i}_label.nii.gz"
                try:
                    predict_one(self.predictor, Volume(source), target, Path(tmp), save_probabilities=False,
                                post=self.predictor.options.postprocess)
                except InputError as err:  # a volume the model cannot take (channels, a broken header)
                    raise bad_request(f"row {i}: {str(err).replace(str(source), 'the volume')}") from None
                out.append(encode(target))
        return pd.DataFrame({OUTPUT: out})


def log_model(checkpoint: str | Path, run_id: str, tracking_uri: str, name: str = "model") -> str:
    """The checkpoint logged as an MLflow 3 model (a LoggedModel, the output of run `run_id`): returns its model id.
    Its URI `models:/<model id>` loads with mlflow.pyfunc and registers as a model version."""
    from pipeline.models.checkpoint import read
    from pipeline.tracking.runs import using_store

    # the run's metrics at the checkpoint's epoch (its validation Dice) become the model's own, on its page
    epoch = read(checkpoint).get("epoch", 0)
    client = mlflow.MlflowClient(tracking_uri)
    # made here, in the run's experiment: Model.log alone would file it under the process's active experiment
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
                                       tags={"checkpoint": Path(checkpoint).name}, model_type="segmentation")
    with using_store(tracking_uri):
        mlflow.models.Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, step=epoch,
                                model_id=model.model_id, python_model=SegmentationModel(),
                                artifacts={"checkpoint": str(checkpoint)}, signature=SIGNATURE,
                                pip_requirements=requirements())
    return model.model_id
