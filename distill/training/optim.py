"""Optimizer pieces of the recipe: AdamW param groups, warmup + cosine schedule, the global batch-size schedule.

Why here and not in train.py: each is a pure function of the config that tests can check without training
(which params decay, the lr at step s, the accumulation at epoch e).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill.config.train_config import ConfigError, OptimCfg, TrainCfg


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Gains, biases, 1-d embeddings and the logit scale are not decayed (open_clip's rule)."""
    return p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or "logit_bias" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable params: decayed (matrices) and not decayed (see `no_decay`)."""
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": rest, "weight_decay": 0.0, "name": "no_decay"},
    ]


def use_fused(mode: str, device_type: str, param_dtypes: set[torch.dtype]) -> bool:
    """Whether AdamW runs its fused kernel: `optim.fused` auto means on CUDA with float params only (one kernel
    launch for all params instead of a loop per tensor); CPU keeps torch's default, so CPU results do not move."""
    if mode in ("on", "off"):
        return mode == "on"
    return device_type == "cuda" and bool(param_dtypes) and all(d.is_floating_point for d in param_dtypes)


def build_optimizer(model: nn.Module, cfg: OptimCfg, device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `device`: where the params will train (Accelerate moves them in `prepare`),
    default where they are now."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    device_type = torch.device(device).type if device is not None else (params[0].device.type if params else "cpu")
    fused = use_fused(cfg.fused, device_type, {p.dtype for p in params})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **({"fused": True} if fused else {}))


def lr_factor(step: int, total_steps: int, cfg: OptimCfg) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then cosine to min_lr (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimCfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def global_batch_for_epoch(cfg: TrainCfg, per_device: int, num_processes: int, epoch: int) -> int:
    """The global batch (samples per optimizer step) in `epoch`: the schedule's, else per-device x procs x accum."""
    if not cfg.batch_schedule:
        return per_device * num_processes * cfg.grad_accum
    return [b for start, b in cfg.batch_schedule if start <= epoch][-1]


def accum_for_epoch(cfg: TrainCfg, per_device: int, num_processes: int, epoch: int) -> int:
    """Gradient-accumulation steps that realise the global batch of `epoch` on this many processes."""
    global_batch = global_batch_for_epoch(cfg, per_device, num_processes, epoch)
    micro = per_device * num_processes
    if global_batch % micro:
        raise ConfigError(
            f"train.batch_schedule asks for a global batch of {global_batch} at epoch {epoch}, which is not a "
            f"multiple of data.batch_size x processes = {per_device} x {num_processes} = {micro}; "
            f"change data.batch_size or the schedule"
        )
    return global_batch // micro


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Optimizer steps in one epoch: the sampler drops the rows that do not fill a whole global batch."""
    return num_rows // global_batch


def total_steps(cfg: TrainCfg, num_rows: int, per_device: int, num_processes: int) -> int:
    """Optimizer steps of the whole run (max_steps, else the sum over epochs under the batch schedule)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return sum(
        steps_per_epoch(num_rows, global_batch_for_epoch(cfg, per_device, num_processes, e)) for e in range(cfg.epochs)
    )
