"""The training run: build the pieces in a fixed order, then one explicit loop.

Order: world, config checks, data, model (on the meta device), loss, parallel wrap (which materialises
the weights, as each rank's shards under FSDP2), optimizer, schedule, checkpointer
(restore), metrics, loop. One optimizer step is: accumulate micro-batches (loss normalised by the
global count of target tokens), clip, let the checkpointer wait, step, schedule, log, checkpoint.
Around it: the run directory's lock, the stop signals (SIGTERM, SIGINT: save and exit 0 at a step
boundary) and the divergence guard (non-finite steps skipped, the run stopped after too many).
"""

import dataclasses
import random
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manager import Checkpointer
from ..errors import UserError
from ..moe.balance import BalanceCollector, domain_routing_metrics
from ..moe.config import MoEConfig, check_moe_config
from ..nn.hf import HFCausalLMAdapter, load_hf_model
from ..nn.loss import IGNORE_INDEX, LanguageModelLoss
from ..nn.model import PARAM_DTYPES, Transformer, resolve_model_config
from ..optim.build import FREEZING_OPTIMIZERS, build_optimizer
from ..optim.groups import count_state_bytes
from ..parallel.world import World, close_world, init_world
from ..parallel.wrap import DataParallelEngine, build_engine
from .config import Config, accumulation_steps, fingerprint, to_dict, to_yaml
from .data import build_data
from .divergence import DivergenceGuard
from .estimate import check_fits
from .metrics import MetricsLogger, perplexity
from .preemption import StopRequest
from .run_lock import RunLock
from .schedule import build_scheduler


class Progress:
    """The trainer's own counters, checkpointed with everything else."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        """Steps skipped by the divergence guard so far."""

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.bad_steps = int(state.get("bad_steps", 0))  # checkpoints from before the guard have none


class RNGState:
    """This rank's random generators (torch CPU and CUDA, Python's ``random``).

    A generator's state belongs to its rank: resumed at another world size, every rank is re-seeded
    from (seed, step, rank) instead, said in a log line.
    """

    def __init__(self, seed: int, world: World, progress: Progress):
        self.seed, self.world, self.progress = seed, world, progress

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        seed = (self.seed * 1_000_003 + self.progress.step) * 1_000_033 + self.world.rank
        torch.manual_seed(seed)  # every device's generator
        random.seed(seed)
        if self.world.is_main:
            warnings.warn(f"the random generators' states were saved by {len(states)} ranks, this run has "
                          f"{self.world.world_size}: re-seeded each rank's from (trainer.seed, step "
                          f"{self.progress.step}, rank)", stacklevel=2)


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """leantrain's Transformer from the preset on the meta device (``materialize_model`` allocates it),
    or a local Hugging Face causal LM (``model.hf``), loaded on the CPU in ``model.param_dtype``."""
    check_moe_config(cfg.moe)
    if cfg.model.hf:
        if cfg.moe.num_experts:
            raise UserError("moe.num_experts applies to leantrain's own model; a model.hf MoE model brings its own experts")
        model = HFCausalLMAdapter(load_hf_model(cfg.model.hf, PARAM_DTYPES[cfg.model.param_dtype], cfg.trainer.seed))
        model.check_tokenizer(vocab_size)
        if cfg.model.activation_checkpointing:
            model.hf_model.gradient_checkpointing_enable()
        return model
    with torch.device("meta"):
        return Transformer(resolve_model_config(cfg.model, vocab_size, cfg.data.seq_len), cfg.moe)


@torch.no_grad()
def materialize_model(cfg: Config, model: torch.nn.Module, device: torch.device,
                      allocated: Callable[[], None] | None = None) -> None:
    """Give a meta-device model its weights on ``device``: allocated once in their storage dtype, then
    initialised from ``trainer.seed`` (``Transformer.init_weights``); a model.hf model is moved there.

    Under FSDP2 the engine calls it after sharding, so each rank allocates and draws only its shards.
    ``allocated`` runs between allocation and initialisation, for ``leantrain estimate``'s trace.
    """
    if cfg.model.hf:
        if any(t.device != device for t in [*model.parameters(), *model.buffers()]):
            model.to(device)
        if allocated is not None:
            allocated()
        return
    model.to_empty(device=device)
    if allocated is not None:
        allocated()
    model.init_weights(cfg.trainer.seed)


def moe_config_of(cfg: Config, model: torch.nn.Module) -> MoEConfig:
    """The run's MoE settings: ``cfg.moe``, or for ``model.hf`` the HF model's experts with ``cfg.moe``'s balancing."""
    return model.moe_config(cfg.moe) if cfg.model.hf else cfg.moe


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on ``device`` when ``trainer.dtype`` is bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.trainer.dtype == "bf16")


