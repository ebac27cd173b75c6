"""The training loop: mined tuples, global triplet + MNN local loss, Adam, early stopping, resumable.

Writes project-format checkpoints OUT/last and OUT/best (model.safetensors + config.json, plus
training_state.pt in last/ for resuming) and a JSON-lines log OUT/train_log.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.config import LocalMode
from model.datasets import VPRSplit
from model.extractor import resolve_device
from model.matching import local_triplet_loss
from model.preprocess import Preprocessing, ResizeMode, square
from model.selavpr import SelaVPR
from model.training.mining import TrainingTuple, TripletMiner
from model.weights.checkpoints import LoadedModel
from model.weights.loading import load_model
from model.weights.project_format import save_checkpoint
from model.weights.unpickle import safe_torch_load

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MARGIN = 0.1


@dataclass
class TrainConfig:
    dataset: Path
    out_dir: Path
    checkpoint: str = "default"
    resume: Path | None = None
    split: str = "train"
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 4  # tuples; each is query, positive and two negatives
    lr: float = 1e-5
    lambda_local: float = 1.0
    patience: int = 3
    queries_per_epoch: int = 5000  # Pitts30k's; MSLS used 30000
    refresh_every: int = 1000  # queries per mining refresh
    image_size: int | None = None
    device: str | None = None
    workers: int = 4
    seed: int = 0


Validate = Callable[[SelaVPR, int], float | None]  # model, epoch -> R@5 after re-ranking, or None


def prepare_model(loaded: LoadedModel) -> SelaVPR:
    """The network to train: adapters added (zero-initialised D_fc2, so step 0 is the loaded model) when
    the checkpoint has none, and a fresh 61x61x128 local head when it has no trained one."""
    model = loaded.model
    if not model.cfg.adapters:
        adapted = SelaVPR(model.cfg.with_adapters(True))
        missing = adapted.load_state_dict(model.state_dict(), strict=False).missing_keys
        if any(".adapter" not in k for k in missing):  # only the new adapters may be absent
            raise RuntimeError(f"unexpected missing weights when adding adapters: {missing[:4]}")
        model = adapted.to(next(loaded.model.parameters()).device)
    if not loaded.info.trained_local_head:
        for conv in (model.LocalAdapt.upconv1, model.LocalAdapt.upconv2):
            conv.reset_parameters()
    model.freeze_backbone()
    return model


def training_loss(model: SelaVPR, images: torch.Tensor, tuples: int, negatives: int, lambda_local: float):
    """images: (tuples * (2 + negatives), 3, H, W) ordered q, p, n1.. per tuple -> (total, global, local)."""
    features = model(images, LocalMode.LOCAL_HEAD)
    per = 2 + negatives
    g = features.global_desc.view(tuples, per, -1)
    loc = features.local.view(tuples, per, *features.local.shape[1:])
    global_loss = sum(
        F.triplet_margin_loss(g[:, 0], g[:, 1], g[:, 2 + n], margin=MARGIN, p=2, reduction="sum")
        for n in range(negatives)
    ) / (tuples * negatives)
    local_loss = local_triplet_loss(loc[:, 0], loc[:, 1], loc[:, 2:])
    return global_loss + lambda_local * local_loss, global_loss, local_loss


class Trainer:
    def __init__(self, config: TrainConfig, validate: Validate | None = None) -> None:
        self.config, self.validate = config, validate
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        start = config.resume or config.checkpoint
        self.loaded = load_model(start, self.device)
        self.model = prepare_model(self.loaded)
        self.size = square(config.image_size or self.loaded.info.image_size)
        self.train_prep = Preprocessing(image_size=self.size, resize=ResizeMode.TRAIN)
        self.test_prep = Preprocessing(image_size=self.size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.split = VPRSplit.load(config.dataset, config.split)
        self.miner = TripletMiner(self.split, config.refresh_every, 1000, seed=config.seed)
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="load")
        self.state = {"epoch": 0, "step": 0, "best_r5": -1.0, "not_improved": 0}
        if config.resume:
            self._restore(config.resume)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = config.out_dir / "train_log.jsonl"

    def run(self) -> dict[str, Any]:
        cfg = self.config
        trainable = self.model.trainable_parameter_count()
        self._log({"event": "start", "trainable_parameters": trainable, "config": _jsonable(asdict(cfg))})
        log.info("training %d parameters (adapters, local head, GeM p); backbone frozen", trainable)
        while self.state["epoch"] < cfg.epochs and not self._out_of_steps():
            self._epoch()
            self.state["epoch"] += 1
            r5 = self.validate(self.model, self.state["epoch"]) if self.validate else None
            improved = r5 is None or r5 > self.state["best_r5"]
            if r5 is not None:
                self.state["not_improved"] = 0 if improved else self.state["not_improved"] + 1
                self.state["best_r5"] = max(self.state["best_r5"], r5)
            self._save("last", with_state=True)
            if improved:
                self._save("best")
            self._log({"event": "epoch", **self.state, "val_r5": r5})
            if self.state["not_improved"] >= cfg.patience:
                log.info("no R@5 improvement for %d epochs: stopping", cfg.patience)
                break
        self.pool.shutdown()
        return dict(self.state)

    def _epoch(self) -> None:
        cfg = self.config
        queries = min(cfg.queries_per_epoch, len(self.miner.trainable))
        done = 0
        while done < queries and not self._out_of_steps():
            tuples = self.miner.mine(self._describe)[: queries - done]
            for start in range(0, len(tuples), cfg.batch_size):
                if self._out_of_steps():
                    return
                self._step(tuples[start : start + cfg.batch_size])
            done += max(len(tuples), 1)

    def _step(self, batch: Sequence[TrainingTuple]) -> None:
        self.model.train()
        paths = [p for t in batch for p in (t.query, t.positive, *t.negatives)]
        images = torch.stack(list(self.pool.map(self.train_prep.load, paths))).to(self.device)
        total, global_loss, local_loss = training_loss(
            self.model, images, len(batch), len(batch[0].negatives), self.config.lambda_local
        )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.state["step"] += 1
        record = {
            "event": "step",
            "epoch": self.state["epoch"],
            "step": self.state["step"],
            "loss": total.item(),
            "global": global_loss.item(),
            "local": local_loss.item(),
        }
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {self.state['step']}")
        self._log(record)

    @torch.inference_mode()
    def _describe(self, paths: Sequence[Path]) -> np.ndarray:
        self.model.eval()
        out = []
        for start in range(0, len(paths), 32):
            images = torch.stack(list(self.pool.map(self.test_prep.load, paths[start : start + 32])))
            patch_map = self.model.patch_map(images.to(self.device))
            out.append(self.model.global_descriptor(patch_map).float().cpu().numpy())
        return np.concatenate(out)

    def _out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.state["step"] >= self.config.max_steps

    def _save(self, name: str, with_state: bool = False) -> None:
        out = save_checkpoint(
            self.model,
            self.config.out_dir / name,
            description=f"SelaVPR {self.model.cfg.vit.size_name} trained on {self.config.dataset.name} "
            f"(epoch {self.state['epoch']}, step {self.state['step']})",
            trained_adapters=True,
            trained_local_head=True,
            image_size=self.size[0],
            metadata={
                "training": {
                    **self.state,
                    "dataset": str(self.config.dataset),
                    "lr": self.config.lr,
                    "lambda_local": self.config.lambda_local,
                    "started_from": self.config.checkpoint,
                }
            },
        )
        if with_state:
            torch.save({**self.state, "optimizer": self.optimizer.state_dict()}, out / STATE_FILE)

    def _restore(self, directory: Path) -> None:
        saved = safe_torch_load(directory / STATE_FILE)
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        self.state.update({k: saved[k] for k in self.state})
        log.info("resuming at epoch %d, step %d", self.state["epoch"], self.state["step"])

    def _log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["event"] != "step" or record["step"] % 50 == 0:
            log.info("%s", {k: v for k, v in record.items() if k != "config"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def train(config: TrainConfig, validate: Validate | None = None) -> dict[str, Any]:
    return Trainer(config, validate).run()
