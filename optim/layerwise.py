"""Per-layer updates: step each parameter inside backward and free its gradient at once.

Holding every gradient until ``step()`` costs a full copy of the weights; stepping a parameter as
soon as its gradient is complete (GaLore's "per-layer weight updates") keeps only the gradients
still being produced. ``LayerwiseOptimizer`` gives each parameter its own instance of any
``torch.optim.Optimizer`` class (GaLoreAdamW, torch.optim.AdamW, ...) and steps it from a
``register_post_accumulate_grad_hook``.

Contract with the training loop:
- ``begin_micro_step(is_last)`` before each backward of an accumulation window; hooks step only
  during the last one, so gradients accumulate as usual before it.
- ``step()`` after the last backward only finishes the step: it updates parameters whose gradient
  arrived without the hook (set by hand, or never produced by autograd) and records the gradient
  norm. The LR scheduler changes this wrapper's ``param_groups``; each inner optimizer is synced to
  its group right before its parameter steps, so one schedule clock drives them all.
- ``register_step_pre_hook`` hooks run once per step, just before the first parameter changes.
- A parameter whose gradient is non-finite is not updated (its norm, in ``grad_norm``, tells the loop
  the step was bad); the others of that step, stepped before it inside backward, are. The check costs
  one host sync per parameter on CUDA.
- Global gradient clipping cannot work (no step ever sees all gradients); ``clip_norm`` clips each
  parameter's gradient norm instead. ``clip_grad_norm_(params, inf)``, where a loop would clip,
  returns the global norm before clipping (``grad_norm`` after ``step()``); a finite max norm there
  is an error.

Under DDP a post-accumulate hook sees the local gradient before the allreduce, so
``attach_ddp(model)`` moves the stepping into a DDP communication hook: each bucket is
allreduced (averaged, as DDP does), then its parameters step on the reduced gradient. DDP's buckets
keep a full gradient copy, so there the gain is overlap, not memory. FSDP2 shards gradients
(reduce-scatter into DTensors) and DeepSpeed owns the optimizer step, so neither combines with
per-layer updates; FSDP2 parameters are rejected here.
"""

