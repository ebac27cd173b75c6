"""Training: the loss falls on a fixed batch; a short run writes resumable checkpoints that evaluate."""

from __future__ import annotations

import itertools
import json

import torch

from bench.shared_dataset import make_dataset
from index_builder.evaluate import EvalConfig, evaluate
from model.config import LocalMode
from model.datasets import VPRSplit
from model.options import ModelOptions
from model.preprocess import Preprocessing, ResizeMode
from model.training.loop import TrainConfig, prepare_model, train, training_loss
from model.training.mining import TripletMiner
from model.weights.loading import load_model
from tests.helpers import dinov2_checkpoint, tiny_checkpoint, tiny_model


def test_mining_follows_the_distance_rules(tmp_path, shared_data):
    split = VPRSplit.load(make_dataset(tmp_path / "ds", shared_data, splits=("train",)), "train")
    miner = TripletMiner(split, sample_queries=10, sample_database=20, seed=1)
    rng = torch.Generator().manual_seed(0)
    tuples = miner.mine(
        lambda paths: torch.nn.functional.normalize(torch.randn(len(paths), 8, generator=rng), dim=1).numpy()
    )
    assert len(tuples) == 10
    for t in tuples:
        place = t.query.name.split("@")[-2].split("_")[0]
        assert t.positive.name.split("@")[-2].startswith(place)  # within 10 m: the same place
        assert all(not n.name.split("@")[-2].startswith(place) for n in t.negatives)  # never within 25 m
        assert len(t.negatives) == 2


def test_loss_falls_on_a_fixed_batch(tmp_path, shared_data):
    loaded = load_model(tiny_checkpoint(tmp_path / "tiny"))
    model = prepare_model(loaded)
    split = VPRSplit.load(make_dataset(tmp_path / "ds", shared_data, splits=("train",)), "train")
    prep = Preprocessing(image_size=(112, 112), resize=ResizeMode.TRAIN)
    paths = [
        split.queries_paths[0],
        split.database_paths[0],
        split.database_paths[5],
        split.database_paths[9],
        split.queries_paths[4],
        split.database_paths[8],
        split.database_paths[2],
        split.database_paths[13],
    ]
    images = torch.stack([prep.load(p) for p in paths])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        total, *_ = training_loss(model, images, tuples=2, negatives=2, lambda_local=1.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0]
    assert all(b <= a for a, b in itertools.pairwise(losses))
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
    assert frozen == []
    assert model.backbone.patch_embed.proj.weight.grad is None  # the backbone never trains


def test_a_plain_backbone_gets_adapters_and_a_fresh_head(tmp_path):
    source = tiny_model(seed=3)
    loaded = load_model(dinov2_checkpoint(tmp_path / "dinov2_tiny.pth", source))
    assert not loaded.info.trained_adapters
    model = prepare_model(loaded)
    assert model.backbone.blocks[0].adapter1 is not None
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():  # zero-initialised adapters: the same global descriptor as the plain model
        torch.testing.assert_close(
            model(images).global_desc, loaded.model(images, LocalMode.PATCH_TOKENS).global_desc
        )
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter" in n)
    head = sum(p.numel() for p in model.LocalAdapt.parameters())
    assert model.trainable_parameter_count() == adapters + head + 1


def test_short_run_checkpoints_resume_and_evaluate(tmp_path, shared_data):
    dataset = make_dataset(tmp_path / "ds", shared_data, splits=("train", "val"))
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    seen = []

    def validate(model, epoch):
        seen.append(epoch)
        return [10.0, 20.0, 15.0][epoch - 1]

    out = tmp_path / "run"
    config = TrainConfig(
        dataset=dataset,
        out_dir=out,
        checkpoint=str(ckpt),
        epochs=2,
        batch_size=2,
        queries_per_epoch=4,
        refresh_every=4,
        device="cpu",
        workers=2,
    )
    state = train(config, validate)
    assert (state["epoch"], state["step"], state["best_r5"]) == (2, 4, 20.0) and seen == [1, 2]
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["trained_local_head"] and best["metadata"]["training"]["epoch"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["trainable_parameters"] > 0
    assert sum(1 for r in log if r["event"] == "step") == 4

    resumed = TrainConfig(**{**config.__dict__, "resume": out / "last", "epochs": 3})
    state = train(resumed, validate)
    assert (state["epoch"], state["step"], state["not_improved"]) == (3, 6, 1)

    report = evaluate(
        EvalConfig(
            dataset,
            "val",
            rerank_k=5,
            recalls=[1, 5],
            index_dir=tmp_path / "eval-index",
            model=ModelOptions(checkpoint=str(out / "best"), device="cpu"),
        ),
        show_progress=False,
    )
    assert report.queries == 10 and set(report.reranked_recalls) == {"1", "5"}
    assert load_model(out / "best").info.default_local_mode is LocalMode.LOCAL_HEAD


def test_early_stopping(tmp_path, shared_data):
    dataset = make_dataset(tmp_path / "ds", shared_data, splits=("train",))
    config = TrainConfig(
        dataset=dataset,
        out_dir=tmp_path / "run",
        checkpoint=str(tiny_checkpoint(tmp_path / "t")),
        epochs=10,
        batch_size=2,
        queries_per_epoch=2,
        refresh_every=2,
        patience=2,
        device="cpu",
    )
    state = train(config, lambda model, epoch: 50.0)  # never improves after the first epoch
    assert (state["epoch"], state["not_improved"]) == (3, 2)
