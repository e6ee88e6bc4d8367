"""Load-balancing loss (LBL), router z-loss and routing statistics of the MoE layers of a model.

LBL = N_E * sum_i f_i * P_i, with f_i the share of routed (token, expert) pairs that chose expert i
(so sum_i f_i = 1 and the loss is 1 at perfect balance) and P_i the mean router probability of
expert i. ``balance`` says over which tokens both are taken:

- ``micro``: the micro-batch of this rank, as HF Mixtral/Qwen-MoE and most frameworks do. With
  micro-batches of a few sequences this pushes every sequence to spread its tokens over all experts.
- ``sequence``: each sequence on its own, then the mean over sequences.
- ``global``: the global batch (Demons in the Detail, Qiu et al. 2025). The count vector is
  all-reduced over the data-parallel group every micro-step and summed into a buffer over the
  gradient-accumulation window, so f_i at micro-step a covers every token of micro-steps 1..a on
  all ranks; P_i stays local. Each rank's term is scaled so that the data-parallel mean of the
  gradients is exactly the gradient of N_E * sum_i f_i * P_i(all ranks' tokens of this
  micro-step). Without accumulation that is the global-batch loss itself; with it, the paper's
  buffered approximation, whose last micro-step sees the whole global batch. The loss value is the
  global one on every rank. The all-reduce starts when a layer records and is awaited in
  ``loss()``, so it overlaps the rest of the forward pass.

The z-loss (ST-MoE, Zoph et al. 2022) is mean_t logsumexp(logits_t)^2 over the micro-batch.

One ``BalanceCollector`` serves the whole model: the MoE layers ``record`` into it during the
forward, the trainer calls ``loss()`` once per micro-step, adds it to the language-model loss
(scaling both alike), and calls ``reset()`` after each optimizer step. Under non-reentrant
activation checkpointing the recomputed forward records nothing; reentrant checkpointing runs the
first forward without autograd, so these losses would carry no gradient there.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError
from .config import MoEConfig
from .router import Routing


def load_balancing_loss(freq: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """N_E * sum_i f_i * P_i over the last (expert) dimension."""
    return freq.shape[-1] * (freq * mean_probs).sum(-1)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2: keeps router logits small (ST-MoE)."""
    return logits.logsumexp(-1).square().mean()


def domain_concentration(counts: torch.Tensor, top_n: int) -> torch.Tensor:
    """How specialised each domain's routing is: [domains, E] routed pairs -> [domains].

    The share of a domain's (token, expert) pairs that go to its ``top_n`` most used experts: top_n / E
    when the domain spreads its tokens evenly over all experts, 1 when it always uses the same top_n. With
    top_n = top_k this is the sum of the domain's k largest expert-selection frequencies: one number per
    domain for the per-domain selection frequencies by which "Demons in the Detail" shows that global
    balancing lets experts specialise. A domain with no pairs gets 0.
    """
    share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return share.topk(top_n, dim=-1).values.sum(-1)


def domain_routing_metrics(domain_counts: dict[int, torch.Tensor], domain_names: Sequence[str], top_n: int,
                           prefix: str) -> dict[str, float]:
    """Routing of domain-labelled tokens, from per-layer [domains, E] routed pairs.

    ``{prefix}layer{i}/concentration/{domain}`` (see ``domain_concentration``) and its mean over layers,
    ``{prefix}concentration/{domain}``; ``{prefix}layer{i}/max_load``, the most used expert's load over all
    domains relative to a uniform one, and its mean over layers, ``{prefix}max_load``. High concentration with a
    max load near 1 is specialisation: the domains use different experts. High concentration with a high max load
    is collapse: every domain crowds onto the same experts.
    """
    out: dict[str, float] = {}
    layers = sorted(domain_counts)
    concentration = {layer: domain_concentration(domain_counts[layer], top_n) for layer in layers}
    for d, name in enumerate(domain_names):
        for layer in layers:
            out[f"{prefix}layer{layer}/concentration/{name}"] = concentration[layer][d].item()
        if layers:
            mean = sum(concentration[layer][d].item() for layer in layers) / len(layers)
            out[f"{prefix}concentration/{name}"] = mean
    for layer in layers:
        load = domain_counts[layer].sum(0)
        out[f"{prefix}layer{layer}/max_load"] = (load.max() * load.numel() / load.sum().clamp_min(1)).item()
    if layers:
        out[f"{prefix}max_load"] = sum(out[f"{prefix}layer{layer}/max_load"] for layer in layers) / len(layers)
    return out