@torch.no_grad()
def evaluate(loss_module: LanguageModelLoss, data, cfg: Config, world: World, moe: MoEConfig) -> dict[str, float]:
    """Mean validation loss per target token over all ranks: ``val_loss``, ``val_ppl``.

    With ``data.domains`` every domain gets ``trainer.eval_batches`` batches and its own ``val_loss/<domain>``;
    for an MoE model (``moe.num_experts`` > 0) also each domain's routing concentration per MoE layer,
    ``val_moe/layer<i>/concentration/<domain>``, its mean over layers, ``val_moe/concentration/<domain>``, and
    the expert load over all domains, ``val_moe/[layer<i>/]max_load`` (see ``domain_routing_metrics``).
    """
    loss_module.eval()
    domains = data.domain_names or [None]
    routing = None
    if moe.num_experts and data.domain_names:  # statistics only: micro mode needs no communication
        routing = BalanceCollector(dataclasses.replace(moe, balance="micro"), domain_names=data.domain_names)
    totals = torch.zeros(len(domains), 2, dtype=torch.float64, device=world.device)
    for d, domain in enumerate(domains):
        for inputs, targets in data.val_batches(cfg.trainer.micro_batch_size, cfg.trainer.eval_batches, domain):
            inputs, targets = inputs.to(world.device), targets.to(world.device)
            if routing is not None:
                routing.set_domains(torch.full((inputs.shape[0],), d))
            with autocast(cfg, world.device):
                totals[d, 0] += loss_module(inputs, targets, routing).double()
            if routing is not None:
                routing.loss()
            totals[d, 1] += (targets != IGNORE_INDEX).sum()
    loss_module.train()
    world.all_reduce_sum(totals)
    val_loss = (totals[:, 0].sum() / totals[:, 1].sum()).item()
    out = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    if data.domain_names:
        out.update({f"val_loss/{name}": (totals[d, 0] / totals[d, 1]).item() for d, name in enumerate(domains)})
    if routing is not None:
        counts = {layer: world.all_reduce_sum(c.to(world.device))
                  for layer, c in sorted(routing.domain_counts().items())}
        out.update(domain_routing_metrics(counts, data.domain_names, moe.top_k, "val_moe/"))
    return out


def micro_batch(cfg: Config, engine: DataParallelEngine, inputs: torch.Tensor, targets: torch.Tensor,
                balance: BalanceCollector | None, scale: float, accum: int, is_last: bool,
                before_backward: Callable[[], None] | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch of an accumulation window; returns its summed loss, detached.

    The loss is scaled by ``scale`` (see the loop), the MoE balance loss by 1 / ``accum``; gradients
    are synchronised across ranks only at the window's last micro-batch. ``before_backward`` marks
    the boundary for ``leantrain estimate``'s trace.
    """
    with engine.micro_step(is_last):
        with autocast(cfg, inputs.device):
            loss = engine.module(inputs, targets, balance)
        aux = balance.loss() / accum if balance is not None else 0.0
        if before_backward is not None:
            before_backward()
        engine.backward(loss * scale + aux)
    return loss.detach()


def global_targets_and_stop_votes(micro_batches: list[tuple[torch.Tensor, torch.Tensor]], stop_request: StopRequest,
                                  world: World) -> tuple[int, int]:
    """The step's target tokens over all ranks, and how many ranks got a stop signal: one all-reduce."""
    local = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro_batches)
    counts = world.all_reduce_sum(torch.tensor([local, int(stop_request.requested)], device=world.device))
    n_targets, stop_votes = counts.tolist()
    return n_targets, stop_votes


