"""Ranks, the process group, FSDP2 / DDP wrapping, collectives and sharded state: the one module of
alignkit that knows which process it runs in (docs/architecture.md, "Scaling out").

torchrun (`torch.distributed.run`) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous; `Dist.from_env` joins the process group (NCCL on GPUs, gloo on CPUs) with every
collective bounded by `dist.timeout_s`. Without WORLD_SIZE (a plain `alignkit train`), `Dist()` is
one process and every collective is the identity, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from alignkit.errors import ConfigError


def env_rank() -> int:
    """This process's rank in the job torchrun describes in the environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """How many processes the job has (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def leave_group(ok: bool, timeout_s: float = 60.0) -> None:
    """Leave the process group before the interpreter shuts down (torchrun processes).

    After a run that succeeded, every process waits for the others (a barrier with a timeout), then
    destroys the group together: a process that tears gloo down while a peer still talks to it can
    abort at exit ("terminate called without an active exception", pytorch#190489), and the atexit
    handler registered at init runs too late to order that. After a failure no barrier is tried
    (a peer may be dead or stuck in a collective; torchtitan#1342): the group is only destroyed.
    """
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return
    if ok:
        try:
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError):  # a peer did not arrive in time (or the backend has no
            pass  # monitored barrier): leave anyway, the exit status says what happened
    tdist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # joined a torch.distributed process group (torchrun)
    strategy: str = "none"  # none (one process), fsdp or ddp
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    mixed_precision: bool = False  # FSDP2: bf16 parameters and compute, fp32 reduction and master weights
    context: int = 1  # processes a sequence is split over (`dist.context_parallel`); they share their data

    # -- setup -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, dist_cfg, device: torch.device, precision: str) -> "Dist":
        """Join the process group torchrun describes in the environment (or stay one process)."""
        from alignkit import context_parallel

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if dist_cfg.strategy not in ("auto", "fsdp", "ddp"):
            raise ConfigError(f"`dist.strategy` must be auto, fsdp or ddp; got {dist_cfg.strategy!r}.")
        context = dist_cfg.context_parallel
        context_parallel.configure(None)  # a former run in this process may have set a group
        if world % context:
            raise ConfigError(
                f"`dist.context_parallel: {context}` splits each sequence over {context} processes, but "
                f"torchrun started {world}; start a multiple of {context} (e.g. --nproc_per_node={context})."
            )
        # one process joins a group only when torchrun started it and FSDP is asked for by name (it
        # then runs the sharded code path on one device: the GPU check does)
        if world == 1 and not ("RANK" in os.environ and dist_cfg.strategy == "fsdp"):
            return cls()
        import torch.distributed as tdist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        timeout = datetime.timedelta(seconds=dist_cfg.timeout_s)
        if not tdist.is_initialized():  # once per process: later runs in the same process reuse the group
            if device.type == "cuda":
                # torch wants the bound device with its index ("cuda" alone is refused), also for one process
                device = device if device.index is not None else torch.device("cuda", local)
                torch.cuda.set_device(device)
                # NCCL for CUDA tensors, gloo for the CPU ones (batch weights, metrics, objects): NCCL
                # alone refuses a CPU tensor ("No backend type associated with device type cpu")
                tdist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device)
            else:
                tdist.init_process_group("gloo", timeout=timeout)
            import atexit

            atexit.register(lambda: tdist.is_initialized() and tdist.destroy_process_group())
        strategy = "fsdp" if dist_cfg.strategy == "auto" else dist_cfg.strategy
        if context > 1:  # groups of consecutive ranks; every process creates every group (torch's rule)
            groups = [tdist.new_group(list(range(g, g + context)), timeout=timeout) for g in range(0, world, context)]
            context_parallel.configure(context_parallel.ContextGroup(groups[rank // context], rank % context, context))
        return cls(
            rank,
            world,
            local,
            True,
            strategy,
            dist_cfg.reshard_after_forward,
            dist_cfg.cpu_offload,
            mixed_precision=strategy == "fsdp" and precision == "bf16",
            context=context,
        )

    @staticmethod
    def local_device(requested: torch.device) -> torch.device:
        """This process's device: with several processes on GPUs, the one of LOCAL_RANK."""
        if requested.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return requested

    @property
    def enabled(self) -> bool:
        """Whether collectives run (a process group was joined), even for one process."""
        return self.group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This process's share of the data: the processes of a context group share one."""
        return self.rank // self.context

    @property
    def data_size(self) -> int:
        """How many shares the data is split into (processes / context parallelism)."""
        return self.world_size // self.context

    # -- collectives (identities in one process) -----------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes of `t` (a copy; `t` is left as it is)."""
        if not self.enabled:
            return t
        import torch.distributed as tdist

        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as tdist

        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather_shares(self, obj) -> list:
        """[obj of data share 0, of share 1, ...] on every process: what `shard`'s shares computed
        (of a context group's processes, which computed the same, the first one's)."""
        return [o for r, o in enumerate(self.gather_objects(obj)) if r % self.context == 0]

    def broadcast(self, obj):
        """Rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as tdist

        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The data shares' tensors concatenated along dim 0, in order (sizes may differ; of a
        context group's processes, which computed the same, the first one's)."""
        if not self.enabled:
            return t
        return torch.cat([p for r, p in enumerate(self._all_parts(t)) if r % self.context == 0])

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """`gather` whose rows from this process are `t` itself, still in its autograd graph (the
        other processes' rows are copies): a statistic over every process's rows, whose gradient
        each process takes for its own rows. Every process must call it the same number of times;
        under context parallelism it is refused (a group's processes hold the same rows)."""
        if not self.enabled:
            return t
        if self.context > 1:
            raise ValueError("gather_rows under context parallelism: a context group's processes hold the same rows")
        parts = self._all_parts(t)
        parts[self.rank] = t
        return torch.cat(parts)

    def _all_parts(self, t: torch.Tensor) -> list:
        """[every process's `t`] (detached copies; sizes along dim 0 may differ)."""
        import torch.distributed as tdist

        sizes = [int(s) for s in self.gather_objects(int(t.shape[0]))]
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return [p[:n] for p, n in zip(parts, sizes)]

    def on_main(self, fn):
        """fn() on the main process only; its result, or the user error it raised, on every process
        (work such as checking a checkpoint's files that one process should do and all must agree on)."""
        from alignkit.errors import AlignkitError

        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except AlignkitError as e:
                if not self.enabled:
                    raise
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def shard(self, seq: list) -> list:
        """This process's contiguous share of `seq` (shares differ in length by at most one; the
        processes of a context group get the same)."""
        n, w, r = len(seq), self.data_size, self.data_rank
        start = r * (n // w) + min(r, n % w)
        return seq[start : start + n // w + (r < n % w)]

    def say(self, message: str) -> None:
        """Print `message` once (from the main process)."""
        if self.is_main:
            print(message, flush=True)

    def main_writes(self, write) -> None:
        """Run `write()` (a file write) on the main process only, then let every process go on."""
        if self.is_main:
            write()
        self.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process."""
        return bool(self.all_sum(torch.tensor([float(flag)])).item() > 0) if self.enabled else flag

    # -- sharding -----------------------------------------------------------------------------

    def wrap(self, model):
        """Shard a model for training with FSDP2 (in place: the model object stays the same); with
        `ddp`, or in one process, leave it whole.

        FSDP2 (`fully_shard`) goes on each decoder block, then on the root, which then holds the
        embeddings, the final norm and the head(s), tied or not (a tied weight must live in one
        FSDP unit). alignkit always calls the root's own forward (`logprobs.final_hidden`), so the
        root's hooks gather and reduce those parameters."""
        if not self.enabled:
            return model
        from alignkit.models import transformer_blocks
        from alignkit.quantization import unsplittable

        if self.strategy == "ddp":
            return model  # replicated: the loop averages its gradients (`average_grads`)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision
            else MixedPrecisionPolicy()
        )
        common = dict(
            mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        )
        kept = unsplittable(model)  # replicated: every process holds them whole
        for block in transformer_blocks(model):
            fully_shard(
                block,
                reshard_after_forward=self.reshard_after_forward,
                ignored_params=kept & set(block.parameters()) or None,
                **common,
            )
        fully_shard(model, ignored_params=kept or None, **common)
        return model

    @contextlib.contextmanager
    def full_params(self, *models):
        """Gather every parameter of FSDP2 `models` once, so forwards inside need no collectives
        (sampling, evaluation, reference passes: their number differs between processes); reshard
        at the end. Anything else: nothing to do."""
        if not self.enabled or self.strategy != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        roots = {id(m) for m in models}
        try:
            yield
        finally:
            for u in units:
                u.reshard()
                # FSDP2 keeps a root unit gathered after its forward (the backward needs it at once),
                # and alignkit's head runs after the root's forward: the root goes back to False
                u.set_reshard_after_forward(self.reshard_after_forward and id(u) not in roots, recurse=False)

    def average_grads(self, params: list) -> None:
        """Average the gradients of replicated parameters over the processes (DDP's all-reduce, done
        after the backward: one flat buffer per dtype rather than one call per parameter)."""
        if not self.enabled:
            return
        import torch.distributed as tdist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            group = [g for g in grads if g.dtype == dtype]
            flat = _flatten_dense_tensors(group)
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat /= self.world_size
            for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                g.copy_(synced)

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """Clip the global gradient norm of `params` (sharded or not) and return it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)

    def nonfinite_params(self, model) -> list[str]:
        """Names of trainable parameters holding NaN or inf on any process."""
        local = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
        ]
        return sorted({n for names in self.gather_objects(local) for n in names})

    # -- state --------------------------------------------------------------------------------

    @staticmethod
    def _frozen_left_out(model) -> bool:
        """A LoRA model's state is its adapters (and a reward head): the frozen base is the model it
        was loaded from, so checkpoints leave it out (a QLoRA base is never gathered or written)."""
        from alignkit.models import is_peft

        return is_peft(model)

    def model_state(self, model, full: bool) -> dict:
        """The model's state dict: full tensors on CPU (on rank 0 only when sharded; {} elsewhere),
        or this process's shards (for a DCP checkpoint); a LoRA model's trainable weights only."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=full, cpu_offload=full, ignore_frozen_params=self._frozen_left_out(model)
        )
        return get_model_state_dict(model, options=options)

    def _set_model_state(self, model, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        partial = self._frozen_left_out(model)
        set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=partial, strict=not partial))

    def optimizer_state(self, model, optimizer, full: bool) -> dict:
        """The optimizer's state keyed by parameter names (not positions), so it loads into the same
        model at another scale."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full)
        )

    def load_full_state(self, model, optimizer, model_state: dict | None, optimizer_state: dict | None) -> None:
        """Load full (unsharded) states into a sharded or plain model and its optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        if model_state is not None:
            set_model_state_dict(model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

    def save_sharded(self, state: dict, path) -> None:
        """Write {name: {"model": ..., "optimizer": ...}} of sharded states with DCP, every process its shards."""
        self._dcp("save", state, path)

    def _dcp(self, op: str, state: dict, path) -> None:
        """DCP's `save` or `load` of `state` at `path`, every process its shards. Without a process
        group DCP warns that it is "assuming the intent is to load (save) in a single process" even
        when told so (`no_dist=True`): one process reading a checkpoint written by several is what a
        resume at another scale and `alignkit export` do, so the warning is dropped here, and only here."""
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            if not self.enabled:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            getattr(dcp, op)(state, checkpoint_id=str(path), no_dist=not self.enabled)

    def load_sharded_model(self, model, path, name: str = "policy") -> None:
        """Load only module `name`'s weights from a DCP checkpoint (to export it)."""
        state = {name: {"model": self.model_state(model, full=False)}}
        self._dcp("load", state, path)
        self._set_model_state(model, state[name]["model"])

    def load_sharded(self, modules: dict, path) -> None:
        """Load a DCP checkpoint written at any scale into {name: (model, optimizer)}."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {
            name: {"model": self.model_state(m, full=False), "optimizer": self.optimizer_state(m, o, full=False)}
            for name, (m, o) in modules.items()
        }
        self._dcp("load", state, path)
        for name, (m, o) in modules.items():
            self._set_model_state(m, state[name]["model"])
            set_optimizer_state_dict(m, o, state[name]["optimizer"])
