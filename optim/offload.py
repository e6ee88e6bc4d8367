"""Optimizer offload: fp32 master weights and optimizer state in host memory, updated on the host or the device.

``OffloadOptimizer`` wraps any optimizer class (AdamW, GaLoreAdamW, ...). The trainable parameters are
cut into subgroups of about ``subgroup_numel`` elements (whole tensors: low-rank optimizers need
their matrices), each with its own inner optimizer over host fp32 master copies. Every step:

- host subgroups (``mode="cpu"``: all of them) step on the host, on a pool of ``cpu_threads`` threads,
  from gradients copied to host memory during backward; their updated weights are copied back;
- device subgroups (``mode="interleaved"``, Deep Optimizer States) have their masters and state
  prefetched to the device on a side stream, one subgroup ahead, step there, and are copied back,
  all while the host threads update the others.

Which subgroups go to the device is decided each step by ``plan_placement``: a bottleneck model of
the step in which the host threads, the device, and each direction of the host-device link work at
once, fed with rates measured on this machine (link bandwidth by a probe copy, update throughputs
from the steps themselves). With equal subgroups of n parameters, s bytes of state each way and the
link at B bytes/s, the link stays hidden behind the host updates while a device subgroup comes at
most every g-th with g >= 1 + s U_cpu / (n B): the full-overlap condition of Deep Optimizer States.

On a machine without CUDA the device is the CPU: the same code runs, "device" updates work on
copies of the state, and the results are bitwise those of the wrapped optimizer with each subgroup
stepped alone. That equals the unwrapped optimizer whenever its update of one tensor does not
depend on the others (AdamW, GaLore and Natural GaLore with exact SVD and no stagger); random
choices seeded by a tensor's position (randomized SVD, FRUGAL) are drawn per subgroup instead.
Under DDP (or any multi-process run) the reduced gradients are only complete after backward, so
they are copied to the host at ``step()``.
"""

import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..errors import UserError

OFFLOAD_MODES = ("none", "cpu", "interleaved")


@dataclass
class Rates:
    """What the planner knows about this machine."""

    h2d_bytes_per_s: float
    """Host-to-device copy bandwidth (pinned memory)."""
    d2h_bytes_per_s: float
    """Device-to-host copy bandwidth."""
    cpu_params_per_s: float
    """Parameters the host threads update per second, all together."""
    device_params_per_s: float
    """Parameters the device updates per second."""


@dataclass(frozen=True)
class SubgroupCost:
    """One subgroup as the planner sees it."""

    numel: int
    """Parameters it updates."""
    state_bytes: int
    """fp32 masters and optimizer state: copied to the device and back when it steps there."""
    param_bytes: int
    """The weights: copied to the device after it steps on the host."""


def predict_step_time(costs: list[SubgroupCost], on_device: list[bool], rates: Rates) -> float:
    """Seconds of one optimizer step: the busiest of host threads, device, and each link direction.

    Everything overlaps (prefetch, device updates, host updates, copies back), so the step lasts as
    long as its bottleneck resource needs.
    """
    h2d = sum(c.state_bytes if d else c.param_bytes for c, d in zip(costs, on_device)) / rates.h2d_bytes_per_s
    d2h = sum(c.state_bytes for c, d in zip(costs, on_device) if d) / rates.d2h_bytes_per_s
    host = sum(c.numel for c, d in zip(costs, on_device) if not d) / rates.cpu_params_per_s
    device = sum(c.numel for c, d in zip(costs, on_device) if d) / rates.device_params_per_s
    return max(h2d, d2h, host, device)


def _spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order: every prefix is spread evenly over the range (0, n/2, n/4, 3n/4, ...)."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


