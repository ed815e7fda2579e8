"""Training as a library: build every component from a completed config, train, track (pipeline.train runs it)."""

import json
import logging
import platform
import shlex
import time
from pathlib import Path

import monai
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf

from pipeline.core import distributed, hardware
from pipeline.core.errors import InputError, RunStopped, faults_error
from pipeline.core.files import atomic
from pipeline.core.interrupts import Interrupts, submitit_job
from pipeline.core.rundir import RunDir
from pipeline.data.checks import check
from pipeline.data.fingerprint import cache_key, profile
from pipeline.data.sources import case_id, ensure_demo_data
from pipeline.data.transforms import loaders
from pipeline.evaluation import plots
from pipeline.models import checkpoint
from pipeline.models.adapters import ValidNetwork
from pipeline.models.weights import initialise
from pipeline.tracking.runs import NullTracker, VolumeDataset, finishing, git_dirty, sweep_tags
from pipeline.training import callbacks, engine
from pipeline.training.completion import complete
from pipeline.training.planning import plans

log = logging.getLogger(__name__)


def run_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn) -> str:
    """`<Model>_<Optimizer>_<Loss>`, e.g. UNet_Adam_DiceLoss."""
    model_name = getattr(model, "run_name", type(model).__name__)
    return f"{model_name}_{type(optimizer).__name__}_{type(loss_fn).__name__}"


def save_splits(splits: dict[str, list[dict]], run_dir: str | Path) -> Path:
    """splits.json: case ids per split, so a run's test set can be re-scored later."""
    path = RunDir(run_dir).splits
    with atomic(path) as tmp:
        tmp.write_text(json.dumps({k: [case_id(c) for c in v] for k, v in splits.items()}, indent=1))
    return path


def save_plans(cfg: DictConfig, job: engine.Job, run_dir: RunDir) -> Path:
    """plans.json beside the checkpoints, and its gist in a few lines."""
    p = plans(cfg, job.splits, job.precision, job.fingerprint())
    with atomic(run_dir.plans) as tmp:
        tmp.write_text(json.dumps(p, indent=1))
    d, net, minutes = p["dataset"], p["network"], p["budget"]["max_minutes"]
    budget = f"{minutes:g} min" if minutes else "no time budget"
    held = (f"{d['cases']['test']} held out for test" if d["cases"]["test"] else
            "none held out: every case trains, make cv estimates")
    log.info(f"plan: {d['cases']['train']} training cases of {d['name']} ({held}), "
             f"crop {'to nonzero' if p['preprocessing']['crop'] else 'none'}, "
             f"spacing {p['preprocessing']['spacing'] or 'native'}, patch {p['patch_size']} x {p['batch_size']}, "
             f"{getattr(job.model, 'run_name', type(job.model).__name__)} "
             f"{net.get('filters') or net.get('net', {}).get('filters', '')}, "
             f"mirrors {p['augmentation']['mirror_axes']}, "
             f"{p['loss'].rsplit('.', 1)[-1]}, {budget} in {p['hardware']['precision']}; split {d['subjects']}; "
             f"{run_dir.plans}")
    return run_dir.plans


def setup(cfg: DictConfig) -> engine.Job:
    """Data, split, plan and every component, built from the config (shared by `train` and the benchmarks); the
    caller adds the loaders, tracker and run folder.

    Under DDP rank 0 generates, checks and fingerprints the data first; the other ranks then read its caches.
    """
    with distributed.main_first():
        ensure_demo_data(cfg.data)
        report = {}
        if cfg.data.get("check", True) and distributed.is_main():  # every fault, before anything is cached or trained
            report = check(cfg, progress=False)
            if report["faults"]:
                raise faults_error(report["faults"], cfg.data.root)
            for warning in report["warnings"]:
                log.warning(warning)
        # the gate: every value left to the data, the plan or the training cases, from the dataset the check read
        done = complete(cfg, report.get("dataset"))
    set_determinism(seed=cfg.seed)  # python, numpy, torch and MONAI transform states
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic", False)), warn_only=True)
    model = initialise(instantiate(cfg.model), cfg.get("init"))  # the same weights on every rank (seed, not rank)
    if isinstance(model, ValidNetwork):  # unpadded (valid) convolutions: every pooling must be exact on the patch
        patch, valid = list(cfg.data.patch_size), [model.valid_input_size(n) for n in cfg.data.patch_size]
        if patch != valid:
            raise InputError(f"data.patch_size={patch}: {type(model).__name__} needs sizes whose poolings are exact; "
                             f"the nearest valid patch is {valid}")
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    device = distributed.local_device(hardware.pick_device(cfg.trainer.device))  # cuda:LOCAL_RANK under DDP

    def schedule(epochs: int):
        """The configured scheduler for a run of `epochs` epochs (its length interpolates trainer.max_epochs)."""
        return instantiate(OmegaConf.merge(cfg, {"trainer": {"max_epochs": epochs}}).scheduler)(optimizer)

    return engine.Job(
        splits=done.splits,
        fingerprint=done.fingerprint,
        model=model,
        loss_fn=instantiate(cfg.loss),
        optimizer=optimizer,
        scheduler=schedule(cfg.trainer.max_epochs) if cfg.scheduler else None,
        schedule=schedule if cfg.scheduler else None,  # the engine fits the schedule to a time budget with it
        inferer=instantiate(cfg.trainer.inferer),
        device=device,
        precision=hardware.resolve(cfg.trainer.amp, device),  # from the hardware: bf16 only where the CPU has it
        class_names=list(cfg.data.class_names),
        config=OmegaConf.to_container(cfg, resolve=True),
        schedule_config=OmegaConf.to_container(cfg.scheduler, resolve=False) if cfg.scheduler else None,
    )


