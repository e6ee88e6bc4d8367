"""Per-layer updates: step each parameter inside backward and free its gradient at once.

Holding every gradient until ``step()`` costs a full copy of the weights; stepping a parameter as
soon as its gradient is complete (GaLore's "per-layer weight updates") keeps only the gradients
still being produced. ``LayerwiseOptimizer`` gives each parameter its own instance of any
``torch.optim.Optimizer`` class (GaLoreAdamW, torch.optim.AdamW, ...) and steps it from a
``register_post_accumulate_grad_hook``.

Contract with the training loop:
- ``begin_micro_step(is_last)`` before each backward of an accumulation window; hooks step only
  during the last one, so gradients accumulate as usual before it and the step sees their sum.
- ``step()`` after the last backward only finishes the step: it updates parameters whose gradient
  arrived without the hook (set by hand, or never produced by autograd) and records the gradient
  norm. The LR scheduler changes this wrapper's ``param_groups``; each inner optimizer is synced to
  its group right before its parameter steps, so one schedule clock drives them all.
- ``register_step_pre_hook`` hooks run once per step, just before the first parameter changes.
- A parameter whose gradient is non-finite is not updated (its norm, in ``grad_norm``, tells the loop
  the step was bad); the others of that step, stepped before it inside backward, are. The check costs
  one host sync per parameter on CUDA.
- Global gradient clipping cannot work (no step ever sees all gradients); ``clip_norm`` clips each
  parameter's whole gradient (reduced over ranks, summed over the window) to that norm instead.
  ``clip_grad_norm_(params, inf)``, where a loop would clip, finishes the step's updates and returns
  the global norm before clipping (also ``grad_norm``); a finite max norm there is an error.

Where the hook runs, so that it sees the averaged gradient:
- One process: autograd calls it once the parameter's gradient is accumulated.
- DDP: autograd's call comes before the allreduce, so ``attach_ddp(model)`` moves the stepping into
  a DDP communication hook: each bucket is allreduced (averaged, as DDP does), then its parameters
  step on the reduced gradient. Each local gradient is freed there; ``.grad`` is left a view of the
  bucket, which DDP keeps anyway: one copy of the gradients instead of DDP's usual two.
- FSDP2: a parameter is a DTensor that autograd never sees; FSDP2 calls its post-accumulate-grad
  hooks itself after the reduce-scatter of its block, with the averaged shard as ``.grad``
  (``foreach_reduce`` in torch's ``_fully_shard``, since pytorch#129450), once per window since
  gradients are only reduced at its last micro-step. The shard steps and is freed there, block by
  block, so sharded gradients never exist for the whole model. Norms for clipping and ``grad_norm`` sum the shards'
  squares over the mesh: one all-reduce per clipped parameter, one per step for the global norm.
  Low-rank inner optimizers must be the sharded forms (``parallel/fsdp.py`` converts them).
DeepSpeed owns the optimizer step and refuses this optimizer.
"""

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..errors import UserError


