"""Promote entry point: `python -m pipeline.promote run=<run id> alias=champion [name=...]` moves a registry alias to
the version that holds that training run's MLflow model, registering the model first where no version holds it."""

import logging

from omegaconf import DictConfig

from pipeline.core.config import entry_point
from pipeline.core.errors import InputError
from pipeline.tracking.runs import register_version, tracking_errors, using_store

log = logging.getLogger(__name__)


def promote(uri: str, run_id: str, alias: str, name: str | None = None) -> str:
    """The alias moved to run_id's model version (registered now if none is): returns models:/<name>@<alias>."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except tracking_errors() as err:
        raise InputError(f"run={run_id}: no such run in {uri} ({type(err).__name__})") from None
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise InputError(f"run={run_id}: the run logged no MLflow model (trained with tracking.log_model=false, or by "
                         "an older release: train again, or infer from its checkpoint file)")
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if name is None or v.name == name]
    if versions:
        version = max(versions, key=lambda v: int(v.version))
        client.set_registered_model_alias(version.name, alias, version.version)
        name = version.name
    else:
        name = name or run.data.params.get("data.name") or client.get_experiment(run.info.experiment_id).name
        with using_store(uri):  # the registry looks the model's source up in MLflow's global store
            register_version(client, name, models[0].model_id, run_id, alias)
    version = client.get_model_version_by_alias(name, alias)
    log.info(f"models:/{name}@{alias} -> version {version.version} (run {run_id}, model {models[0].model_id})")
    return f"models:/{name}@{alias}"


@entry_point("promote")
def main(cfg: DictConfig) -> None:
    promote(cfg.uri, cfg.run, cfg.alias, cfg.name)


if __name__ == "__main__":
    main()
