"""The memory plan of a training config: ``leantrain estimate CONFIG [key=value ...]``.

Nothing here is a formula of the model's shapes. The trainer's own model, loss and optimizer are
built from the config on fake tensors (``FakeTensorMode``: tensors with a shape, a dtype and a
device but no data), and two optimizer steps of the training loop run on them: forward under the
configured autocast, the loss, backward with the configured activation checkpointing, clipping,
the optimizer step (inside backward with per-layer updates) and ``zero_grad``. A dispatch mode
(``_StepTrace``) sees every tensor the step creates and, through weak references to their
storages, every one it frees, so the peak of live bytes is the real step's, and the estimate
follows the code as it changes. Each storage counts in one component:

  weights          parameters and buffers
  gradients        storages that became a parameter's ``.grad``
  optimizer_state  storages an optimizer keeps in its ``state`` (moments, GaLore bases, ...)
  activations      created by the model's forward (kept for backward), or recomputed for it
                   under activation checkpointing
  weight_casts     copies of parameters made in the forward (autocast's bf16 weights)
  logits_and_loss  created by the loss in forward or in its backward (logits, their chunks,
                   cut cross-entropy's gradient buffers until they become gradients)
  moe              created inside mixture-of-experts layers (dispatched rows, expert activations)
  temporaries      the rest: activation gradients in backward, optimizer-step scratch, and the
                   copies the CPU makes of mismatched-dtype inputs of an op (``_cpu_cast_bytes``)

Where the step branches on data, the estimate takes the healthy, balanced case: targets are all
valid, gradients finite, checks pass, Cholesky solves succeed and MoE experts receive equal shares
of the tokens; random index draws (``randperm``: FRUGAL's and LISA's block choices) are drawn for
real from the run's own seeds (see ``_StepTrace``).

Composed from the simulated one-process step rather than simulated, since no process group or
host copy is made here (``_compose``): the per-rank split of sharded backends (``--world-size``;
fsdp2 shards weights, gradients and state and gathers blocks, DeepSpeed ZeRO by stage), DDP's
gradient buckets, optimizer offload (state and fp32 masters in host memory) and the lazy
checkpointer's host slots. Compiled blocks (``model.compile``) are estimated eagerly. The fake
tensors are CPU tensors whatever the run's device, so kernels chosen by device take their CPU path
(cut cross-entropy's torch path rather than its Triton kernel, MoE's per-expert loop rather than
``grouped_mm``); for CUDA runs sizes are rounded as CUDA's allocator rounds them.

``--measure`` (``measure``) runs the same two steps for real on the run's device and reports the
measured peak: the weights' bytes plus the most allocated beyond them during the steps, on CUDA by
``torch.cuda.max_memory_allocated``, on the CPU by summing the allocator events that
``torch.profiler`` records (``profile_memory=True``). That counts exactly the tensors torch
allocates, including the scratch kernels allocate internally, independently of the fake-tensor
simulation and of the process's other memory (Python objects, libraries, allocator caching), which
resident-set figures would mix in.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UserError
from ..moe.balance import BalanceCollector
from ..moe.layer import MoELayer
from ..nn.loss import LanguageModelLoss
from ..optim.build import build_optimizer
from ..parallel.world import World, pick_device
from ..parallel.wrap import DataParallelEngine
from .config import Config, accumulation_steps, load_config

SCHEMA_VERSION = 1
COMPONENTS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "weight_casts",
              "logits_and_loss", "moe", "temporaries", "parallel_buffers", "checkpoint_buffers")
"""Every component, in the order printed, with the same keys for device and host memory.