def plan_placement(costs: list[SubgroupCost], rates: Rates) -> list[bool]:
    """Which subgroups step on the device (True) so that ``predict_step_time`` is smallest.

    Subgroups move to the device cheapest transfer per parameter first, ties spread evenly (every
    g-th); the best number of them is chosen. For subgroups of equal size this is optimal: for a given
    count the host and device times are fixed and the link carries least with the cheapest ones.
    """
    n = len(costs)
    spread = {index: rank for rank, index in enumerate(_spread_order(n))}
    order = sorted(range(n), key=lambda i: ((costs[i].state_bytes - costs[i].param_bytes) / max(costs[i].numel, 1),
                                            spread[i]))
    on_device = [False] * n
    best_count, best_time = 0, predict_step_time(costs, on_device, rates)
    for count, index in enumerate(order, start=1):
        on_device[index] = True
        predicted = predict_step_time(costs, on_device, rates)
        if predicted < best_time:
            best_count, best_time = count, predicted
    chosen = set(order[:best_count])
    return [i in chosen for i in range(n)]


def measure_bandwidth(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> tuple[float, float]:
    """(host-to-device, device-to-host) bytes per second of a pinned buffer; a memory copy without CUDA."""
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for src, dst in ((host, target), (target, host)):
        best = math.inf
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        rates.append(nbytes / max(best, 1e-9))
    return rates[0], rates[1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _side_stream(stream: Any) -> Any:
    return nullcontext() if stream is None else torch.cuda.stream(stream)


class _Subgroup:
    """Parameters stepped together by one inner optimizer over their host fp32 masters."""

    def __init__(self, members: list[tuple[int, torch.Tensor]], pin: bool):
        self.group_index = [index for index, _ in members]  # wrapper param group of each parameter
        self.params = [p for _, p in members]
        self.numel = sum(p.numel() for p in self.params)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        if pin:
            self.masters = [m.pin_memory() for m in self.masters]
        self.host_grads = [torch.empty_like(m, pin_memory=pin) for m in self.masters]
        self.copied: dict[int, Any] = {}  # position -> event of its gradient's copy made in backward (None: done)
        self.loaded_master = [False] * len(self.params)  # masters restored from a checkpoint, not the weights
        self.optimizer: Optimizer | None = None
        self.inner_group_of: list[int] = []  # inner param group of each parameter

    def state_of(self, position: int) -> dict[str, Any]:
        return self.optimizer.state[self.masters[position]]


class OffloadOptimizer(Optimizer):
    """Steps ``optimizer_class`` on host fp32 masters in subgroups, on the host or the device.

    Args:
        params: parameters or param groups, on the device that trains them.
        optimizer_class: the optimizer each subgroup gets; ``optimizer_kwargs`` go to it.
        mode: ``cpu`` (every update on the host) or ``interleaved`` (placement planned per step).
        subgroup_numel: parameters per subgroup, about (whole tensors).
        cpu_threads: host threads updating subgroups at once; 0 takes ``min(4, torch.get_num_threads())``.
        rates: planner rates to use (tests, or a machine measured before); None measures this one.
        adapt: refine the rates from every step's timings and plan again.

    The loop calls ``begin_micro_step(is_last)`` before each backward, ``clip_grad_norm_`` instead of
    torch's, ``step()`` and ``zero_grad()``; ``placement`` (True: device) and ``predicted_step_s`` show
    the plan of the next step.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], optimizer_class: type[Optimizer],
                 *, mode: str = "interleaved", subgroup_numel: int = 100_000_000, cpu_threads: int = 0,
                 rates: Rates | None = None, adapt: bool = True, **optimizer_kwargs: Any):
        if mode not in OFFLOAD_MODES[1:]:
            raise UserError(f"optim.offload={mode!r}: the offload wrapper takes cpu or interleaved "
                            f"(none means no wrapper)")
        if not (isinstance(subgroup_numel, int) and subgroup_numel >= 1):
            raise UserError(f"optim.offload_subgroup_size must be a positive integer, got {subgroup_numel!r}")
        if not (isinstance(cpu_threads, int) and cpu_threads >= 0):
            raise UserError(f"optim.offload_cpu_threads must be an integer >= 0, got {cpu_threads!r}")
        super().__init__(params, dict(optimizer_kwargs))
        params_all = [p for g in self.param_groups for p in g["params"]]
        if not params_all:
            raise ValueError("OffloadOptimizer got no parameters")
        self.device = params_all[0].device
        if any(p.device != self.device for p in params_all):
            raise ValueError("OffloadOptimizer needs every parameter on one device")
        self.mode = mode
        self.adapt = adapt
        self._cuda = self.device.type == "cuda"
        self._subgroups = self._build_subgroups(optimizer_class, optimizer_kwargs, subgroup_numel)
        self._position = {p: (k, i) for k, s in enumerate(self._subgroups) for i, p in enumerate(s.params)}
        self._pool = ThreadPoolExecutor(max_workers=cpu_threads or min(4, torch.get_num_threads()),
                                        thread_name_prefix="offload")
        self._h2d = torch.cuda.Stream(self.device) if self._cuda else None
        self._d2h = torch.cuda.Stream(self.device) if self._cuda else None
        self._pending_copies: list[Any] = []  # events of device-to-host state copies in flight
        self._pending_timings: list[tuple[int, Any]] = []  # device steps not timed yet
        self._is_last_micro_step = True
        self._copy_in_backward = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self._clip_coef: torch.Tensor | None = None
        self._masters_stale = False
        self._hooks: list[RemovableHandle] = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                                              for p in params_all if p.requires_grad]
        self.rates = rates if rates is not None else self._probe_rates()
        self.placement: list[bool] = []
        self.predicted_step_s = math.nan
        self._plan()

    def _build_subgroups(self, optimizer_class: type[Optimizer], optimizer_kwargs: dict[str, Any],
                         subgroup_numel: int) -> list[_Subgroup]:
        members, size, subgroups = [], 0, []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                members.append((index, p))
                size += p.numel()
                if size >= subgroup_numel:
                    subgroups.append(_Subgroup(members, pin=self.device.type == "cuda"))
                    members, size = [], 0
        if members:
            subgroups.append(_Subgroup(members, pin=self.device.type == "cuda"))
        for s in subgroups:
            inner_groups: list[dict[str, Any]] = []
            last = None
            for index, master in zip(s.group_index, s.masters):
                if index != last:
                    options = {k: v for k, v in self.param_groups[index].items() if k != "params"}
                    inner_groups.append({**options, "params": []})
                    last = index
                inner_groups[-1]["params"].append(master)
                s.inner_group_of.append(len(inner_groups) - 1)
            s.optimizer = optimizer_class(inner_groups, **optimizer_kwargs)
            # The wrapper's groups carry every option the inner optimizer resolved (its defaults included),
            # so schedulers and state_dict() see them as on the unwrapped optimizer.
            for inner, index in zip(s.optimizer.param_groups, dict.fromkeys(s.group_index)):
                for key, value in inner.items():
                    if key != "params":
                        self.param_groups[index].setdefault(key, value)
            for p, master in zip(s.params, s.masters):
                self.state[p] = s.optimizer.state[master]  # the same dict: inner steps fill it in place
        return subgroups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_subgroups"):
            raise RuntimeError("OffloadOptimizer cannot take parameter groups after construction")
        super().add_param_group(param_group)

    # --- the loop's side ------------------------------------------------------------------------

    def begin_micro_step(self, is_last: bool) -> None:
        """Declare whether the coming backward is the last of the accumulation window."""
        self._is_last_micro_step = is_last

    def attach_ddp(self, module: torch.nn.Module) -> None:
        """Under DDP the reduced gradients land at the end of backward: copy them to the host at ``step()``."""
        self._copy_in_backward = False

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not (self._copy_in_backward and self._is_last_micro_step):
            return
        k, i = self._position[p]
        if self.placement[k]:
            return  # a device subgroup reads the gradient where it is
        s = self._subgroups[k]
        with torch.no_grad():
            if not self._cuda:
                s.host_grads[i].copy_(p.grad)
                s.copied[i] = None
                return
            ready = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self._d2h):
                self._d2h.wait_event(ready)
                s.host_grads[i].copy_(p.grad, non_blocking=True)
                p.grad.record_stream(self._d2h)
                s.copied[i] = self._d2h.record_event()

    @torch.no_grad()
    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_``; gradients already copied to the host get the same coefficient."""
        params = [p for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        self._clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).cpu()
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clip_coef = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Update every subgroup where ``placement`` says, then plan the next step."""
        if closure is not None:
            raise RuntimeError("OffloadOptimizer does not take a closure")
        self._finish_copies()
        if self._masters_stale:
            for s in self._subgroups:
                for p, master, loaded in zip(s.params, s.masters, s.loaded_master):
                    if not loaded:
                        master.copy_(p.detach())
            self._masters_stale = False
        for s in self._subgroups:
            for position, index in enumerate(s.group_index):
                inner = s.optimizer.param_groups[s.inner_group_of[position]]
                inner.update((k, v) for k, v in self.param_groups[index].items() if k != "params")
        host = [s for s, on_device in zip(self._subgroups, self.placement) if not on_device]
        device = [s for s, on_device in zip(self._subgroups, self.placement) if on_device]
        start = time.perf_counter()
        futures: list[Future] = [self._pool.submit(self._host_step, s) for s in host]
        timings = self._device_steps(device)
        uploads = [f.result() for f in futures]
        host_seconds = time.perf_counter() - start
        if self._cuda:
            for event in uploads:
                torch.cuda.current_stream(self.device).wait_event(event)
        self._clip_coef = None
        if self.adapt:
            self._learn(host, host_seconds, timings)
        self._plan()

    # --- host updates ---------------------------------------------------------------------------

    def _host_step(self, s: _Subgroup) -> Any:
        """On a pool thread: gradients in, the inner step on the masters, the weights out to the device."""
        device = torch.cuda.device(self.device) if self._cuda else nullcontext()
        with torch.no_grad(), device:
            for i, (p, master, grad) in enumerate(zip(s.params, s.masters, s.host_grads)):
                copied = i in s.copied
                event = s.copied.pop(i, None)
                if p.grad is None:
                    master.grad = None
                    continue
                if event is not None:
                    event.synchronize()
                if copied:
                    if self._clip_coef is not None:  # copied before clipping
                        grad.mul_(self._clip_coef)
                else:  # the gradient bypassed the hook (DDP, a first step, or set by hand)
                    grad.copy_(p.grad)
                master.grad = grad
            s.optimizer.step()
            with _side_stream(self._h2d):
                for p, master in zip(s.params, s.masters):
                    p.copy_(master, non_blocking=self._cuda)
                    master.grad = None
                return self._h2d.record_event() if self._cuda else None

    # --- device updates -------------------------------------------------------------------------

    def _device_steps(self, subgroups: list[_Subgroup]) -> list[tuple[int, Any]]:
        """Step each subgroup on the device while the next one's state is being prefetched."""
        timings = []
        staged = self._prefetch(subgroups[0]) if subgroups else None
        for index, s in enumerate(subgroups):
            current = staged
            staged = self._prefetch(subgroups[index + 1]) if index + 1 < len(subgroups) else None
            timings.append((s.numel, self._device_step(s, current)))
        return timings

    def _moves_scalars(self, s: _Subgroup, position: int) -> bool:
        # torch.optim keeps "step" on the parameter's device only for fused or capturable updates.
        group = s.optimizer.param_groups[s.inner_group_of[position]]
        return bool(group.get("fused") or group.get("capturable"))

    def _prefetch(self, s: _Subgroup) -> dict[str, Any]:
        """Device copies of the subgroup's masters and state tensors, issued on the side stream."""
        if self._cuda:  # state a host step created is pageable: pin it once, for asynchronous copies
            for i in range(len(s.masters)):
                state = s.state_of(i)
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.ndim > 0 and not value.is_pinned():
                        state[key] = value.pin_memory()
        with _side_stream(self._h2d):
            masters = [m.to(self.device, copy=True, non_blocking=self._cuda) for m in s.masters]
            states = [{k: v.to(self.device, copy=True, non_blocking=self._cuda) for k, v in s.state_of(i).items()
                       if isinstance(v, torch.Tensor) and (v.ndim > 0 or self._moves_scalars(s, i))}
                      for i in range(len(s.masters))]
            ready = self._h2d.record_event() if self._cuda else None
        return {"masters": masters, "states": states, "ready": ready}

    def _device_step(self, s: _Subgroup, staged: dict[str, Any]) -> Any:
        """Swap the device copies into the inner optimizer, step, then copy weights and state back."""
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged["ready"])
            for t in staged["masters"] + [v for st in staged["states"] for v in st.values()]:
                t.record_stream(compute)
        host_masters = [m.data for m in s.masters]
        host_states, before = [], []
        for i, (master, dev_master, dev_state) in enumerate(zip(s.masters, staged["masters"], staged["states"])):
            state = s.state_of(i)
            before.append(set(state))
            host_states.append({k: state[k] for k in dev_state})
            state.update(dev_state)
            master.data = dev_master
        for master, p in zip(s.masters, s.params):
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
        timer = self._timer()
        s.optimizer.step()
        elapsed = timer()
        for master, p in zip(s.masters, s.params):
            p.copy_(master)
            master.grad = None
        done = torch.cuda.current_stream(self.device).record_event() if self._cuda else None
        with _side_stream(self._d2h):
            if self._cuda:
                self._d2h.wait_event(done)
            for i, (master, host) in enumerate(zip(s.masters, host_masters)):
                dev_master = master.data
                host.copy_(dev_master, non_blocking=self._cuda)
                master.data = host
                state, host_state = s.state_of(i), host_states[i]
                for key, value in list(state.items()):
                    moved = key in host_state or (key not in before[i] and isinstance(value, torch.Tensor)
                                                  and (value.ndim > 0 or self._moves_scalars(s, i)))
                    if not moved:
                        continue
                    buffer = host_state.get(key)
                    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                        buffer = torch.empty_like(value, device="cpu", pin_memory=self._cuda)
                    buffer.copy_(value, non_blocking=self._cuda)
                    if self._cuda:
                        value.record_stream(self._d2h)
                    state[key] = buffer
                if self._cuda:
                    dev_master.record_stream(self._d2h)
            if self._cuda:
                self._pending_copies.append(self._d2h.record_event())
        return elapsed

    def _timer(self) -> Callable[[], Any]:
        """Start timing device work; the returned function gives seconds, or CUDA events to read later."""
        if not self._cuda:
            start = time.perf_counter()
            return lambda: time.perf_counter() - start
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(torch.cuda.current_stream(self.device))

        def stop() -> tuple[Any, Any]:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            return begin, end

        return stop

    def _finish_copies(self) -> None:
        for event in self._pending_copies:
            event.synchronize()
        self._pending_copies.clear()

    # --- planning -------------------------------------------------------------------------------

    def _probe_rates(self) -> Rates:
        """The link's bandwidth, measured; update throughputs are measured by the first step."""
        probe = int(min(64 << 20, max(1 << 20, 4 * max(s.numel for s in self._subgroups))))
        h2d, d2h = measure_bandwidth(self.device, probe)
        return Rates(h2d, d2h, cpu_params_per_s=math.nan, device_params_per_s=math.nan)

    def _state_bytes(self, s: _Subgroup) -> int:
        """Masters plus state tensors; before the first step an Adam-like guess (two fp32 moments)."""
        masters = sum(m.numel() * 4 for m in s.masters)
        states = [s.state_of(i) for i in range(len(s.masters)) if s.masters[i] in s.optimizer.state]
        if not any(states):
            return 3 * masters
        return masters + sum(v.numel() * v.element_size() for st in states for v in st.values()
                             if isinstance(v, torch.Tensor) and v.ndim > 0)

    def _plan(self) -> None:
        costs = [SubgroupCost(s.numel, self._state_bytes(s), s.param_bytes) for s in self._subgroups]
        if self.mode == "cpu":
            self.placement = [False] * len(costs)
        elif math.isnan(self.rates.device_params_per_s):
            # Not timed yet: the first subgroup steps on the device and the others on the host, which
            # measures both throughputs on the real update.
            self.placement = [i == 0 for i in range(len(costs))]
        elif math.isnan(self.rates.cpu_params_per_s):
            self.placement = [False] * len(costs)
        else:
            self.placement = plan_placement(costs, self.rates)
        self.costs = costs
        self.predicted_step_s = predict_step_time(costs, self.placement, self.rates)

    def _learn(self, host: list[_Subgroup], host_seconds: float, timings: list[tuple[int, Any]]) -> None:
        """Moving averages of the update throughputs (the first measurement replaces the unknown)."""

        def blend(old: float, new: float) -> float:
            return new if math.isnan(old) else 0.5 * old + 0.5 * new

        if host:
            self.rates.cpu_params_per_s = blend(self.rates.cpu_params_per_s,
                                                sum(s.numel for s in host) / max(host_seconds, 1e-9))
        # CUDA timings are read one step later, when their events are long done (no wait here).
        ready, self._pending_timings = (timings, []) if not self._cuda else (self._pending_timings, timings)
        if ready:
            seconds = sum(t if isinstance(t, float) else t[0].elapsed_time(t[1]) / 1e3 for _, t in ready)
            self.rates.device_params_per_s = blend(self.rates.device_params_per_s,
                                                   sum(n for n, _ in ready) / max(seconds, 1e-9))

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The layout of one optimizer over all the parameters, as the unwrapped optimizer would save it."""
        self._finish_copies()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state: dict[int, Any] = {}
        for s in self._subgroups:
            inner = s.optimizer.state_dict()["state"]  # keyed by position within the subgroup
            for position, (p, master) in enumerate(zip(s.params, s.masters)):
                if position in inner:
                    entry = dict(inner[position])
                    if p.dtype != torch.float32:  # the master holds precision the weights lack
                        entry["offload_master"] = master
                    state[index[p]] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this wrapper's state dict, or the unwrapped optimizer's over the same parameters."""
        self._finish_copies()
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise UserError("optimizer state does not match the model: different parameter groups or sizes")
        saved_id = {}
        for group, saved in zip(self.param_groups, saved_groups):
            group.update((k, v) for k, v in saved.items() if k != "params")
            saved_id.update(zip(group["params"], saved["params"]))
        for s in self._subgroups:
            entries, masters = {}, {}
            for position, p in enumerate(s.params):
                entry = dict(saved_state.get(saved_id[p], {}))
                if "offload_master" in entry:
                    masters[position] = entry.pop("offload_master")
                if entry:
                    entries[position] = entry
            groups, first = [], 0
            for inner_index, inner in enumerate(s.optimizer.param_groups):
                wrapper = self.param_groups[s.group_index[s.inner_group_of.index(inner_index)]]
                options = {k: v for k, v in wrapper.items() if k != "params"}
                groups.append({**options, "params": list(range(first, first + len(inner["params"])))})
                first += len(inner["params"])
            s.optimizer.load_state_dict({"state": entries, "param_groups": groups})
            for position, (p, master) in enumerate(zip(s.params, s.masters)):
                self.state[p] = s.optimizer.state[master]
                if position in masters:
                    master.copy_(masters[position])
                s.loaded_master[position] = position in masters
        # The other masters equal their fp32 weights: copied from the restored model at the next step.
        self._masters_stale = True

    def close(self) -> None:
        """Stop the host threads and detach from the parameters."""
        self._finish_copies()
        self._pool.shutdown(wait=True)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