import math
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
    """Steps each parameter with its own ``optimizer_class`` instance as soon as its gradient is ready."""

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
        self._grad_hooks: list[RemovableHandle] = []
        self._layerwise_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._is_last_micro_step = True
        self._stepped: set[torch.Tensor] = set()
        self._pre_hooks_ran = False
        self._grad_sq_sum: torch.Tensor | None = None
        self._ddp: DistributedDataParallel | None = None
        self.grad_norm: torch.Tensor | None = None
        super().__init__(params, dict(optimizer_kwargs))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if _is_dtensor(p):
                raise UserError("optim.layerwise: the parameters are sharded DTensors (FSDP2), whose gradients are "
                                "reduce-scattered shards; per-layer updates need the full reduced gradient of each "
                                "parameter. Use layerwise with a single process or DDP, or turn it off.")
            options = {k: v for k, v in group.items() if k != "params"}
            inner = self.optimizer_class([{**options, "params": [p]}], **self.optimizer_kwargs)
            # The wrapper's groups carry every hyper-parameter the inner optimizer resolved (lr
            # included), so LR schedulers and state_dict() see them.
            for key, value in inner.param_groups[0].items():
                if key != "params":
                    group.setdefault(key, value)
            self.inner[p] = inner
            self._group_of[p] = group
            self.state[p] = inner.state[p]  # the same dict object: inner steps update it in place
            if p.requires_grad:
                self._grad_hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def begin_micro_step(self, is_last: bool) -> None:
        """Declare whether the coming backward is the last of the accumulation window."""
        self._is_last_micro_step = is_last

    def attach_ddp(self, model: DistributedDataParallel) -> None:
        """Step parameters in DDP's communication hook, on the allreduced gradient (before any backward)."""
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"attach_ddp needs a DistributedDataParallel module, got {type(model).__name__}")
        model.register_comm_hook(model.process_group, self._allreduce_then_step)
        self._ddp = model

    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, run once per step before the first parameter update."""
        handle = RemovableHandle(self._layerwise_pre_hooks)
        self._layerwise_pre_hooks[handle.id] = hook
        return handle

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._ddp is not None or not self._is_last_micro_step:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("LayerwiseOptimizer in a distributed run without attach_ddp(model): the gradient "
                               "here is local, before DDP's allreduce; call optimizer.attach_ddp(ddp_model) first")
        self._step_param(p)

    def _allreduce_then_step(self, process_group: dist.ProcessGroup, bucket: dist.GradBucket
                             ) -> torch.futures.Future[torch.Tensor]:
        future = allreduce_hook(process_group, bucket)
        future.wait()
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            if p not in self.inner:
                continue
            if p.grad is None and not bool(grad.any()):
                continue  # unused on every rank (find_unused_parameters): DDP leaves no gradient to step on
            # The reducer copies the bucket into p.grad only at the end of backward.
            p.grad = grad
            self._step_param(p)
        return future

    def _step_param(self, p: torch.Tensor) -> None:
        if p in self._stepped:
            raise RuntimeError("a parameter received a second gradient within one optimizer step: call "
                               "begin_micro_step(is_last=False) before every backward but the window's last")
        if not self._pre_hooks_ran:
            self._run_pre_hooks()
        grad = p.grad
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)  # a reduction: no gradient-sized temporary
        sq = norm.square()
        self._grad_sq_sum = sq if self._grad_sq_sum is None else self._grad_sq_sum + sq.to(self._grad_sq_sum.device)
        if not torch.isfinite(norm):  # divergence: leave this parameter as it is (grad_norm reports the step)
            p.grad = None
            self._stepped.add(p)
            return
        if self.clip_norm > 0.0:
            # The same coefficient as torch.nn.utils.clip_grad_norm_, on this parameter's norm alone.
            grad.mul_((self.clip_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
        inner = self.inner[p]
        inner.param_groups[0].update((k, v) for k, v in self._group_of[p].items() if k != "params")
        inner.step()
        p.grad = None
        self._stepped.add(p)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global norm of this step's gradients before clipping, for the training loop to log.

        Called where a loop clips globally (``parameters`` is ignored: every gradient has already
        passed through here). Global clipping itself cannot work, since each parameter stepped
        before the global norm existed, so a finite ``max_norm`` is an error; ``clip_norm`` clips
        each parameter instead.
        """
        if math.isfinite(max_norm):
            raise UserError(f"global gradient clipping (max norm {max_norm}) cannot combine with optim.layerwise: "
                            "each parameter steps inside backward, before the global norm exists. Set "
                            "trainer.grad_clip=0 and use optim.layerwise_clip to clip each parameter instead")
        return self._grad_sq_sum.sqrt() if self._grad_sq_sum is not None else torch.zeros(())

    def _run_pre_hooks(self) -> None:
        self._pre_hooks_ran = True
        for hook in list(self._layerwise_pre_hooks.values()):
            hook(self, (), {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Finish the step: update parameters whose gradient bypassed the hooks, then reset for the next."""
        if closure is not None:
            raise RuntimeError("LayerwiseOptimizer steps inside backward; a closure that re-runs backward cannot work")
        if not self._is_last_micro_step:
            raise RuntimeError("step() inside an accumulation window: call begin_micro_step(is_last=True) before "
                               "the window's last backward")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self._stepped:
                    self._step_param(p)
        if not self._pre_hooks_ran:
            self._run_pre_hooks()
        self.grad_norm = self._grad_sq_sum.sqrt() if self._grad_sq_sum is not None else torch.zeros(())
        self._grad_sq_sum = None
        self._stepped.clear()
        self._pre_hooks_ran = False

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
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)