``master_weights`` (fp32 copies kept by offload and ZeRO), ``parallel_buffers`` (DDP buckets,
FSDP2's gathered blocks) and ``checkpoint_buffers`` (the lazy checkpointer's host slots) are composed.
"""
COMPARED_OPTIMIZERS: dict[str, list[str]] = {
    "adamw": ["optim.name=adamw", "optim.layerwise=false"],
    "galore": ["optim.name=galore", "optim.layerwise=false"],
    "natural_galore": ["optim.name=natural_galore", "optim.layerwise=false"],
    "frugal": ["optim.name=frugal", "optim.layerwise=false"],
    "lisa": ["optim.name=lisa", "optim.layerwise=false", "optim.offload=none"],
    "galore+layerwise": ["optim.name=galore", "optim.layerwise=true", "optim.offload=none", "trainer.grad_clip=0"],
}
"""``--compare-optimizers``: the overrides of each row, applied on top of the config's."""
SIMULATED_STEPS = 2
"""The first step creates the optimizer state; the second is the steady state, with the state present throughout."""
CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of this."""
_MIB = 1 << 20
_aten = torch.ops.aten


# ---- the simulated step ------------------------------------------------------------------------------------


class _Block:
    """One tracked storage: its size and the component it counts in."""

    __slots__ = ("nbytes", "component")

    def __init__(self, nbytes: int, component: str):
        self.nbytes = nbytes
        self.component = component


# Checks whose outcome decides a branch of the step, and their value in the healthy case: every target
# valid and in range, every gradient finite, no Cholesky failure, the HF adapter's logits check passing.
_ASSUMED = {_aten.all.default: True, _aten.any.default: False, _aten.min.default: 0, _aten.max.default: 0,
            _aten.allclose.default: True, _aten.equal.default: True}
_BOOL_CHECKS = (_aten.allclose.default, _aten.equal.default)  # these return a Python bool, not a tensor


class _StepTrace(TorchDispatchMode):
    """Live bytes of every storage the step creates, by component, and their peak.

    Runs above ``FakeTensorMode``. Components come from the region the step is in (``begin``,
    ``push``/``pop`` from module and optimizer hooks) and change when a storage becomes a gradient
    or optimizer state (``mark``). The trace also supplies the values the step reads from tensors,
    which fake tensors lack: small integer tensors whose values are known carry a real "shadow"
    (``randperm`` is drawn for real; ``bincount`` counts as if experts were balanced) that ops on
    known inputs keep up to date, and the checks in ``_ASSUMED`` take the healthy case's value. Any
    other read of a value fails in the fake tensor mode, naming the op.
    """

    def __init__(self, target: torch.device):
        super().__init__()
        self.cuda = target.type == "cuda"
        self.live = {c: 0 for c in COMPONENTS}
        self.largest = dict(self.live)
        self.total = 0
        self.peak = 0
        self.peak_blocks: list[_Block] = []
        self.phase = "build"
        self.peak_phase = ""
        self.regions = ["temporaries"]
        self._blocks: dict[int, tuple[_Block, weakref.ref]] = {}
        self._shadow = WeakIdKeyDictionary()
        self._params: set[int] = set()

    # -- regions and roles --

    def begin(self, phase: str, region: str) -> None:
        self.phase, self.regions = phase, [region]

    def push(self, region: str) -> None:
        self.regions.append(region)

    def pop(self) -> None:
        if len(self.regions) > 1:
            self.regions.pop()

    def switch(self, region: str) -> None:
        self.regions[-1] = region

    def watch_params(self, params: list[torch.Tensor]) -> None:
        """Copies of these made in the forward are weight casts."""
        self._params = {id(p) for p in params}

    def mark(self, t: torch.Tensor | None, component: str) -> None:
        """``t``'s storage counts in ``component`` from now on (a buffer that became a gradient, or state)."""
        if t is None:
            return
        self.track(t, component)
        entry = self._blocks.get(t.untyped_storage()._cdata)
        if entry is not None and entry[0].component not in (component, "weights"):
            block = entry[0]
            self._add(block.component, -block.nbytes)
            block.component = component
            self._add(component, block.nbytes)

    # -- bookkeeping --

    def track(self, t: torch.Tensor, component: str) -> None:
        """Count ``t``'s storage in ``component`` if it is new."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        if key in self._blocks or nbytes == 0:
            return
        if self.cuda:
            nbytes = -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK
        block = _Block(nbytes, component)
        self._blocks[key] = (block, weakref.ref(storage, lambda _, k=key: self._free(k)))
        self._add(component, nbytes)
        if self.total > self.peak:
            self._new_peak(self.total)

    def _scratch(self, nbytes: int) -> None:
        """A temporary that lives only inside one op."""
        if nbytes and self.total + nbytes > self.peak:
            self._new_peak(self.total + nbytes, _Block(nbytes, "temporaries"))

    def _new_peak(self, total: int, *extra: _Block) -> None:
        self.peak, self.peak_phase = total, self.phase
        self.peak_blocks = [b for b, _ in self._blocks.values()] + list(extra)

    def _add(self, component: str, nbytes: int) -> None:
        self.live[component] += nbytes
        self.total += nbytes
        self.largest[component] = max(self.largest[component], self.live[component])

    def _free(self, key: int) -> None:
        entry = self._blocks.pop(key, None)
        if entry is not None:
            self._add(entry[0].component, -entry[0].nbytes)

    def at_peak(self) -> dict[str, int]:
        """The live bytes at the peak, by the component each storage ended up in."""
        out = {c: 0 for c in COMPONENTS}
        for block in self.peak_blocks:
            out[block.component] += block.nbytes
        return out

    # -- dispatch --

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default and args[0] in self._shadow:
            with _disable_current_modes():
                return self._shadow[args[0]].item()
        if func in _BOOL_CHECKS:
            return _ASSUMED[func]
        if func is _aten.bincount.default:
            out = self._bincount(*args, **kwargs)
        elif func is _aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
            # torch's shape function for grouped_mm takes bf16 only (CUDA's rule); the CPU kernel takes
            # any float dtype (HF MoE experts on CPU). Same shapes, so infer them from bf16 stand-ins.
            stand_ins = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args]
            out = func(*stand_ins, **kwargs).to(args[0].dtype)
        else:
            out = func(*args, **kwargs)
            self._follow_values(func, args, kwargs, out)
        if not self.cuda and torch.Tag.pointwise in func.tags:
            self._scratch(_cpu_cast_bytes(args, kwargs, out))
        region = self.regions[-1]
        if region == "temporaries" and torch.is_grad_enabled() and _in_backward():
            region = "activations"  # activation checkpointing reruns a block's forward
        if func is _aten._to_copy.default and region == "activations" and id(args[0]) in self._params:
            region = "weight_casts"
        tree_map_only(torch.Tensor, lambda t: self.track(t, region), out)
        return out

    def _follow_values(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Shadow ``out`` when its value is known: drawn for real, assumed, or computed from known inputs."""
        if func in (_aten.randperm.default, _aten.randperm.generator):
            with _disable_current_modes():
                self._shadow[out] = func(*args, **{**kwargs, "device": "cpu"})
            return
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        known = any(t in self._shadow for t in tensors) and all(
            t in self._shadow or getattr(t, "constant", None) is not None for t in tensors)
        if not known:
            if func in _ASSUMED and isinstance(out, torch.Tensor) and out.ndim == 0:
                with _disable_current_modes():
                    self._shadow[out] = torch.tensor(_ASSUMED[func], dtype=out.dtype)
            return
        real_args, real_kwargs = tree_map_only(
            torch.Tensor, lambda t: self._shadow[t] if t in self._shadow else t.constant, (args, kwargs))
        with _disable_current_modes():
            result = func(*real_args, **real_kwargs)
        for fake, value in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
            if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor):
                self._shadow[fake] = value

    def _bincount(self, x: torch.Tensor, weights: torch.Tensor | None = None, minlength: int = 0) -> torch.Tensor:
        """Counts of a known input; otherwise (MoE routing) ``x.numel()`` spread evenly over ``minlength`` bins."""
        with _disable_current_modes():
            if x in self._shadow and weights is None:
                value = torch.bincount(self._shadow[x], minlength=minlength)
            else:
                bins = max(minlength, 1)
                value = torch.full((bins,), x.numel() // bins, dtype=torch.int64)
                value[: x.numel() % bins] += 1
        out = torch.empty(value.shape, dtype=value.dtype, device=x.device)
        self._shadow[out] = value
        return out


def _cpu_cast_bytes(args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes of the copies a CPU pointwise op makes of inputs whose dtype is not the op's own.

    On the CPU, TensorIterator converts such inputs into temporaries before its loop (CUDA kernels
    convert as they load): a bf16 matmul result added into an fp32 accumulator costs an fp32 copy.
    """
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not outs or outs[0].device.type != "cpu":
        return 0
    dtype, itemsize = outs[0].dtype, outs[0].element_size()
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return sum(t.numel() * itemsize for t in inputs if t.ndim > 0 and t.dtype != dtype)


@dataclass
class _Trace:
    """What one simulated process holding the whole model found."""

    at_peak: dict[str, int]
    largest: dict[str, int]
    peak_phase: str
    parameters: int
    weights_numel: int
    weight_bytes: int
    state_numel: int
    state_bytes: int
    block_bytes: list[int]
    root_bytes: int
    vocab_size: int


def _simulate(cfg: Config, vocab_size: int, accum: int, target: torch.device) -> _Trace:
    """Build the run's pieces on fake tensors and trace ``SIMULATED_STEPS`` steps of its loop.

    The fake tensors are CPU tensors whatever the run's device, so the estimate runs on any machine
    (a build without CUDA cannot fake CUDA tensors); for a CUDA run allocations are rounded as its
    allocator rounds them, and the CPU's mixed-dtype copies are left out.
    """
    from ..parallel.fsdp import transformer_blocks
    from .train import build_model, materialize_model

    # Compiled blocks run eagerly; offload is composed from the plain optimizer's state (module docstring).
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile=False),
                                optim=dataclasses.replace(cfg.optim, offload="none"))
    trace = _StepTrace(target)
    cpu = torch.device("cpu")
    mode = FakeTensorMode()
    with warnings.catch_warnings(), cpu, _hf_config_only(plain) as plain:
        # Full backward hooks warn that the model's input (token ids) needs no gradient: true, and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if plain.model.hf:  # faked, and traced: the adapter checks its logits, which the trace answers
            with mode, trace:
                model = build_model(plain, vocab_size)
        else:  # on the meta device, for real: it holds nothing
            model = build_model(plain, vocab_size)

        def allocated() -> None:
            for t in [*model.parameters(), *model.buffers()]:
                trace.mark(t, "weights")
            trace.switch("temporaries")  # the initialisation's own draws

        with mode:
            trace.begin("build", "weights")
            with trace, _real_inputs_allowed(mode):  # to_empty's empty_like of the real meta tensors
                materialize_model(plain, model, cpu, allocated)
            with trace:
                loss_module = LanguageModelLoss(model, cfg.loss)
            _check_optimizer(cfg, model)
        with mode, trace:
            params = list(model.parameters())
            allocated()
            trace.watch_params(params)
            _watch(trace, model)
            trace.begin("optimizer construction", "temporaries")
            optimizer = build_optimizer(plain.optim, model, cfg.trainer.seed)
            if cfg.parallel.backend == "deepspeed":
                from ..parallel.deepspeed_engine import check_flat_optimizer

                check_flat_optimizer(optimizer)
            _skip_guard(optimizer)
            engine = DataParallelEngine(loss_module, model, optimizer, cfg.trainer.grad_clip)
            engine.skip_non_finite = False  # the healthy step: its norm is finite
            batch = torch.zeros(cfg.trainer.micro_batch_size, cfg.data.seq_len, dtype=torch.int64)
            with _optimizer_hooks(trace):
                run_steps(plain, engine, batch, batch, accum, trace)
            trace.begin("done", "temporaries")
        state = _state_tensors(optimizer)
        blocks = transformer_blocks(model)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        return _Trace(
            at_peak=trace.at_peak(), largest=dict(trace.largest), peak_phase=trace.peak_phase,
            parameters=model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in params),
            weights_numel=sum(p.numel() for p in params), weight_bytes=_nbytes(params),
            state_numel=sum(t.numel() for t in state if t.ndim > 0), state_bytes=_nbytes(state),
            block_bytes=[_nbytes(list(b.parameters())) for b in blocks],
            root_bytes=_nbytes([p for p in params if id(p) not in in_blocks]),
            vocab_size=model.head_weight.shape[0],
        )


@contextmanager
def _real_inputs_allowed(mode: FakeTensorMode) -> Iterator[None]:
    allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
    try:
        yield
    finally:
        mode.allow_non_fake_inputs = allowed


@contextmanager
def _hf_config_only(cfg: Config) -> Iterator[Config]:
    """``cfg`` with a ``model.hf`` directory that holds weights replaced by a copy of its config.json alone.

    Loading weights would allocate them for real (transformers fills them outside the fake mode),
    and their values change nothing about memory: the model built from the config has the same
    parameters, dtype and code.
    """
    if not cfg.model.hf:
        yield cfg
        return
    from ..nn.hf import has_weights

    directory = Path(cfg.model.hf).expanduser()
    if not (directory.is_dir() and has_weights(directory)):
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix="leantrain-estimate-") as tmp:
        shutil.copyfile(directory / "config.json", Path(tmp) / "config.json")
        yield dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf=tmp))


def _check_optimizer(cfg: Config, model: nn.Module) -> None:
    """Refuse what the run would refuse about its optimizer, though the simulation builds it without offload.

    With offload, the real optimizer is built once (its checks run) and closed.
    """
    if cfg.optim.offload != "none":
        optimizer = build_optimizer(cfg.optim, model, cfg.trainer.seed)
        try:
            if cfg.parallel.backend == "deepspeed":
                from ..parallel.deepspeed_engine import check_flat_optimizer

                check_flat_optimizer(optimizer)
        finally:
            if hasattr(optimizer, "close"):
                optimizer.close()


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _watch(trace: _StepTrace, model: nn.Module) -> None:
    """Hooks that tell the trace where the step is, and mark each gradient as soon as autograd accumulates it.

    Forward: the model's activations (MoE layers' own inside), then the loss. Backward: the loss's
    own, until the gradient reaches the model's output (its backward pre-hook); blocks that
    activation checkpointing reruns there are told apart by ``_StepTrace`` (grad mode on inside
    backward), since a rerun may stop early, before any forward hook after it would run.
    """
    model.register_forward_pre_hook(lambda *_: trace.push("activations"))
    model.register_forward_hook(lambda *_: trace.switch("logits_and_loss"))
    model.register_full_backward_pre_hook(lambda *_: trace.switch("temporaries"))
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_pre_hook(lambda *_: None if _in_backward() else trace.push("moe"))
            module.register_forward_hook(lambda *_: None if _in_backward() else trace.pop())
    # Registered before the optimizer's own hooks (per-layer updates free the gradient in theirs).
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: trace.mark(p.grad, "gradients"))


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextmanager
def _optimizer_hooks(trace: _StepTrace) -> Iterator[None]:
    """Every optimizer step (per-layer inner steps too) makes temporaries, and marks what its state holds."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trace.pop()
        for t in _state_tensors(optimizer):
            trace.mark(t, "optimizer_state")

    handles = [register_optimizer_step_pre_hook(lambda *_: trace.push("temporaries")),
               register_optimizer_step_post_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _skip_guard(optimizer: torch.optim.Optimizer) -> None:
    """GaLore's refresh guard asks whether each gradient is finite; the answer is yes, so skip the question."""
    if hasattr(optimizer, "skip_non_finite"):  # per-layer updates' divergence check: finite too
        optimizer.skip_non_finite = False
    for group in optimizer.param_groups:
        if "guard" in group:
            group["guard"] = False


# ---- the training steps, shared by the simulation and the measurement -----------------------------------------


def run_steps(cfg: Config, engine: DataParallelEngine, inputs: torch.Tensor, targets: torch.Tensor, accum: int,
              trace: _StepTrace | None = None) -> None:
    """``SIMULATED_STEPS`` optimizer steps of ``trainer/train.py``'s loop on one batch, without data or logging.

    ``accum`` is the run's micro-batches per step on each rank. Of such a window only the first and
    the last micro-batch run: the ones between hold what the first one does (gradients being
    accumulated, no optimizer step), so the peak is the same.
    """
    from .train import micro_batch, moe_config_of

    scale = 1.0 / (inputs.numel() * accum)
    moe = moe_config_of(cfg, engine.model)
    balance = BalanceCollector(moe, group=None) if moe.num_experts else None

    def begin(phase: str, region: str) -> None:
        if trace is not None:
            trace.begin(phase, region)

    for step in range(1, SIMULATED_STEPS + 1):
        for micro in ([accum] if accum == 1 else [1, accum]):
            where = f"step {step}" + (f", micro-batch {micro} of {accum}" if accum > 1 else "")
            begin(f"{where}, forward", "temporaries")
            micro_batch(cfg, engine, inputs, targets, balance, scale, accum, is_last=micro == accum,
                        before_backward=lambda: begin(f"{where}, backward", "logits_and_loss"))
        begin(f"step {step}, optimizer", "temporaries")
        engine.step()
        engine.zero_grad()
        if balance is not None:
            balance.reset()


# ---- the plan: the simulated figures, composed with sharding, offload and checkpoints ---------------------


@dataclass
class Estimate:
    """One rank's memory plan; ``to_json`` is the documented ``--json`` output."""

    run: dict[str, Any]
    device: dict[str, int]
    host: dict[str, int]
    largest: dict[str, int]
    peak_phase: str
    bf16_weights_and_state: dict[str, int]
    notes: list[str] = field(default_factory=list)
    measured: dict[str, Any] | None = None

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "run": self.run,
            "device": {"peak": self.device_peak, "peak_phase": self.peak_phase, "at_peak": self.device,
                       "largest": self.largest},
            "host": {"total": sum(self.host.values()), "components": self.host},
            "bf16_weights_and_state": self.bf16_weights_and_state,
            "measured": self.measured,
            "notes": self.notes,
        }


def vocab_size_of(cfg: Config) -> int:
    """The vocabulary the run's tokenizer will have, without tokenizing the corpus (0: the model's own).

    A given ``data.tokenizer``'s size, the shards' recorded size, or for stdlib and text corpora the
    byte-level BPE's nominal ``data.vocab_size``; ``model.vocab_size``, when set, wins in the model.
    """
    if cfg.model.hf:
        return 0
    if cfg.data.tokenizer:
        from .tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer, "data.tokenizer").get_vocab_size()
    if cfg.data.source == "shards":
        from .data import read_meta

        return int(read_meta(Path(cfg.data.path).expanduser(), "data.path")["vocab_size"])
    return cfg.data.vocab_size