def stop_on_signal(step: int, stop_request: StopRequest, checkpointer: Checkpointer, replicated: dict,
                   per_rank: dict, metrics: MetricsLogger) -> None:
    """A rank got SIGTERM or SIGINT: save ``step`` (the last finished one) to disk, waiting for it."""
    checkpointer.save_now(step, replicated, per_rank)
    metrics.event({"event": "stopped", "step": step, "signal": stop_request.name or "on another rank"})
    metrics.write(f"leantrain: stop signal ({stop_request.name or 'on another rank'}): stopped after step {step} "
                  "with a checkpoint; run the same command again to resume")


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the configured training and return the last logged metrics."""
    world = init_world(cfg.trainer.device)
    try:
        with ExitStack() as on_exit:  # the run directory's lock, the signal handlers
            return _train(cfg, world, on_exit)
    finally:
        close_world()


def lock_run_dir(run_dir: Path, world: World) -> RunLock | None:
    """Rank 0 locks the run directory (see run_lock.py); if it cannot, every rank raises."""
    lock, error = None, None
    if world.is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except UserError as caught:
            error = caught
    failed = world.all_reduce_sum(torch.tensor([int(error is not None)], device=world.device))
    if error is not None:
        raise error
    if failed.item():
        raise UserError(f"rank 0 could not lock the run directory {run_dir}; its message says why")
    return lock


def _train(cfg: Config, world: World, on_exit: ExitStack) -> dict[str, Any]:
    tcfg = cfg.trainer
    run_dir = Path(tcfg.run_dir)
    accum = accumulation_steps(tcfg, world.world_size)
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    if tcfg.memory_check:
        check_fits(cfg, world.world_size, world.device)

    data = build_data(cfg.data, seed=tcfg.seed, rank=world.rank, world_size=world.world_size)
    model = build_model(cfg, data.vocab_size)
    loss_module = LanguageModelLoss(model, cfg.loss)
    engine = build_engine(loss_module, model, cfg.parallel, world, lambda: build_optimizer(cfg.optim, model, tcfg.seed),
                          grad_clip=tcfg.grad_clip, micro_batch_size=tcfg.micro_batch_size, accumulation_steps=accum,
                          freezes_parameters=cfg.optim.name in FREEZING_OPTIMIZERS,
                          materialize=lambda: materialize_model(cfg, model, world.device))
    optimizer = engine.optimizer
    scheduler = build_scheduler(optimizer, cfg.optim, tcfg.max_steps)
    loader = data.train_loader(tcfg.micro_batch_size)
    progress = Progress()
    # MoE layers record routing statistics here; in `global` mode it all-reduces expert counts.
    moe = moe_config_of(cfg, model)
    balance = BalanceCollector(moe, group=world.group) if moe.num_experts else None

    lock = lock_run_dir(run_dir, world)  # before anything in the run directory is read or written
    if lock is not None:
        on_exit.callback(lock.release)
    stop_request = StopRequest()
    on_exit.callback(stop_request.close)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, fingerprint(cfg), world.rank, world.world_size, world.barrier)
    model_states, rank_states = engine.checkpoint_states()
    replicated = {**model_states, "scheduler": scheduler, "progress": progress}
    per_rank = {**rank_states, "data": loader, "rng": RNGState(tcfg.seed, world, progress)}
    start = checkpointer.restore(replicated, per_rank)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
        if cfg.model.hf:  # what `leantrain export` needs to rebuild the model
            model.hf_model.config.save_pretrained(run_dir / "hf_config")
            model.hf_model.generation_config.save_pretrained(run_dir / "hf_config")
    metrics = MetricsLogger(cfg.logging, run_dir, tcfg.max_steps, start, world.is_main, to_dict(cfg))
    if start:
        metrics.event({"event": "resume", "step": start, "source": checkpointer.restore_source})
    metrics.write(f"leantrain: {model.num_params():,} parameters, {world.world_size} rank(s) on {world.device}, "
                  f"{accum} accumulation step(s), run dir {run_dir}")

    last: dict[str, Any] = {"step": start}
    if start == 0 and tcfg.eval_interval > 0:
        last = {"step": 0, **evaluate(loss_module, data, cfg, world, moe)}
        metrics.event(last)
    stop = min(tcfg.max_steps, tcfg.stop_at_step or tcfg.max_steps)
    guard = DivergenceGuard(tcfg.max_bad_steps)
    window_start, window_tokens = time.perf_counter(), 0
    while progress.step < stop:
        position = loader.state_dict()
        micro_batches = [loader.next() for _ in range(accum)]
        n_targets, stop_votes = global_targets_and_stop_votes(micro_batches, stop_request, world)
        if stop_votes:
            loader.load_state_dict(position)  # these batches are the resumed run's first
            stop_on_signal(progress.step, stop_request, checkpointer, replicated, per_rank, metrics)
            break
        # Every backend averages gradients over ranks; scaling by world size / global targets makes
        # the gradient that of the mean loss over every target token of the global batch.
        scale = world.world_size / n_targets
        loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        for i, (inputs, targets) in enumerate(micro_batches):
            inputs, targets = inputs.to(world.device), targets.to(world.device)
            loss = micro_batch(cfg, engine, inputs, targets, balance, scale, accum, is_last=i == accum - 1)
            loss_sum += loss.double()
        checkpointer.wait_before_step()
        grad_norm = engine.step()
        scheduler.step()
        engine.zero_grad()
        moe_metrics = balance.metrics() if balance is not None else {}
        if balance is not None:
            balance.reset()
        progress.step += 1
        progress.tokens_seen += n_targets
        window_tokens += n_targets

        step = progress.step
        good = guard.check(grad_norm.item())
        if not good:
            progress.bad_steps += 1
            metrics.event({"event": "bad_step", "step": step, "grad_norm": str(grad_norm.item()),
                           "streak": guard.streak, "bad_steps": progress.bad_steps})
            guard.stop_if_diverged(step)
        evaluate_now = tcfg.eval_interval > 0 and (step % tcfg.eval_interval == 0 or step == stop)
        if step % cfg.logging.log_interval == 0 or evaluate_now or step == stop:
            elapsed = time.perf_counter() - window_start
            last = {"step": step, "loss": world.all_reduce_sum(loss_sum).item() / n_targets,
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9), "tokens_seen": progress.tokens_seen,
                    # This rank's optimizer-state bytes: it changes with LISA's and FRUGAL's active parts.
                    "optim_state_bytes": count_state_bytes(optimizer), "bad_steps": progress.bad_steps,
                    **moe_metrics}
            if evaluate_now:
                last.update(evaluate(loss_module, data, cfg, world, moe))
            metrics.log(last)
            window_start, window_tokens = time.perf_counter(), 0
        if good:  # a skipped step's state is the previous one's; never checkpoint in a bad streak
            checkpointer.after_step(step, replicated, per_rank, force=step == stop)

    if progress.step >= tcfg.max_steps:
        checkpointer.save_final(engine.full_state_dict(), {"config": to_yaml(cfg), "step": str(progress.step)})
    metrics.close()
    return last
