"""`kvdiag eval` and `kvdiag reproduce` under torchrun: the ranks, the process group, how the pending
cells are shared out, and the barriers that join the ranks' work into one run directory.

    torchrun --nproc-per-node 2 --no-python kvdiag eval --model M --task needle ... --out runs/x

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1, `ranks()` initialises the process
group once per process: NCCL when the run's device is CUDA (each rank on cuda:LOCAL_RANK, `rank_device`)
plus a gloo group for the control messages (barriers and small Python objects, which never touch a
GPU), or gloo alone on CPU. No tensor crosses ranks: each rank decodes its own samples. Without torchrun
(or with WORLD_SIZE 1) nothing is initialised and every helper here is a no-op for the single rank.

Sharding (`shard_cells`), by samples (the default, `shard_samples`): whole samples, round-robin over
the samples that still have pending cells (pending sample j goes to rank j mod W). Whole samples
because a sample's cells share one exact prefill (and one teacher-forced fidelity pass), which
splitting them across ranks would repeat on each; `--batch-size` batches form within a rank from its
own samples. By methods (`--shard-by methods`): whole method configurations, each rank with all their
samples, for ranks that share a GPU whose decoding is bound by the host (`gpu_of`). The pending cells,
not all, because the ranks read the same files (predictions.jsonl and every rank's
predictions.rank{R}.jsonl) before any of them writes (a barrier), so they agree on what is pending: a
resumed run spreads what is left evenly, no finished cell runs again, and a run of any world size
resumes a run of any other (what decides is the set of finished cells, not which rank wrote them).
Each rank appends its rows to its own predictions.rank{R}.jsonl; after a barrier rank 0 merges them
(`kvdiag.eval.store`).

GPUs: one per rank (NCCL plus the gloo control group), or, with more local ranks than GPUs, ranks share
them round-robin over gloo alone (NCCL takes one rank per GPU; no tensor crosses ranks anyway).

Timeouts: every collective waits at most KVDIAG_DIST_TIMEOUT_S seconds (default 3600, the process
group's timeout), so a rank that died (and was not already stopped by torchrun, which ends the others
when one fails) turns into a one-line error on the others instead of a hang. Raise it when ranks are
merely uneven: rank 0 alone runs reproduce's spectrum and recall stages while the others wait.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import sys
from typing import Any

from kvdiag.errors import KvdiagError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "KVDIAG_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Any = None  # the gloo process group for barriers and objects (None: a single process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_current: Ranks | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise KvdiagError(
            f"environment variable {name}={value!r} is not an integer (torchrun sets it)"
        ) from None


def timeout_s() -> float:
    """The collectives' timeout in seconds: $KVDIAG_DIST_TIMEOUT_S or 3600."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value.strip():
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise KvdiagError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def ranks(device: str = "cpu") -> Ranks:
    """The ranks of this launch; under torchrun (WORLD_SIZE > 1) the first call initialises the process
    group (NCCL + a gloo control group when `device` is CUDA, else gloo) and later calls return it."""
    global _current
    if _current is not None:
        return _current
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _current = Ranks()
        return _current
    import torch
    import torch.distributed as dist

    seconds = timeout_s()
    timeout = datetime.timedelta(seconds=seconds)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        if device.startswith("cuda") and torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            torch.cuda.set_device(gpu_of(local_rank, gpus))
            if _env_int("LOCAL_WORLD_SIZE", world) > gpus:  # ranks share GPUs: NCCL allows one rank per GPU
                log.info("%d ranks on %d GPU(s): gloo only (no tensor crosses ranks)", world, gpus)
                dist.init_process_group("gloo", timeout=timeout)
            else:
                dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
        atexit.register(_shutdown)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _current = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, seconds, group)
    log.info("rank %d of %d (local rank %d)", _current.rank, _current.world, local_rank)
    return _current


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int | str | None) -> None:
    """End a torchrun rank that succeeded (`code` None or 0) now, after destroying the process group
    and flushing output; return at once outside torchrun or on an error code (that rank then exits
    normally). Why not a normal exit: gloo's worker threads release the last collective's tensors a
    moment after it completes, and when that moment falls inside the interpreter's finalisation the
    thread cannot take the GIL and the process aborts ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#179291), making torchrun report a finished run as failed.
    Why not on errors: torchrun stops the other ranks as soon as one fails, and a failing rank that
    left at once would cut off the others' own error lines. `kvdiag`'s CLI calls this last; every file
    was written (atomically) before."""
    if _current is None or not _current.distributed or code not in (None, 0):
        return
    _shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_device(device: str, r: Ranks) -> str:
    """The device this rank computes on: "cuda" becomes cuda:LOCAL_RANK under torchrun (the run's
    recorded device stays "cuda", so a single-process run resumes it); "cpu" stays."""
    if not r.distributed or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise KvdiagError(
            f"--device {device} names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda"
        )
    import torch

    return f"cuda:{gpu_of(r.local_rank, torch.cuda.device_count())}"