def estimate(cfg: Config, world_size: int = 1) -> Estimate:
    """The memory plan of one rank of ``cfg`` run on ``world_size`` ranks."""
    if world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {world_size}")
    accum = accumulation_steps(cfg.trainer, world_size)
    device = run_device(cfg)
    trace = _simulate(cfg, vocab_size_of(cfg), accum, device)
    est = Estimate(
        run={"model": cfg.model.hf or cfg.model.preset, "parameters": trace.parameters,
             "vocab_size": trace.vocab_size, "optimizer": cfg.optim.name, "layerwise": cfg.optim.layerwise,
             "offload": cfg.optim.offload, "loss": cfg.loss.impl,
             "activation_checkpointing": cfg.model.activation_checkpointing, "dtype": cfg.trainer.dtype,
             "backend": cfg.parallel.backend, "zero_stage": _zero_stage(cfg), "world_size": world_size,
             "micro_batch_size": cfg.trainer.micro_batch_size, "seq_len": cfg.data.seq_len,
             "accumulation_steps": accum, "device": device.type},
        device=dict(trace.at_peak), host={c: 0 for c in COMPONENTS}, largest=dict(trace.largest),
        peak_phase=trace.peak_phase,
        bf16_weights_and_state={"weights": 2 * trace.weights_numel, "optimizer_state": 2 * trace.state_numel,
                                "total": 2 * (trace.weights_numel + trace.state_numel)},
    )
    _compose(est, cfg, trace, world_size)
    if device.type == "cuda" and cfg.loss.impl == "cce":
        est.notes.append("cce on CUDA: traced with the torch path; where the Triton kernel runs it holds no chunk of "
                         "logits and computes the gradients in backward")
    if cfg.model.compile:
        est.notes.append("model.compile: estimated eagerly; compiled blocks can keep fewer activations")
    if cfg.moe.num_experts:
        est.notes.append("moe: experts assumed to receive equal shares of the tokens")
    return est


