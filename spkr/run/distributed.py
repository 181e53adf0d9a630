"""Process group, device and precision for a run: the one place that decides them.

    env = setup(device_arg)          # DDP from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR): nccl on
                                     # GPUs, gloo on CPU; else one process. env.rank/world/device/ddp
    dtype, why = resolve_dtype("auto" | "bf16" | "fp16" | "fp32", device)
    with autocast(device, dtype): ...           # no-op for fp32
    scaler = make_scaler(device, dtype)         # a GradScaler enabled for fp16 only
    sums = all_reduce_sums([...], env)          # float64 sums over ranks; gather(obj, env) -> [per rank]
    teardown()

Precision policy (``resolve_dtype``, used by training, its valid/test passes, ``spkr.evaluate`` and
``chart_losses`` alike): "auto" is bf16 where the device computes it natively (GPUs with bf16; CPUs
with AVX512-BF16 / AMX / Arm bf16), fp16 + GradScaler on older GPUs, fp32 on other CPUs, where bf16 is
emulated (the tiny model's fwd+bwd ran 2.3-3x slower in bf16 than in fp32 on an AVX2-only Zen 3).
``DTYPES`` is the one name -> torch dtype map. Rank and world size come from
:func:`spkr.stream.loader.default_rank_world` once the process group is up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spkr import runtime

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)  # what --dtype and the [train] dtype accept


def dtype_name(dtype: torch.dtype | None) -> str:
    """ "bfloat16" / "float16" / "float32" (None = fp32): how metrics rows and eval JSON name it."""
    return str(dtype or torch.float32).replace("torch.", "")


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 / AMX-BF16 or the Arm ``bf16`` feature (from /proc/cpuinfo). Elsewhere autocast
    emulates bf16: the tiny model's fwd+bwd ran 2.3-3x slower than fp32 on an AVX2-only Zen 3."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features"))]
    except OSError:
        return False
    flags = {flag for ln in lines for flag in ln.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(autocast dtype, why): "auto" is bf16 where the device computes it natively (CUDA with bf16,
    CPUs with AVX512-BF16/AMX), fp16 + GradScaler on older GPUs, fp32 on other CPUs."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
        return DTYPES[name], "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bf16"
        return torch.float16, "auto: the GPU has no bf16"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: the CPU has native bf16 (AVX512-BF16/AMX)"
    return torch.float32, "auto: the CPU has no native bf16 (it would be emulated, ~2-3x slower)"


def describe_dtype(dtype: torch.dtype, why: str) -> str:
    """One log line part: ``dtype float32 (auto: ...)``, ``+ GradScaler`` for fp16."""
    scaler = " + GradScaler" if dtype == torch.float16 else ""
    return f"dtype {dtype_name(dtype)}{scaler} ({why})"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for bf16/fp16; a no-op context for fp32 (or None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """The GradScaler of a run: enabled for fp16 only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def wants_cuda(device_arg: str | None) -> bool:
    """Whether the run will use CUDA (``--device``, else whether a GPU is visible)."""
    return torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")


def restart_count() -> int:
    """TORCHELASTIC_RESTART_COUNT: 0 on a first attempt (or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: DDP or not, its rank among ``world``, its local rank and device."""

    ddp: bool
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def _torchrun_present() -> bool:
    return int(os.environ.get("RANK", -1)) != -1 and "MASTER_ADDR" in os.environ


def _init_process_group(backend: str) -> None:
    restart = restart_count()
    if restart == 0:
        dist.init_process_group(backend=backend)
        return
    # After a torchrun restart the agent's store still holds the previous attempt's gloo addresses
    # under the same keys (connectFullMesh then dials dead workers): a fresh key prefix per attempt.
    rank, world = runtime.env_rank_world()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=datetime.timedelta(minutes=10),
    )
    store = dist.PrefixStore(f"spkr/attempt{restart}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)


def setup(device_arg: str | None) -> DistEnv:
    """Join torchrun's process group when its environment is present (nccl on CUDA, gloo on CPU),
    else run as the only process; picks the device (``--device``, else cuda when available)."""
    use_cuda = wants_cuda(device_arg)
    if not _torchrun_present():
        return DistEnv(False, 0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    _init_process_group("nccl" if use_cuda else "gloo")
    from spkr.stream.loader import default_rank_world  # the one rank/world function

    rank, world = default_rank_world()
    return DistEnv(True, rank, world, local, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


def teardown() -> None:
    """Leave the process group if one is up (errors while leaving are ignored)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------ one rank's error, told to the others

FAILURE_KEY = "spkr/failed"  # in the process group's store: "<rank>\n<message>" of the first rank to fail
_STORE_TIMEOUT = datetime.timedelta(seconds=10)


def _store():
    """The default process group's store (torchrun's agent store, or rank 0's), None without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)
        return store
    except Exception:
        return None


def announce_failure(message: str) -> None:
    """Record this rank's error in the store before the rank leaves (a no-op without a process
    group): a rank its exit releases from a collective then reports it (:func:`peer_failure`) in one
    line instead of the transport's traceback. The store outlives the ranks under torchrun (its agent
    holds it); a store that cannot be reached is ignored."""
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.compare_set(FAILURE_KEY, "", f"{dist.get_rank()}\n{message}")


def peer_failure() -> str | None:
    """``rank R failed, so rank Q stopped: <message>`` when another rank recorded its error
    (:func:`announce_failure`), else None (also without a process group or when the store is gone)."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([FAILURE_KEY]):
            return None
        rank, _, message = store.get(FAILURE_KEY).decode("utf-8", "replace").partition("\n")
        return f"rank {int(rank)} failed, so rank {dist.get_rank()} stopped: {message}"
    except Exception:
        return None


# ------------------------------------------------------------------ collectives


def all_reduce_sums(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64; the values themselves without DDP)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without DDP)."""
    if not env.ddp:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.ddp:
        dist.barrier()
