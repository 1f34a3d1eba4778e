"""The processes of one run: this one alone (``python``, ``ditloc``), or the several
that ``accelerate launch`` / ``torchrun`` started (data-parallel training, or a search
whose generations are split over the processes).

Read from accelerate's ``PartialState`` (which sets up the process group: NCCL
on GPUs, gloo on CPUs); a plain run never touches it. Process 0 is the main
process: it alone holds the output lock, draws the frozen model's class/anchor
images, prints progress and writes files; the others receive what it made
(:meth:`Processes.share`), what every process made (:meth:`Processes.gather`) and
wait for its writes (:meth:`Processes.wait`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import DitlocError

#: environment variables through which launchers give the number of processes
WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: and this process's rank among them
RANK_ENV = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` processes, and its
    ``device`` (None in a plain run: wherever the pipeline is)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Every process waits here until all have arrived."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def share(self, make):
        """``make()`` on the main process only; its result (picklable) on every process.
        Tensors travel through the CPU; they arrive there on the other processes."""
        if self.world == 1:
            return make()
        from accelerate.utils import broadcast_object_list, send_to_device

        box = [send_to_device(make(), "cpu") if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]


    def gather(self, items: list) -> list:
        """Every process's `items` (picklable), concatenated in process order, on every process."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(list(WORLD_ENV), 1) > 1


def launch_rank() -> int:
    """This process's rank as its launcher gives it (0 in a plain run), read before any process
    group is set up (the rank accelerate's ``PartialState`` reports later)."""
    if not launched():
        return 0
    from accelerate.utils import get_int_from_env

    return get_int_from_env(list(RANK_ENV), 0)


def current(device=None) -> Processes:
    """This run's processes. The first call in a launched process sets up the
    process group (`device`: a CPU device -> gloo, one CPU per process; otherwise
    one accelerator per process; None -> an accelerator if the machine has one)."""
    if not launched():
        return Processes()
    from accelerate import PartialState

    if device is None:
        cpu = not torch.accelerator.is_available()
    else:
        cpu = torch.device(device).type == "cpu"
    # collectives wait for the slowest process (e.g. the main one drawing anchor images): a day, not 30 min
    state = PartialState(cpu=cpu, timeout=timedelta(hours=24))
    return Processes(state.process_index, state.num_processes, torch.device(state.device))


def accelerator():
    """accelerate's Accelerator for the process group, the backward and the gradient all-reduce.
    Its own mixed precision stays off: ditloc applies ``TrainConfig.mixed_precision`` itself,
    since accelerate fixes the precision once per process. Plain data parallelism only."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    try:
        accelerator = Accelerator(mixed_precision="no", device_placement=False, dynamo_backend="no")
    except ValueError as e:
        raise DitlocError(f"accelerate is already set up differently in this process ({str(e).splitlines()[0]}); "
                          "set the precision with TrainConfig(mixed_precision=...) only") from None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise DitlocError(f"ditloc trains data-parallel (one whole model per process), not with "
                          f"{accelerator.distributed_type.value}; launch without it (accelerate launch --multi_gpu)")
    return accelerator


def buckets(tensors: list[torch.Tensor], size: int = 1 << 24):
    """Consecutive runs of one dtype and device, up to `size` elements each (one all-reduce per run)."""
    bucket, n = [], 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or n + t.numel() > size):
            yield bucket
            bucket, n = [], 0
        bucket.append(t)
        n += t.numel()
    if bucket:
        yield bucket