def free_memory(device: torch.device) -> int:
    """Bytes still free for this process on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise UserError("trainer.memory_check: cannot read MemAvailable from /proc/meminfo; "
                    "set trainer.memory_check=false to run without the check")


def check_fits(cfg: Config, world_size: int, device: torch.device) -> "Estimate | None":
    """The plan of one rank of ``cfg``; a ``UserError`` holding its table when it exceeds ``device``'s free memory.

    None, with a warning, for a run the trace cannot follow (APOLLO through apollo-torch).

    On the CPU the plan's host components count as well, once for every rank on this host
    (``LOCAL_WORLD_SIZE``). The trace draws nothing from the global generators (FRUGAL's and LISA's
    choices come from the optimizers' own), and they are restored anyway, so the run is unchanged.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    with torch.random.fork_rng(devices=[]):
        try:
            est = estimate(cfg, world_size)
        except (DataDependentOutputException, DynamicOutputShapeException) as error:
            # Code the trace cannot follow (apollo-torch reads a random draw's value): say so, and run unchecked.
            warnings.warn(f"trainer.memory_check: the run's memory plan cannot be traced ({type(error).__name__}: "
                          f"{error}); running without the check")
            return None
    need = est.device_peak
    if device.type == "cpu":
        need = (need + sum(est.host.values())) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = free_memory(device)
    if need > free:
        raise UserError(f"the run's memory plan needs {format_bytes(need)} on {device.type} but {format_bytes(free)} "
                        "is free; shrink the run (trainer.micro_batch_size, model.activation_checkpointing, "
                        "model.param_dtype, optim.state_bits, ...) or set trainer.memory_check=false to try anyway\n"
                        + format_estimate(est))
    return est


def run_device(cfg: Config) -> torch.device:
    """The device the run trains on (``trainer.device``; auto is CUDA where there is one)."""
    requested = cfg.trainer.device
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def _zero_stage(cfg: Config) -> int:
    return _deepspeed_zero(cfg).get("stage", 2) if cfg.parallel.backend == "deepspeed" else 0


def _deepspeed_zero(cfg: Config) -> dict[str, Any]:
    from ..parallel.deepspeed_engine import load_deepspeed_config

    zero = load_deepspeed_config(cfg.parallel.deepspeed).get("zero_optimization") or {}
    return zero if isinstance(zero, dict) else {}


def _compose(est: Estimate, cfg: Config, trace: _Trace, n: int) -> None:
    """Turn the one-process figures into one rank's of ``n``: sharding, buckets, offload, checkpoint slots."""
    dev, host, largest, notes = est.device, est.host, est.largest, est.notes

    def shard(component: str) -> None:
        dev[component] = math.ceil(dev[component] / n)
        largest[component] = math.ceil(largest[component] / n)

    def to_host(component: str) -> None:
        host[component] += dev[component]
        dev[component] = largest[component] = 0

    backend = cfg.parallel.backend
    if backend == "ddp" and n > 1:
        dev["parallel_buffers"] = trace.weight_bytes
        notes.append("ddp: gradient buckets hold a second copy of every gradient (gradient_as_bucket_view is off)")
    elif backend == "fsdp2":
        for component in ("weights", "gradients", "optimizer_state"):
            shard(component)
        scale = 0.5 if cfg.parallel.param_dtype == "bf16" and cfg.model.param_dtype == "fp32" else 1.0
        biggest = max(trace.block_bytes, default=0)
        gathered = sum(trace.block_bytes) if not cfg.parallel.fsdp_reshard_after_forward else 2 * biggest
        dev["parallel_buffers"] = int((trace.root_bytes + gathered + biggest) * scale)
        if cfg.parallel.param_dtype == "bf16":
            dev["weight_casts"] = largest["weight_casts"] = 0
        notes.append("fsdp2: weights, gradients and optimizer state sharded over the ranks; parallel_buffers: the "
                     "gathered root, " + ("two gathered blocks" if cfg.parallel.fsdp_reshard_after_forward
                                          else "every block gathered") + " and one block's unsharded gradients")
        if cfg.parallel.fsdp_cpu_offload:
            for component in ("weights", "gradients", "optimizer_state"):
                to_host(component)
    elif backend == "deepspeed":
        zero = _deepspeed_zero(cfg)
        stage = zero.get("stage", 2)
        shard("optimizer_state")
        if stage >= 2:
            shard("gradients")
        if stage == 3:
            shard("weights")
            dev["parallel_buffers"] = 2 * max(trace.block_bytes, default=0)
        dev["master_weights"] = math.ceil(trace.weight_bytes / n)
        notes.append(f"deepspeed ZeRO-{stage}: optimizer state{', gradients' if stage >= 2 else ''}"
                     f"{' and weights' if stage == 3 else ''} sharded over the ranks, plus ZeRO's fp32 partition "
                     "of the weights (master_weights); its communication buckets are not counted")
        if (zero.get("offload_optimizer") or {}).get("device") == "cpu":
            to_host("optimizer_state")
            to_host("master_weights")
    if cfg.optim.offload != "none":
        state = dev["optimizer_state"]
        to_host("optimizer_state")
        host["master_weights"] += trace.weight_bytes
        host["gradients"] += trace.weight_bytes
        if cfg.optim.offload == "interleaved":
            share = min(1.0, cfg.optim.offload_subgroup_size / max(trace.weights_numel, 1))
            dev["parallel_buffers"] += math.ceil(2 * share * (state + trace.weight_bytes))
        notes.append(f"optim.offload={cfg.optim.offload}: optimizer state, fp32 master weights and gradient copies in "
                     "host memory" + (", two subgroups at a time prefetched to the device"
                                      if cfg.optim.offload == "interleaved" else ""))
    for component in ("master_weights", "parallel_buffers"):  # composed: present throughout the step
        largest[component] = max(largest[component], dev[component])
    if cfg.checkpoint.mode == "lazy":
        host["checkpoint_buffers"] = _checkpoint_slots_bytes(cfg, (trace.weight_bytes + trace.state_bytes) / n)
        notes.append("checkpoint.mode=lazy: host slots for the snapshots of this rank's share of the weights and "
                     "optimizer state (shared memory of the node's keeper)")


def _checkpoint_slots_bytes(cfg: Config, snapshot_bytes: float) -> int:
    """The lazy checkpointer's slots (``checkpoint/multilevel.py``): 5% headroom in whole MiB, 2 slots (3 with EC)."""
    capacity = -(-int(snapshot_bytes * 1.05) // _MIB) * _MIB
    if cfg.checkpoint.host_buffer_mb:
        return max(2, cfg.checkpoint.host_buffer_mb * _MIB // capacity) * capacity
    return capacity * (3 if cfg.checkpoint.ec.k else 2)


# ---- measurement ------------------------------------------------------------------------------------------


def measure(cfg: Config) -> dict[str, Any]:
    """Run ``SIMULATED_STEPS`` real steps of ``cfg`` in this process; the peak of the bytes allocated.

    The model is built from the config (initialised from ``trainer.seed``, or loaded for
    ``model.hf``) and trained on one batch of random tokens, so no data is read. The peak is that of
    the steps: the weights' bytes plus the most allocated beyond them from building the loss and
    optimizer to the last ``zero_grad`` (what loading weights from disk costs on the way is not a
    training step's). One process only: sharded figures cannot be measured here.
    """
    from ..parallel.world import close_world
    from ..parallel.wrap import build_engine
    from .train import build_model, materialize_model

    device = pick_device(cfg.trainer.device, 0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile=False))
    world = World(rank=0, local_rank=0, world_size=1, device=device)
    accum = accumulation_steps(cfg.trainer, 1)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, vocab_size_of(cfg))
    materialize_model(cfg, model, device)
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*model.parameters(),
                                                                                 *model.buffers()]}
    weights = sum(storages.values())

    def steps() -> None:
        loss_module = LanguageModelLoss(model, cfg.loss)
        engine = build_engine(loss_module, model, cfg.parallel, world,
                              lambda: build_optimizer(cfg.optim, model, cfg.trainer.seed),
                              grad_clip=cfg.trainer.grad_clip, micro_batch_size=cfg.trainer.micro_batch_size,
                              accumulation_steps=accum)
        vocab_size = model.head_weight.shape[0]
        inputs = torch.randint(vocab_size, (cfg.trainer.micro_batch_size, cfg.data.seq_len), device=device)
        targets = torch.randint(vocab_size, inputs.shape, device=device)
        try:
            run_steps(cfg, engine, inputs, targets, accum)
        finally:
            if hasattr(engine.optimizer, "close"):
                engine.optimizer.close()
            close_world()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        steps()
        torch.cuda.synchronize(device)
        return {"peak": weights + torch.cuda.max_memory_allocated(device) - before, "device": "cuda",
                "method": "torch.cuda.max_memory_allocated"}
    return {"peak": weights + _profiled_peak(steps), "device": "cpu", "method": "torch.profiler allocator events"}