def _in_backward() -> bool:
    # Activation checkpointing reruns the forward from inside the autograd engine; that rerun
    # must not count the same tokens again. FSDP2 tells its backward-time calls apart the same way.
    return torch._C._current_graph_task_id() != -1


@dataclass
class _MicroStepRecord:
    """What one MoE layer routed in the current micro-step."""

    counts: torch.Tensor
    """[E] chosen (token, expert) pairs per expert, float64."""
    prob_sums: torch.Tensor
    """[E] sum over tokens of the router probabilities (carries the gradient)."""
    z_loss: torch.Tensor
    """Scalar z-loss over the micro-batch (carries the gradient)."""
    num_tokens: int
    seq_counts: torch.Tensor | None
    """[B, E] pairs per sequence and expert (sequence mode and domain statistics)."""
    seq_prob_sums: torch.Tensor | None
    """[B, E] per-sequence sums of the router probabilities (sequence mode)."""
    domains: torch.Tensor | None
    """[B] domain index of each sequence, when the data has domains."""
    global_stats: torch.Tensor | None
    """Global mode: [2E] counts and detached probability sums, summed over the group once ``sync`` is done."""
    sync: dist.Work | None
    """The all-reduce of global_stats in flight, if any."""


class BalanceCollector:
    """Collects the routing statistics of every MoE layer and turns them into the auxiliary loss.

    ``group`` is the data-parallel process group over which ``global`` balancing counts (None: a
    single process). ``domain_names`` names the domains that ``set_domains`` indexes, for the
    specialisation metrics. The collector holds no state across optimizer steps, so checkpoints
    need not save it.
    """

    def __init__(self, cfg: MoEConfig, group: dist.ProcessGroup | None = None, domain_names: Sequence[str] = ()):
        self.mode = cfg.balance
        self.top_k = cfg.top_k
        self.num_experts = cfg.num_experts
        self.lbl_coef = cfg.lbl_coef
        self.micro_lbl_coef = cfg.micro_lbl_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.domain_names = list(domain_names)
        self._domains: torch.Tensor | None = None
        self._pending: dict[int, _MicroStepRecord] = {}
        self.reset(check=False)

    def reset(self, check: bool = True) -> None:
        """Start a new accumulation window; call after each optimizer step."""
        if check and self._pending:
            raise RuntimeError(f"MoE layers {sorted(self._pending)} recorded a forward whose loss() was never taken")
        self._window_counts: dict[int, torch.Tensor] = {}
        self._window_domain_counts: dict[int, torch.Tensor] = {}
        self._lbl_sum: dict[int, torch.Tensor] = {}
        self._micro_lbl_sum: dict[int, torch.Tensor] = {}
        self._z_sum: dict[int, torch.Tensor] = {}
        self._micro_steps = 0

    def set_domains(self, domains: torch.Tensor | None) -> None:
        """Domain index of each sequence of the next micro-batch ([B] integers), or None; loss() clears it."""
        if domains is not None:
            if not self.domain_names:
                raise UserError("the batch carries domain labels but no domain names were given to the MoE statistics")
            if domains.numel() and (domains.min() < 0 or domains.max() >= len(self.domain_names)):
                raise UserError(f"domain labels must lie in 0..{len(self.domain_names) - 1} "
                                f"({', '.join(self.domain_names)}); got {domains.unique().tolist()}")
        self._domains = domains

    def record(self, layer: int, routing: Routing, counts: torch.Tensor, batch_size: int) -> None:
        """Called by MoE layer ``layer`` in its forward with its routing of batch_size sequences."""
        # Under activation checkpointing the statistics are computed again (the recomputation must
        # save the same tensors as the forward did) but kept only the first time.
        z = z_loss(routing.logits)
        if self.mode == "sequence":
            seq_prob_sums = routing.probs.view(batch_size, -1, self.num_experts).sum(1)
            prob_sums = seq_prob_sums.sum(0)
        else:
            seq_prob_sums, prob_sums = None, routing.probs.sum(0)
        if _in_backward():
            return
        if layer in self._pending:
            raise RuntimeError(f"MoE layer {layer} recorded twice in one micro-step: call loss() after each forward")
        num_tokens = routing.probs.shape[0]
        need_sequences = self.mode == "sequence" or self._domains is not None
        seq_counts = None
        if need_sequences:
            seq_len = num_tokens // batch_size
            seq_of_pair = torch.arange(num_tokens, device=counts.device).div(seq_len, rounding_mode="floor")
            seq_of_pair = seq_of_pair.repeat_interleave(self.top_k)
            flat = seq_of_pair * self.num_experts + routing.experts.flatten()
            seq_counts = torch.bincount(flat, minlength=batch_size * self.num_experts)
            seq_counts = seq_counts.view(batch_size, self.num_experts).double()
        domains = self._domains
        if domains is not None and domains.shape[0] != batch_size:
            raise UserError(f"{domains.shape[0]} domain labels for a batch of {batch_size} sequences")
        global_stats = sync = None
        if self.mode == "global":
            # Started here and awaited in loss(), the all-reduce overlaps the rest of the forward pass.
            global_stats = torch.cat([counts.double(), prob_sums.detach().double()])
            if self.group is not None:
                sync = dist.all_reduce(global_stats, group=self.group, async_op=True)
        self._pending[layer] = _MicroStepRecord(
            counts=counts.double(), prob_sums=prob_sums, z_loss=z, num_tokens=num_tokens, seq_counts=seq_counts,
            seq_prob_sums=seq_prob_sums, domains=domains, global_stats=global_stats, sync=sync)

    def loss(self) -> torch.Tensor:
        """The auxiliary loss of this micro-step, summed over layers with the coefficients; closes the micro-step.

        Add it to the micro-batch's mean language-model loss before any 1/accumulation scaling. In
        ``global`` mode it all-reduces over the group, so every rank must call it every micro-step.
        """
        records, self._pending = self._pending, {}
        self._domains = None
        if not records:
            return torch.zeros(())
        layers = sorted(records)
        if self.mode == "global":
            lbl = self._global_lbl(layers, records)
        else:
            lbl = {}
            for layer in layers:
                rec = records[layer]
                self._accumulate_counts(layer, rec.counts)
                lbl[layer] = self._sequence_lbl(rec) if self.mode == "sequence" else self._micro_lbl(rec)
        total = self.lbl_coef * torch.stack([lbl[layer] for layer in layers]).sum()
        if self.micro_lbl_coef:
            micro = {layer: self._micro_lbl(records[layer]) for layer in layers}
            total = total + self.micro_lbl_coef * torch.stack(list(micro.values())).sum()
            self._add(self._micro_lbl_sum, micro)
        if self.z_loss_coef:
            total = total + self.z_loss_coef * torch.stack([records[layer].z_loss for layer in layers]).sum()
        self._add(self._lbl_sum, lbl)
        self._add(self._z_sum, {layer: records[layer].z_loss for layer in layers})
        for layer in layers:
            self._accumulate_domains(layer, records[layer])
        self._micro_steps += 1
        return total

    def _micro_lbl(self, rec: _MicroStepRecord) -> torch.Tensor:
        freq = (rec.counts / rec.counts.sum()).to(rec.prob_sums.dtype)
        return load_balancing_loss(freq, rec.prob_sums / rec.num_tokens)

    def _sequence_lbl(self, rec: _MicroStepRecord) -> torch.Tensor:
        freq = (rec.seq_counts / rec.seq_counts.sum(-1, keepdim=True)).to(rec.seq_prob_sums.dtype)
        seq_len = rec.num_tokens // rec.seq_counts.shape[0]
        return load_balancing_loss(freq, rec.seq_prob_sums / seq_len).mean()

    def _global_lbl(self, layers: list[int], records: dict[int, _MicroStepRecord]) -> dict[int, torch.Tensor]:
        lbl = {}
        for layer in layers:
            rec = records[layer]
            if rec.sync is not None:
                rec.sync.wait()
            step_counts, step_prob_sums = rec.global_stats[:self.num_experts], rec.global_stats[self.num_experts:]
            window = self._accumulate_counts(layer, step_counts)
            freq64 = window / window.sum()
            freq = freq64.to(rec.prob_sums.dtype)
            step_tokens = step_counts.sum() / self.top_k
            # The data-parallel mean of the ranks' gradients of this term is the gradient of
            # N_E sum_i f_i P_i over all ranks' tokens, however the tokens are spread over ranks.
            local = load_balancing_loss(freq, rec.prob_sums * (self.world_size / step_tokens).to(freq.dtype))
            value = load_balancing_loss(freq64, step_prob_sums / step_tokens)
            lbl[layer] = local + (value.to(local.dtype) - local).detach()
        return lbl

    def _accumulate_counts(self, layer: int, counts: torch.Tensor) -> torch.Tensor:
        if layer in self._window_counts:
            self._window_counts[layer] += counts
        else:
            self._window_counts[layer] = counts.clone()
        return self._window_counts[layer]

    def _accumulate_domains(self, layer: int, rec: _MicroStepRecord) -> None:
        if rec.domains is None:
            return
        if layer not in self._window_domain_counts:
            self._window_domain_counts[layer] = rec.seq_counts.new_zeros(len(self.domain_names), self.num_experts)
        self._window_domain_counts[layer].index_add_(0, rec.domains.to(rec.seq_counts.device), rec.seq_counts)

    @staticmethod
    def _add(sums: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> None:
        for layer, value in values.items():
            sums[layer] = sums.get(layer, 0) + value.detach().double()

    def window_counts(self) -> dict[int, torch.Tensor]:
        """Per layer, the [E] routed pairs per expert so far in this window (all ranks' in global mode)."""
        return dict(self._window_counts)

    def domain_counts(self) -> dict[int, torch.Tensor]:
        """Per layer, [domains, E]: the routed pairs of each domain per expert so far in this window (this rank's)."""
        return {layer: counts.clone() for layer, counts in self._window_domain_counts.items()}

    def domain_frequencies(self) -> dict[int, torch.Tensor]:
        """Per layer, [domains, E]: the share of each domain's routed pairs that went to each expert."""
        return {layer: counts / counts.sum(-1, keepdim=True).clamp_min(1)
                for layer, counts in self._window_domain_counts.items()}

    def metrics(self) -> dict[str, float]:
        """Window means: ``moe/lbl`` and ``moe/z_loss`` averaged over layers (without coefficients; the
        LBL is 1 at perfect balance); per layer its LBL and the largest and smallest expert load
        relative to a uniform one; per domain the routing concentration (``domain_concentration`` with
        top_n = top_k, averaged over layers)."""
        if not self._micro_steps:
            return {}
        steps = self._micro_steps
        out = {"moe/lbl": sum(v.item() for v in self._lbl_sum.values()) / len(self._lbl_sum) / steps,
               "moe/z_loss": sum(v.item() for v in self._z_sum.values()) / len(self._z_sum) / steps}
        if self._micro_lbl_sum:
            out["moe/micro_lbl"] = sum(v.item() for v in self._micro_lbl_sum.values()) / len(self._micro_lbl_sum) / steps
        for layer, counts in sorted(self._window_counts.items()):
            out[f"moe/layer{layer}/lbl"] = self._lbl_sum[layer].item() / steps
            load = counts * (self.num_experts / counts.sum())
            out[f"moe/layer{layer}/max_load"] = load.max().item()
            out[f"moe/layer{layer}/min_load"] = load.min().item()
        if self._window_domain_counts:
            for d, name in enumerate(self.domain_names):
                seen = [counts[d] for counts in self._window_domain_counts.values() if counts[d].sum() > 0]
                if seen:
                    top = [domain_concentration(counts, self.top_k).item() for counts in seen]
                    out[f"moe/concentration/{name}"] = sum(top) / len(top)
        return out