class LayerwiseOptimizer(Optimizer):
    """Steps each parameter with its own ``optimizer_class`` instance as soon as its gradient is ready.

    A parameter is stepped by one layer-wise optimizer: building a second over the same parameters
    moves their hooks to it, and the first no longer steps them. ``copy.deepcopy`` and pickling keep
    every inner optimizer and the step in progress; the copy hooks its own parameters, drops the
    step pre-hooks (as ``torch.optim`` does) and must be attached to its DDP module again.
    """

    skip_non_finite = True
    """Leave a parameter whose gradient is not finite as it is (``leantrain estimate`` turns the check off)."""
    steps_in_backward = True
    """The loop's engine calls ``step()`` even after a non-finite gradient norm: it only finishes the step."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], optimizer_class: type[Optimizer],
                 *, clip_norm: float = 0.0, **optimizer_kwargs: Any):
        if clip_norm < 0.0:
            raise UserError(f"clip_norm must be >= 0 (0 disables per-parameter clipping), got {clip_norm}")
        # Set before Optimizer.__init__, whose add_param_group calls build the inner optimizers.
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = optimizer_kwargs
        self.clip_norm = clip_norm
        self.inner: dict[torch.Tensor, Optimizer] = {}
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._grad_hooks: dict[torch.Tensor, RemovableHandle] = {}
        self._layerwise_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._is_last_micro_step = True
        self._stepped: set[torch.Tensor] = set()
        self._pre_hooks_ran = False
        self._finished = False
        self._grad_sq_sum: torch.Tensor | None = None  # of whole gradients (one process, DDP)
        self._shard_sq_sum: torch.Tensor | None = None  # of this rank's shards (FSDP2): summed over ranks at the end
        self._ddp: DistributedDataParallel | None = None
        self.grad_norm: torch.Tensor | None = None
        super().__init__(params, dict(optimizer_kwargs))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if _is_dtensor(p) and not (p.device_mesh.ndim == 1 and p.placements[0].is_shard()):
                raise UserError(f"LayerwiseOptimizer: a DTensor parameter placed {p.placements} on a "
                                f"{p.device_mesh.ndim}-D mesh; per-layer updates take FSDP2's 1-D sharding only")
            options = {k: v for k, v in group.items() if k != "params"}
            inner = self.optimizer_class([{**options, "params": [p]}], **self.optimizer_kwargs)
            if hasattr(inner, "rounding_offset"):  # leantrain's optimizers: its own stream of rounding bits
                inner.rounding_offset = len(self.inner)
            # The wrapper's groups carry every hyper-parameter the inner optimizer resolved (lr
            # included), so LR schedulers and state_dict() see them.
            for key, value in inner.param_groups[0].items():
                if key != "params":
                    group.setdefault(key, value)
            self.inner[p] = inner
            self._group_of[p] = group
            self.state[p] = inner.state[p]  # the same dict object: inner steps update it in place
            self._hook(p)

    def _hook(self, p: torch.Tensor) -> None:
        if not p.requires_grad:
            return
        previous = _owner(p)
        if previous is not None:
            previous._unhook(p)  # built again over these parameters: the newest steps them
        self._grad_hooks[p] = p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _unhook(self, p: torch.Tensor) -> None:
        handle = self._grad_hooks.pop(p, None)
        if handle is not None:
            handle.remove()

    def convert_inner(self, convert: Callable[[Optimizer], Optimizer]) -> None:
        """Replace each inner optimizer by ``convert(inner)`` (before the first step), e.g. its sharded form."""
        if any(self.state[p] for p in self.inner):
            raise RuntimeError("convert_inner after a step: the inner optimizers already hold state")
        for p, inner in self.inner.items():
            self.inner[p] = converted = convert(inner)
            self.state[p] = converted.state[p]

    def begin_micro_step(self, is_last: bool) -> None:
        """Declare whether the coming backward is the last of the accumulation window."""
        self._is_last_micro_step = is_last

    def attach_ddp(self, model: DistributedDataParallel) -> None:
        """Step parameters in DDP's communication hook, on the allreduced gradient (before any backward)."""
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"attach_ddp needs a DistributedDataParallel module, got {type(model).__name__}")
        if model not in _STEPPING_DDP:  # one hook per module (DDP takes only one): it steps for the owners
            model.register_comm_hook(model.process_group, _allreduce_then_step)
            _STEPPING_DDP.add(model)
        self._ddp = model

    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, run once per step before the first parameter update."""
        handle = RemovableHandle(self._layerwise_pre_hooks)
        self._layerwise_pre_hooks[handle.id] = hook
        return handle

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._is_last_micro_step:
            return
        if _is_dtensor(p):
            self._step_param(p)  # FSDP2 calls this after the reduce-scatter: the averaged shard
            return
        if self._ddp is not None:
            return  # the communication hook steps it, once the bucket is reduced
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("LayerwiseOptimizer in a distributed run without attach_ddp(model): the gradient "
                               "here is local, before DDP's allreduce; call optimizer.attach_ddp(ddp_model) first")
        self._step_param(p)

    def _step_param(self, p: torch.Tensor) -> None:
        if p in self._stepped:
            raise RuntimeError("a parameter received a second gradient within one optimizer step: call "
                               "begin_micro_step(is_last=False) before every backward but the window's last")
        if not self._pre_hooks_ran:
            self._run_pre_hooks()
        grad = p.grad
        sharded = _is_dtensor(grad)
        local = grad.to_local() if sharded else grad
        sq = torch.linalg.vector_norm(local, dtype=torch.float32).square()  # a reduction: no gradient-sized temporary
        if sharded:
            self._shard_sq_sum = sq if self._shard_sq_sum is None else self._shard_sq_sum + sq
        else:
            self._grad_sq_sum = sq if self._grad_sq_sum is None else self._grad_sq_sum + sq.to(self._grad_sq_sum.device)
        if self.clip_norm > 0.0:
            # The whole parameter's norm: under FSDP2 the shards' squares summed over the mesh.
            norm = (_sum_over_mesh(sq, grad) if sharded else sq).sqrt()
            # The same coefficient as torch.nn.utils.clip_grad_norm_, on this parameter's norm alone.
            local.mul_((self.clip_norm / (norm + 1e-6)).clamp(max=1.0).to(local.dtype))
        if self.skip_non_finite and not torch.isfinite(sq):  # divergence: leave this parameter (under FSDP2 this shard) as it is
            p.grad = None
            self._stepped.add(p)
            return
        inner = self.inner[p]
        inner.param_groups[0].update((k, v) for k, v in self._group_of[p].items() if k != "params")
        inner.step()
        p.grad = None
        self._stepped.add(p)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Finish this step's updates and return the global norm of its gradients before clipping.

        Called where a loop clips globally (``parameters`` is ignored: every gradient has already
        passed through here). Global clipping itself cannot work, since each parameter stepped
        before the global norm existed, so a finite ``max_norm`` is an error; ``clip_norm`` clips
        each parameter instead. A collective under FSDP2: every rank calls it.
        """
        if math.isfinite(max_norm):
            raise UserError(f"global gradient clipping (max norm {max_norm}) cannot combine with optim.layerwise: "
                            "each parameter steps inside backward, before the global norm exists. Set "
                            "trainer.grad_clip=0 and use optim.layerwise_clip to clip each parameter instead")
        self._finish()
        return self.grad_norm

    def _run_pre_hooks(self) -> None:
        self._pre_hooks_ran = True
        for hook in list(self._layerwise_pre_hooks.values()):
            hook(self, (), {})

    @torch.no_grad()
    def _finish(self) -> None:
        """Step the parameters whose gradient bypassed the hooks and compute ``grad_norm`` (once per step)."""
        if self._finished:
            return
        if not self._is_last_micro_step:
            raise RuntimeError("step() inside an accumulation window: call begin_micro_step(is_last=True) before "
                               "the window's last backward")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self._stepped:
                    self._step_param(p)
        if not self._pre_hooks_ran:
            self._run_pre_hooks()
        sharded = next((p for p in self.inner if _is_dtensor(p)), None)
        total = self._grad_sq_sum if self._grad_sq_sum is not None else torch.zeros(())
        if sharded is not None:  # every rank holds the same parameters: each joins this all-reduce
            shards = self._shard_sq_sum if self._shard_sq_sum is not None else torch.zeros((), device=sharded.device)
            total = total.to(shards.device) + _sum_over_mesh(shards, sharded)
        self.grad_norm = total.sqrt()
        self._finished = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Finish the step: update parameters whose gradient bypassed the hooks, then reset for the next."""
        if closure is not None:
            raise RuntimeError("LayerwiseOptimizer steps inside backward; a closure that re-runs backward cannot work")
        self._finish()
        self._grad_sq_sum = self._shard_sq_sum = None
        self._stepped.clear()
        self._pre_hooks_ran = self._finished = False

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, each parameter's state as its inner optimizer saves it (sharded ones place theirs)."""
        packed = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):  # torch numbers parameters in group order
            if index in packed["state"]:
                packed["state"][index] = self.inner[p].state_dict()["state"][0]
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this wrapper (the same layout as a single optimizer's)."""
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise UserError("optimizer state does not match the model: different parameter groups or sizes")
        for group, saved in zip(self.param_groups, saved_groups):
            options = {k: v for k, v in saved.items() if k != "params"}
            group.update(options)
            for p, pid in zip(group["params"], saved["params"]):
                inner = self.inner[p]
                inner.load_state_dict({"state": {0: saved_state[pid]} if pid in saved_state else {},
                                       "param_groups": [{**options, "params": [0]}]})
                self.state[p] = inner.state[p]

    def remove_hooks(self) -> None:
        """Detach from the parameters (the DDP communication hook cannot be removed)."""
        for p in list(self._grad_hooks):
            self._unhook(p)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups: the inner optimizers, the
        # options they are built with and the step in progress are this wrapper's state as well.
        names = ("defaults", "state", "param_groups", "optimizer_class", "optimizer_kwargs", "clip_norm", "inner",
                 "_group_of", "_is_last_micro_step", "_stepped", "_pre_hooks_ran", "_finished", "_grad_sq_sum",
                 "_shard_sq_sum", "grad_norm")
        return {name: self.__dict__[name] for name in names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's hook dictionaries, empty
        self._grad_hooks, self._layerwise_pre_hooks, self._ddp = {}, OrderedDict(), None
        for p in self.inner:  # the copied parameters: ours to step
            self._hook(p)


_STEPPING_DDP: "weakref.WeakSet[DistributedDataParallel]" = weakref.WeakSet()
"""DDP modules whose communication hook is ``_allreduce_then_step``."""


def _owner(p: torch.Tensor) -> LayerwiseOptimizer | None:
    """The layer-wise optimizer whose hook is on ``p`` (at most one: each takes over from the last)."""
    for hook in (p._post_accumulate_grad_hooks or {}).values():
        if getattr(hook, "__func__", None) is LayerwiseOptimizer._on_grad_ready:
            return hook.__self__
    return None


def _allreduce_then_step(process_group: dist.ProcessGroup, bucket: dist.GradBucket
                         ) -> torch.futures.Future[torch.Tensor]:
    """DDP's allreduce (averaging) of one bucket, then each of its parameters steps with its owner."""
    future = allreduce_hook(process_group, bucket)
    future.wait()
    for p, grad in zip(bucket.parameters(), bucket.gradients()):
        owner = _owner(p)
        if owner is None or owner._ddp is None:
            continue  # not stepped in backward (no owner), or its owner was not attached and says so
        if p.grad is None and not bool(grad.any()):
            continue  # unused on every rank (find_unused_parameters): DDP leaves no gradient to step on
        # The reducer copies the bucket into p.grad only at the end of backward.
        p.grad = grad
        owner._step_param(p)
        # That copy would clone the bucket into a None p.grad, a gradient's worth of memory; into
        # the bucket's own view it allocates nothing (the local gradient was freed above).
        p.grad = grad
    return future


def _sum_over_mesh(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` summed over the ranks of the DTensor ``like``'s (1-D) mesh, on ``t``'s device.

    The sum runs on the mesh's device: with FSDP2's CPU offload the shards are on the host, NCCL is not.
    """
    mesh = like.device_mesh
    total = t.to(mesh.device_type, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return total.to(t.device)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)