def _profiled_peak(fn: Callable[[], None]) -> int:
    """The peak of the net bytes torch's CPU allocator handed out while ``fn`` ran (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---- the command ------------------------------------------------------------------------------------------


def compare_optimizers(config: str, overrides: list[str], world_size: int = 1,
                       measure_each: bool = False) -> dict[str, "Estimate | str"]:
    """One estimate per row of ``COMPARED_OPTIMIZERS``, each row's overrides after the user's.

    A row the run would refuse (GaLore under DeepSpeed, say) holds the refusal's message instead.
    """
    load_config(config, overrides)  # the user's own mistakes end the command, not a row
    out: dict[str, Estimate | str] = {}
    for name, row in COMPARED_OPTIMIZERS.items():
        try:
            cfg = load_config(config, [*overrides, *row])
            est = estimate(cfg, world_size)
            if measure_each:
                est.measured = measure(cfg)
            out[name] = est
        except UserError as e:
            out[name] = str(e)
    return out


def format_bytes(n: float) -> str:
    """Binary units: KiB, MiB, GiB (2^10, 2^20, 2^30 bytes)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_estimate(est: Estimate) -> str:
    """The human-readable plan: one line per component, device and host, and the measured peak if any."""
    r = est.run
    zero = f" ZeRO-{r['zero_stage']}" if r["zero_stage"] else ""
    lines = [f"leantrain estimate: {r['model']} ({r['parameters'] / 1e6:.1f}M parameters, vocab {r['vocab_size']:,}), "
             f"{_optimizer_label(r)}, {r['loss']} loss, {r['dtype']}"
             f"{', activation checkpointing' if r['activation_checkpointing'] else ''}, "
             f"{r['backend']}{zero} x {r['world_size']}, "
             f"micro-batch {r['micro_batch_size']} x {r['seq_len']} tokens, {r['device']}",
             "", f"{'per rank':<20}{'device at peak':>16}{'largest':>14}{'host':>14}"]
    for c in COMPONENTS:
        if est.device[c] or est.largest[c] or est.host[c]:
            lines.append(f"  {c.replace('_', ' '):<18}{format_bytes(est.device[c]):>16}"
                         f"{format_bytes(est.largest[c]):>14}{format_bytes(est.host[c]):>14}")
    host_total = format_bytes(sum(est.host.values()))
    lines.append(f"  {'total':<18}{format_bytes(est.device_peak):>16}{'':>14}{host_total:>14}")
    lines.append(f"device peak at {est.peak_phase}")
    if est.measured is not None:
        m = est.measured
        lines.append(f"measured peak: {format_bytes(m['peak'])} ({m['device']}, {m['method']}); "
                     f"estimate / measured = {est.device_peak / max(m['peak'], 1):.3f}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def format_comparison(estimates: dict[str, "Estimate | str"]) -> str:
    """The optimizers side by side for the same model, as a markdown table.

    State and gradients are each one's largest during the step (per-layer updates shrink the
    gradients, whether or not the peak falls in backward); the device peak is the step's.
    """
    done = [e for e in estimates.values() if isinstance(e, Estimate)]
    if not done:
        return "\n".join(f"{name}: {e}" for name, e in estimates.items())
    measured = any(e.measured is not None for e in done)
    head = ["optimizer", "optimizer state", "gradients", "activations", "device peak", "peak at", "host"]
    head += ["measured peak"] if measured else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 4 + "---|---:|" + "---:|" * measured]
    refused = []
    for name, e in estimates.items():
        if not isinstance(e, Estimate):
            refused.append(f"{name}: {e}")
            lines.append("| " + " | ".join([name, *["-"] * (len(head) - 1)]) + " |")
            continue
        cells = [name, format_bytes(e.largest["optimizer_state"] + e.host["optimizer_state"]),
                 format_bytes(e.largest["gradients"]), format_bytes(e.largest["activations"]),
                 format_bytes(e.device_peak), e.peak_phase, format_bytes(sum(e.host.values()))]
        cells += [format_bytes(e.measured["peak"]) if e.measured else "-"] if measured else []
        lines.append("| " + " | ".join(cells) + " |")
    first = done[0].run
    title = (f"{first['model']} ({first['parameters'] / 1e6:.1f}M parameters), micro-batch {first['micro_batch_size']} "
             f"x {first['seq_len']} tokens, {first['dtype']}, {first['loss']} loss, {first['backend']} x "
             f"{first['world_size']}, {first['device']}; bytes per rank, state and gradients at their largest")
    return "\n".join([title, "", *lines, *(["", *refused] if refused else [])])


