"""DistributedDataParallel helpers for `trainer=ddp` under torchrun; every one is a no-op in a plain run.

torchrun starts one process (rank) per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address.
Everything here asks torch.distributed whether a process group is up, so a run without torchrun never needs one.
"""

import contextlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

DEBUG_DIR = "PIPELINE_DDP_DEBUG_DIR"  # set: every rank appends what it validated to rank<r>.jsonl there (tests)


def launched() -> int:
    """The number of processes torchrun started (0 outside torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0


def active() -> bool:
    """A process group is up (this process is one rank of a DDP run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def local_world_size() -> int:
    """How many ranks share this machine (and its RAM)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if active() else 1


def is_main() -> bool:
    """Rank 0, the one that prints, tracks and writes files (True in a plain run)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA device under DDP (one GPU per rank); otherwise `device` unchanged."""
    return torch.device("cuda", local_rank()) if active() and device.type == "cuda" else device


@contextlib.contextmanager
def session(trainer, device: torch.device):
    """trainer.ddp under torchrun: a process group from torchrun's environment for the block, destroyed after it.
    Without torchrun (or without trainer.ddp) the block runs plainly."""
    ddp, processes = trainer.get("ddp"), launched()
    if processes > 1 and not ddp:
        raise InputError(f"started by torchrun with {processes} processes: add trainer=ddp (or each would train alone)")
    if not ddp or not processes or active():
        if ddp and not processes:
            log.info("trainer=ddp without torchrun: training in this one process")
        yield
        return
    backend = ("nccl" if device.type == "cuda" else "gloo") if ddp.backend == "auto" else ddp.backend
    bound = None
    if device.type == "cuda":
        bound = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(bound)
    dist.init_process_group(backend, timeout=timedelta(minutes=ddp.get("timeout_min", 30)),
                            device_id=bound if backend == "nccl" else None)
    try:
        yield  # ranks other than 0 log errors only (pipeline.core.logs.RankZero) and show no progress bars
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier(device_ids=[local_rank()]) if dist.get_backend() == "nccl" else dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may generate data and write caches); the other ranks run it once it is done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def partition(cases: list, *, even: bool = False) -> list:
    """This rank's share, cases[rank::world_size]. `even`: pad first by repeating cases from the start, so every rank
    gets as many (DDP steps all ranks in lockstep); without it the shares may differ by one."""
    size, n = world_size(), len(cases)
    if size == 1:
        return list(cases)
    if even and n % size:
        cases = [cases[i % n] for i in range(-(-n // size) * size)]
    return cases[rank()::size]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The elementwise sum (or max) of `tensor` over all ranks, on its own device (`tensor` itself in a plain run)."""
    if not active():
        return tensor
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = tensor.detach().to(comm, copy=True)
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out.to(tensor.device)


def mean(total: float, count: int) -> float:
    """sum(totals) / sum(counts) over ranks, e.g. the epoch's mean training loss over every rank's steps."""
    if not active():
        return total / count
    total, count = all_reduce(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / count


def maximum(value: float) -> float:
    """The largest value over ranks (the slowest rank's time), so time limits stop every rank at the same epoch."""
    return all_reduce(torch.tensor(value, dtype=torch.float64), "max").item() if active() else value


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a plain run."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, device: torch.device, *, find_unused: bool = False) -> torch.nn.Module:
    """The model in DistributedDataParallel (gradients averaged over ranks) when a process group is up, else itself."""
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def local_gradients(model: torch.nn.Module, local: bool):
    """With `local` (a batch between optimizer steps, under accumulation): backward skips the gradient all-reduce."""
    return model.no_sync() if local and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def seed_rank(seed: int) -> None:
    """Under DDP: reseed python, numpy, torch and MONAI with seed + rank, so each rank augments and shuffles its own
    way (call it after the model is built: its weights come from `seed` on every rank)."""
    if active():
        set_determinism(seed=seed + rank())


def rng_states(state: dict) -> dict:
    """For last.pt: rank 0's random state, plus every rank's in rank order under "ranks" when several train."""
    return state | {"ranks": gather(state)} if active() else state


def own_rng(state: dict) -> dict | None:
    """This rank's random state from rng_states(); None when last.pt was written by another number of ranks (this
    rank then keeps its fresh seed + rank streams)."""
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == world_size():
        return ranks[rank()]
    if world_size() == 1:
        return {k: v for k, v in state.items() if k != "ranks"}
    log.info(f"resume: last.pt holds the random state of {len(ranks or [0])} rank(s), not {world_size()}; "
             f"augmentation continues from seed + rank")
    return None


def debugging() -> bool:
    """$PIPELINE_DDP_DEBUG_DIR is set: callers build their debug records only then."""
    return bool(os.environ.get(DEBUG_DIR))


def debug(kind: str, **record) -> None:
    """With $PIPELINE_DDP_DEBUG_DIR set: append {kind, rank, world_size, **record} as one JSON line to rank<r>.jsonl."""
    if debugging():
        folder = Path(os.environ[DEBUG_DIR])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{rank()}.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "rank": rank(), "world_size": world_size(), **record}) + "\n")