def gpu_of(local_rank: int, gpus: int) -> int:
    """The GPU a local rank computes on: its own when there are enough, else ranks share them round-robin
    (rank i on GPU i mod gpus). Sharing pays where decoding is bound by the host, not the GPU: a small
    model's eager decode step is mostly Python and kernel launches, so two ranks on one GPU run nearly
    twice the steps per second (`--shard-by methods` gives each rank its own method configurations)."""
    if gpus < 1:
        raise KvdiagError("--device cuda under torchrun, but no GPU is visible")
    return local_rank % gpus


def shard_samples(sample_ids: list[str], r: Ranks, idle_ok: bool = False) -> list[str]:
    """This rank's share of the samples with pending cells [ids in run order]: every world-th one,
    starting at its rank. More ranks than such samples is an error (a rank would hold a GPU and do
    nothing) unless idle_ok; no pending sample at all is not (rank 0 just rewrites the outputs)."""
    if r.distributed and 0 < len(sample_ids) < r.world and not idle_ok:
        raise KvdiagError(
            f"torchrun started {r.world} ranks but only {len(sample_ids)} sample(s) have cells left to run "
            f"(cells are shared out by whole samples); use --nproc-per-node {len(sample_ids)}"
            + (" or run without torchrun" if len(sample_ids) == 1 else " or fewer")
        )
    return sample_ids[r.rank :: r.world]


SHARD_BY = ("samples", "methods")


def check_shard_by(by: str, what: str = "--shard-by") -> None:
    """How ranks share cells: one of SHARD_BY (an error naming `what` otherwise)."""
    if by not in SHARD_BY:
        raise KvdiagError(f"{what} {by!r} is unknown; use one of {', '.join(SHARD_BY)}")


def shard_cells(cells: list, r: Ranks, by: str = "samples", idle_ok: bool = False) -> list:
    """This rank's pending cells (objects with .sample.id, .label and .budget), in their order.

    by="samples": whole samples (`shard_samples`). by="methods": whole method configurations (label ×
    budget, every world-th one in first-seen order, with all their samples): each rank then prefills
    every sample itself (the exact prefill repeats on every rank, which costs little on a GPU), but
    its decode steps are only its configurations', so ranks that share a host-bound GPU split the
    steps instead of each decoding every configuration (`gpu_of`). The run directory is the same."""
    check_shard_by(by, "shard_by")
    if by == "samples":
        mine = set(shard_samples(list(dict.fromkeys(c.sample.id for c in cells)), r, idle_ok))
        return [c for c in cells if c.sample.id in mine]
    groups = list(dict.fromkeys((c.label, repr(c.budget)) for c in cells))
    if r.distributed and 0 < len(groups) < r.world and not idle_ok:
        raise KvdiagError(
            f"torchrun started {r.world} ranks but only {len(groups)} method configuration(s) have cells left "
            f"to run (--shard-by methods shares out whole configurations); use --nproc-per-node {len(groups)} "
            "or fewer, or --shard-by samples"
        )
    mine = set(groups[r.rank :: r.world])
    return [c for c in cells if (c.label, repr(c.budget)) in mine]


def _failed(r: Ranks, what: str, err: Exception) -> KvdiagError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return KvdiagError(
        f"rank {r.rank} of {r.world}: the ranks did not all meet {what} within the process group's "
        f"timeout of {r.timeout_s:g} s ({first}); a rank probably died: the cells it finished are kept in "
        f"its predictions.rank*.jsonl, and the same command resumes (raise {TIMEOUT_ENV} if ranks are "
        "only slow)"
    )


def barrier(r: Ranks, what: str) -> None:
    """Wait until every rank gets here (at most the timeout); a rank that does not names itself in the
    error. `what` says where, for the message ("after the eval cells")."""
    if not r.distributed:
        return
    import torch.distributed as dist

    try:
        dist.monitored_barrier(
            group=r.group, timeout=datetime.timedelta(seconds=r.timeout_s), wait_all_ranks=True
        )
    except RuntimeError as err:  # DistBackendError and friends
        raise _failed(r, what, err) from err


def gather(r: Ranks, obj, what: str) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects)."""
    if not r.distributed:
        return [obj]
    import torch.distributed as dist

    barrier(r, what)
    objects: list = [None] * r.world
    try:
        dist.all_gather_object(objects, obj, group=r.group)
    except RuntimeError as err:
        raise _failed(r, what, err) from err
    return objects


def from_main(r: Ranks, obj, what: str):
    """Rank 0's `obj` on every rank (the others pass anything); they wait for rank 0 to get here."""
    if not r.distributed:
        return obj
    import torch.distributed as dist

    barrier(r, what)
    holder = [obj if r.main else None]
    try:
        dist.broadcast_object_list(holder, src=0, group=r.group)
    except RuntimeError as err:
        raise _failed(r, what, err) from err
    return holder[0]