def _optimizer_label(run: dict[str, Any]) -> str:
    label = run["optimizer"] + (" (per-layer)" if run["layerwise"] else "")
    return label + (f", offload {run['offload']}" if run["offload"] != "none" else "")


def estimate_main(argv: list[str]) -> int:
    """``leantrain estimate CONFIG [key=value ...] [--json] [--measure] [--compare-optimizers] [--world-size N]``."""
    parser = argparse.ArgumentParser(
        prog="leantrain estimate",
        description="Per-rank memory of a training config (weights, gradients, optimizer state, activations, "
                    "logits and loss, MoE, buffers), from the real model and optimizer traced on fake tensors.")
    parser.add_argument("config", help="config file, or the name of a bundled config such as 'quickstart'")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.name=galore optim.rank=256")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (schema in the README)")
    parser.add_argument("--measure", action="store_true",
                        help="also run two real steps on the run's device and print the measured peak")
    parser.add_argument("--compare-optimizers", action="store_true",
                        help=f"a table of {', '.join(COMPARED_OPTIMIZERS)} for the same model")
    parser.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="ranks of the run: per-rank figures of sharded backends (default 1)")
    args = parser.parse_intermixed_args(argv)
    if args.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {args.world_size}")
    if args.measure and args.world_size > 1:
        raise UserError("--measure runs one process: it cannot measure --world-size > 1")
    if args.compare_optimizers:
        estimates = compare_optimizers(args.config, args.overrides, args.world_size, args.measure)
        if args.json:
            print(json.dumps({"schema": SCHEMA_VERSION, "compare": {
                name: e.to_json() if isinstance(e, Estimate) else {"error": e} for name, e in estimates.items()}},
                indent=2))
        else:
            print(format_comparison(estimates))
        return 0
    cfg = load_config(args.config, args.overrides)
    est = estimate(cfg, args.world_size)
    if args.measure:
        est.measured = measure(cfg)
    print(json.dumps(est.to_json(), indent=2) if args.json else format_estimate(est))
    return 0
