"""Fine-tuning: the image encoder, unfrozen, plus a linear head (the comparative BiomedCLIP fine-tuning study).

Teachers are frozen, so the image tower is deep-copied (the teacher itself is untouched) and its gradients
re-enabled. Differential learning rates (small for the pretrained tower, larger for the new head), linear warmup
then cosine decay, cross-entropy for single-label tasks and BCE weighted by inverse class frequency
(pos_weight = negatives / positives) for multi-label ones, autocast on GPU. The epoch with the best validation
score (accuracy, or mean AUROC) is kept and scored once on the test split. Works on CPU for tiny models.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.eval import metrics as M
from distill.eval.bootstrap import Estimate
from distill.eval.classification import classification_metrics
from distill.eval.context import EvalContext
from distill.eval.datasets import SplitData
from distill.eval.kinds import register_kind
from distill.eval.tasks import FinetuneCfg

log = logging.getLogger(__name__)


class _HFVisionTower(nn.Module):
    """`CLIPModel.get_image_features` without the text tower: vision model, pooled output, projection."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.vision_model, self.projection = vision_model, projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_model(pixel_values=images).pooler_output)


class _TrunkTower(nn.Module):
    """Any other trunk: its own `encode_image` or `get_image_features`."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk: Any = trunk  # duck-typed: encode_image (open_clip) or get_image_features (transformers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.trunk, "encode_image"):
            return self.trunk.encode_image(images)
        out = self.trunk.get_image_features(pixel_values=images)
        return out if torch.is_tensor(out) else out.pooler_output


def trainable_image_tower(teacher) -> nn.Module:
    """A trainable deep copy of a teacher's image tower (open_clip `visual`, HF vision model + projection)."""
    trunk = teacher.trunk
    if hasattr(trunk, "visual") and hasattr(trunk, "encode_image"):  # open_clip: encode_image = visual(x)
        tower: nn.Module = copy.deepcopy(trunk.visual)
    elif hasattr(trunk, "vision_model") and hasattr(trunk, "visual_projection"):  # transformers CLIPModel
        tower = _HFVisionTower(copy.deepcopy(trunk.vision_model), copy.deepcopy(trunk.visual_projection))
    else:
        tower = _TrunkTower(copy.deepcopy(trunk))
    tower.requires_grad_(True)
    return tower.float().train()


class ImageClassifier(nn.Module):
    def __init__(self, tower: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.tower, self.head = tower, nn.Linear(dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(images).float())


def _labels(data: SplitData) -> np.ndarray:
    """The split's class labels (classification tasks always load them)."""
    if data.labels is None:
        raise ValueError(f"split {data.key} has no class labels: fine-tuning needs them")
    return data.labels


class _Labelled(Dataset):
    def __init__(self, data: SplitData, transform):
        self.data, self.transform, self.labels = data, transform, _labels(data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.image(i)), torch.as_tensor(self.labels[i])


def inverse_frequency_pos_weight(targets: np.ndarray) -> torch.Tensor:
    """Per-class BCE pos_weight = negatives / positives (1 where a class has no positives or no negatives)."""
    t = np.asarray(targets) > 0
    pos, neg = t.sum(0).astype(np.float64), (~t).sum(0).astype(np.float64)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.as_tensor(w, dtype=torch.float32)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict(
    model: ImageClassifier,
    data: SplitData,
    transform,
    multilabel: bool,
    device,
    batch_size: int,
    num_workers: int = 0,
    amp: bool = True,
) -> np.ndarray:
    """(N, C) probabilities (softmax, or sigmoid for multi-label) in split order."""
    model.eval()
    out = []
    for x, _ in DataLoader(_Labelled(data, transform), batch_size=batch_size, num_workers=num_workers):
        with _autocast(device, amp):
            logits = model(x.to(device)).float()
        out.append((logits.sigmoid() if multilabel else logits.softmax(-1)).cpu())
    return torch.cat(out).numpy()


def _val_score(scores: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    v = M.mean_auroc(y > 0, scores) if multilabel else M.accuracy(y, scores.argmax(1))
    return v if math.isfinite(v) else -math.inf


def finetune(
    teacher,
    splits: dict[str, SplitData],
    n_classes: int,
    multilabel: bool,
    cfg: FinetuneCfg,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    desc: str = "finetune",
) -> tuple[ImageClassifier, list[dict]]:
    """Fine-tune a copy of `teacher`'s image tower with a new head; returns (best-on-val model, epoch log)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = ImageClassifier(trainable_image_tower(teacher), teacher.embed_dim, n_classes).to(device)
    transform = teacher.image_transform
    train, val = splits["train"], splits["val"]
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        _Labelled(train, transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=gen,
        num_workers=num_workers,
        drop_last=len(train) > cfg.batch_size,
    )
    total = cfg.epochs * len(loader) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(loader))
    opt = torch.optim.AdamW(
        [
            {"params": model.tower.parameters(), "lr": cfg.lr_encoder},
            {"params": model.head.parameters(), "lr": cfg.lr_head},
        ],
        weight_decay=cfg.weight_decay,
    )

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    use_fp16 = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    pos_weight = inverse_frequency_pos_weight(_labels(train)).to(device) if multilabel else None
    best_state, best_score, history, step = None, -math.inf, [], 0
    flip_gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for x, y in bar:
            if step >= total:
                break
            if cfg.flip:  # random horizontal flips, seeded
                flip = torch.rand(len(x), generator=flip_gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x, y = x.to(device), y.to(device)
            with _autocast(device, cfg.amp):
                logits = model(x).float()
            loss = (
                F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=pos_weight)
                if multilabel
                else F.cross_entropy(logits, y.long())
            )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            losses.append(loss.item())  # sync point: one per step, for the progress bar and the log
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        scores = predict(model, val, transform, multilabel, device, cfg.batch_size, num_workers, cfg.amp)
        score = _val_score(scores, _labels(val), multilabel)
        history.append(
            {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"), "val_score": score}
        )
        log.info("%s epoch %d: train loss %.4f, val %.4f", desc, epoch + 1, history[-1]["train_loss"], score)
        if best_state is None or score > best_score:
            best_score = score
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if step >= total:
            break
    if best_state is None:
        raise ValueError("fine-tuning ran no epoch: epochs must be >= 1")
    model.load_state_dict(best_state)
    return model, history


@register_kind("finetune")
def evaluate_finetune(task, model, name: str, splits: dict, ctx: EvalContext) -> dict[str, Estimate]:
    cfg = task.finetune
    clf, _ = finetune(
        model,
        splits,
        len(task.classes),
        task.multilabel,
        cfg,
        ctx.device,
        ctx.seed,
        ctx.num_workers,
        desc=f"{name} | {task.name}",
    )
    scores = predict(
        clf,
        splits["test"],
        model.image_transform,
        task.multilabel,
        torch.device(ctx.device),
        cfg.batch_size,
        ctx.num_workers,
        cfg.amp,
    )
    del clf
    return classification_metrics(splits["test"].labels, scores, task.classes, task.multilabel, ctx.bootstrap, ctx.seed)