def resume_from(cfg: DictConfig) -> tuple[Path, dict] | None:
    """The last.pt to continue and its content. `resume=<path>`: that last.pt or run folder; `resume=true`: the
    newest readable last.pt under outputs/runs/train (a newer one that is truncated or corrupt is named and skipped);
    `resume=auto`: this run folder's own last.pt if it holds one, else a fresh run (a stopped `make cv` run again into
    its folder). A submitit job whose own run folder already holds a last.pt was requeued: it continues that too."""
    resume = cfg.get("resume")
    if resume == "auto" or (resume is None and submitit_job()):
        if (own := RunDir(cfg.paths.run_dir).last).is_file():
            log.info(f"{'resume=auto' if resume else 'requeued job'}: resuming {own}")
            return own, checkpoint.load(own)
        return None
    if resume in (None, False):
        return None
    if resume is True:
        runs, skipped = Path(cfg.paths.outputs) / "runs" / "train", []
        for path in RunDir.lasts(runs):
            try:
                state = checkpoint.load(path)
            except InputError as err:
                skipped.append(str(err))
                continue
            if skipped:
                log.warning(f"resume=true: skipped {'; '.join(skipped)}; resuming {path} instead")
            return path, state
        raise InputError(f"{runs}: no run with a readable last.pt to resume" + (f" ({'; '.join(skipped)})"
                                                                                if skipped else ""))
    path = Path(resume)
    for candidate in (path, RunDir(path).last, path / "last.pt"):
        if candidate.is_file():
            return candidate, checkpoint.load(candidate)
    raise InputError(f"{path}: no last.pt to resume from")


def overrides() -> str:
    """This job's command-line overrides (empty outside a Hydra entry point)."""
    return " ".join(shlex.quote(o) for o in HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""


def datasets(cfg: DictConfig, splits: dict[str, list[dict]]) -> dict[str, VolumeDataset]:
    """The training and validation cases as MLflow dataset inputs: digest the file list's fingerprint."""
    data = cfg.data
    return {context: VolumeDataset(f"{data.name}/{split}", data.root, cache_key(cases),
                                   profile([c["image"] for c in cases], data.in_channels, list(data.class_names)))
            for context, split in (("training", "train"), ("validation", "val")) if (cases := splits[split])}


def run_tags(cfg: DictConfig, device, chosen: hardware.Precision, cases: list[dict]) -> dict:
    """What it takes to tell runs apart and redo one: code, data, seed, software, hardware, command."""
    return {
        "rerun": f"python -m pipeline.train {overrides()}".strip(), "overrides": overrides(), **sweep_tags(),
        "seed": cfg.seed, "device": str(device), "amp": chosen.name, "amp_reason": chosen.reason,
        "cpu": hardware.cpu_class(),
        "git_dirty": git_dirty(), "data_fingerprint": cache_key(cases), "python": platform.python_version(),
        "torch": torch.__version__, "monai": monai.__version__,
        **({"world_size": distributed.world_size()} if distributed.active() else {}),  # DDP: results depend on it
    }


def publish(cfg: DictConfig, tracker: NullTracker, run_dir: RunDir, result: dict) -> str | None:
    """A finished run's record in the tracker: best Dice, checkpoints, curves, and the checkpoint that stands for the
    run (best.pt; last.pt for data.fold=all) as its MLflow model; with tracking.register=true a version of the
    registered model, whose URI it returns (None otherwise)."""
    tracker.log_metrics({"best_val_dice_mean": result["best"]["val_dice_mean"]}, step=result["epochs"])
    for ckpt in (run_dir.best, run_dir.last):
        tracker.log_artifact(ckpt, "checkpoints")
    if distributed.is_main():
        tracker.log_artifact(plots.curves(result["history"], cfg.data.class_names, run_dir.curves))
    model = run_dir.model()
    from pipeline.inference import serving  # imports mlflow: only where a run logs its model

    tracker.log_model(model, serving.log_model)
    return tracker.register(model)


def train(cfg: DictConfig) -> dict:
    """Build every component from the config, train, and return {"best": metrics, "step_losses": [...], ...}.

    With `resume`, the interrupted run's own config, checkpoint folder and MLflow run are continued. Under torchrun
    with trainer=ddp each process runs this as one rank of a DistributedDataParallel run (see conf/trainer/ddp.yaml).
    """
    state = None
    if (found := resume_from(cfg)) is not None:
        path, state = found
        if "optimizer" not in state:
            raise InputError(f"{path}: holds no optimizer state (a best.pt?); resume from last.pt")
        cfg = OmegaConf.create(state["config"])
        if state.get("schedule"):  # as composed: its length follows trainer.max_epochs, which a budget refits
            cfg.scheduler = state["schedule"]
    with distributed.session(cfg.trainer, hardware.pick_device(cfg.trainer.device)):  # a process group under torchrun
        if state is not None:
            log.info(f"resuming {path} after epoch {state['epoch']}")
        return _train(cfg, state)


def _train(cfg: DictConfig, state: dict | None) -> dict:
    """One training run (or this rank's part of one) from a composed config; `state`: a loaded last.pt to continue."""
    job = setup(cfg)
    splits = job.splits
    distributed.seed_rank(cfg.seed)  # DDP: each rank augments and shuffles with seed + rank
    job.train_loader, job.val_loader = loaders(cfg, splits["train"], splits["val"])  # DDP: this rank's share
    if distributed.debugging():
        distributed.debug("shares", **{k: [case_id(c) for c in d.dataset.data]
                                       for k, d in (("train", job.train_loader), ("val", job.val_loader))})

    name = run_name(job.model, job.optimizer, job.loss_fn)
    tracker = job.tracker = instantiate(cfg.tracking) if distributed.is_main() else NullTracker()  # DDP: rank 0's
    every_case = [c for part in splits.values() for c in part]
    tracker.start(name, job.config, run_tags(cfg, job.device, job.precision, every_case),
                  run_id=state and state.get("run_id"))
    run_dir = job.run_dir = RunDir(cfg.paths.run_dir)
    if state is None and tracker.run_id:  # the headers are read only for a store that keeps them
        tracker.log_datasets(datasets(cfg, splits))
    if state is None and distributed.is_main():
        tracker.log_artifact(save_splits(splits, run_dir.root))
        if cfg.get("plan"):  # a planned run (plan=auto, experiment=auto): what the plan decided
            tracker.log_artifact(save_plans(cfg, job, run_dir))
    ranks = f", DDP over {distributed.world_size()} ranks" if distributed.active() else ""
    log.info(f"{name}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test cases "
             f"from {cfg.data.root} on {job.device}{ranks}")
    log.info(job.precision)
    start = time.perf_counter()
    with finishing(tracker, run_dir.last_good) as end:  # the MLflow run's status, however this block ends
        with Interrupts() as job.interrupts:  # SIGINT/SIGTERM: stop at the next step, save, say how to continue
            result = engine.fit(cfg.trainer, job, callbacks.from_config(cfg.trainer), resume=state)
        if result["interrupted"]:
            end.status = "KILLED"
            if job.interrupts.requeues():  # submitit's signal: its handler requeues the job, which resumes last.pt
                end.reason = f"preempted or out of time: requeued by submitit to resume from {run_dir.last}"
                log.info(end.reason)
                job.interrupts.hand_over()  # exits
            raise RunStopped(f"interrupted after epoch {result['epochs']} (step {result['steps']}); continue with: "
                             f"make train resume={run_dir.root}", code=128 + result["interrupted"], prefix="")
        result["model_uri"] = publish(cfg, tracker, run_dir, result)
    minutes = (time.perf_counter() - start) / 60
    done = state["epoch"] if state else 0  # epochs finished before this process began
    took = f"{result['epochs']} epochs in {minutes:.1f} min"
    if done:  # a resumed run: say what this process did
        took = (f"epochs {done + 1}-{result['epochs']} in {minutes:.1f} min, resumed after epoch {done}"
                if result["epochs"] > done else f"finished before, at epoch {done}: nothing left to train")
    log.info(f"{name}: best val dice {result['best']['val_dice_mean']:.4f} at epoch {result['best']['epoch']} "
             f"({took}); checkpoints in {run_dir.checkpoints}")
    return result | {"run_name": name, "run_id": tracker.run_id, "config": cfg}
