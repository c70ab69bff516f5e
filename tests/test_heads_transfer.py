"""Transfer baselines (Baseline, Baseline++ of Chen et al. 2019): per-task fine-tuning against a written-out
reference, the class-name map (consistency, overflow, state_dict / checkpoint / resume), n_way padding,
pre-training that helps few-shot accuracy, sinusoid regression, and training through the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from metaformer.cli import main
from metaformer.data import EpisodeBatch, EpisodeSampler, GlyphFamily, SinusoidFamily
from metaformer.heads import HEADS, BaselinePlusPlus, TransferBaseline, build_head
from metaformer.models import build_backbone
from padded_episodes import Flat, episodes
from training import checkpoint as ckpt_io
from training.config import ConfigError, load_config
from training.evaluation import evaluate
from training.registry import build_model
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
SINUSOID = REPO / "training" / "configs" / "sinusoid.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_fit(emb: Tensor, y: Tensor, n: int, cosine: bool, scale: float, steps: int, lr: float,
                  momentum: float, weight_decay: float) -> tuple[Tensor, Tensor]:
    """One task's classifier fitted by hand: full-batch SGD (heavy-ball momentum, L2 decay) on the mean CE."""
    d = emb.shape[1]
    if cosine:
        w = torch.stack([F.normalize(emb, dim=-1)[y == c].mean(0) for c in range(n)])
        b = torch.zeros(n)
    else:
        w, b = torch.zeros(n, d), torch.zeros(n)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for step in range(steps):
        w.requires_grad_(True)
        b.requires_grad_(True)
        logits = scale * F.normalize(emb, dim=-1) @ F.normalize(w, dim=-1).T if cosine else emb @ w.T + b
        gw, gb = torch.autograd.grad(F.cross_entropy(logits, y), [w, b], allow_unused=True)
        gb = torch.zeros_like(b) if gb is None else gb
        with torch.no_grad():
            gw, gb = gw + weight_decay * w, gb + weight_decay * b
            vw, vb = (gw, gb) if step == 0 else (momentum * vw + gw, momentum * vb + gb)
            w, b = w - lr * vw, b - lr * vb
    return w.detach(), b.detach()


@pytest.mark.parametrize("cls", [TransferBaseline, BaselinePlusPlus])
def test_finetuned_classifier_matches_hand_written_sgd_and_backbone_gets_no_gradient(cls: type) -> None:
    torch.manual_seed(0)
    head = cls(Flat(), 3, num_classes=10, finetune_steps=15, finetune_lr=0.3, finetune_momentum=0.9,
               finetune_weight_decay=0.01)
    eps = episodes()
    batch = EpisodeBatch.collate(eps)
    with torch.no_grad():  # evaluation code often runs under no_grad: the fine-tuning must still work
        logits = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)(
            batch.query_x, batch.query_mask)
    assert not logits.requires_grad
    assert all(p.grad is None for p in head.parameters())
    cosine = cls is BaselinePlusPlus
    scale = float(head.scale) if cosine else 1.0
    for t, e in enumerate(eps):
        with torch.no_grad():
            s, q = head.backbone(e.support_x), head.backbone(e.query_x)
        w, b = reference_fit(s, e.support_y, e.n_way, cosine, scale, 15, 0.3, 0.9, 0.01)
        want = scale * F.normalize(q, dim=-1) @ F.normalize(w, dim=-1).T if cosine else q @ w.T + b
        assert torch.allclose(logits[t, :, : e.n_way], want, atol=1e-4), (t, logits[t, :, : e.n_way], want)
        assert bool(torch.isinf(logits[t, :, e.n_way :]).all())
    # the batched fit of a padded batch equals fitting each task alone
    alone = head.adapt(eps[1].support_x, eps[1].support_y, n_way=2)(eps[1].query_x)
    assert torch.allclose(alone[:, :2], logits[1, :, :2], atol=1e-5)


def test_evaluation_freezes_the_backbone_and_uses_running_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    head = TransferBaseline(build_backbone("conv4", in_channels=1, hidden=8), 3, num_classes=8, finetune_steps=5)
    batch = EpisodeSampler(GlyphFamily("test", image_size=16), 3, 1, 2, seed=0).batch(0, 2)
    bn = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    head.train()
    predictor = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
    out = predictor(batch.query_x, batch.query_mask)
    assert head.training and all(m.training for m in head.modules())  # mode restored
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))  # no statistics from test tasks
    assert not out.requires_grad and all(p.grad is None for p in head.parameters())
    # eval-mode BatchNorm: a query's logits do not depend on the other queries of its task
    single = predictor(batch.query_x[:, :1], batch.query_mask[:, :1])
    assert torch.allclose(single, out[:, :1], atol=1e-5)


def test_tasks_with_fewer_ways_never_predict_masked_classes() -> None:
    torch.manual_seed(1)
    head = TransferBaseline(Flat(), 3, num_classes=10, finetune_steps=30, finetune_lr=0.5)
    eps = episodes(3)
    batch = EpisodeBatch.collate(eps)
    assert batch.n_way.tolist() == [3, 2, 3] and not bool(batch.support_mask.all())
    predictor = head.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
    many = torch.randn(3, 200, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 5
    pred = predictor(many).argmax(-1)
    assert int(pred[1].max()) <= 1 and set(pred[0].tolist()) == {0, 1, 2}
    # padded support examples carry no weight: garbage in the padding changes nothing
    noisy = batch.support_x.clone()
    noisy[~batch.support_mask] = 1e3
    again = head.adapt_batch(noisy, batch.support_y, batch.support_mask, batch.n_way)(many)
    assert torch.allclose(again, predictor(many), atol=1e-5)
    # a class without support examples (n_way not given) is never predicted either, and stays finite
    for cls in (TransferBaseline, BaselinePlusPlus):
        two = cls(Flat(), 3, num_classes=10).adapt(eps[1].support_x, eps[1].support_y)(many[0])
        assert bool(torch.isinf(two[:, 2]).all()) and bool(torch.isfinite(two[:, :2]).all())


def glyph_batches(num: int, tasks: int = 4, classes: int = 10, n_way: int = 3) -> list[EpisodeBatch]:
    sampler = EpisodeSampler(GlyphFamily("train", seed=0, image_size=16, num_classes=classes), n_way, 1, 2, seed=0)
    return [sampler.batch(tasks * i, tasks) for i in range(num)]


def test_class_names_map_to_stable_global_indices() -> None:
    torch.manual_seed(0)
    head = BaselinePlusPlus(build_backbone("conv4", in_channels=1, hidden=8), 3, num_classes=12)
    batches = glyph_batches(4)
    seen: dict[str, int] = {}
    for batch in batches:
        loss, metrics = head.loss(batch)
        assert torch.isfinite(loss) and set(metrics) == {"loss", "accuracy"}
        for names in batch.class_names:
            for name in names:
                seen.setdefault(name, head.class_index(name, grow=False))
                assert head.class_index(name, grow=False) == seen[name]
    assert head.num_known_classes == len(seen) == len(set(seen.values())) and len(seen) <= 10
    assert sorted(seen.values()) == list(range(len(seen)))  # first come, first served
    # the loss classifies every example into its class's global index
    head.eval()
    batch = batches[2]
    x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    target = torch.tensor([seen[batch.class_names[t][int(y)]] for ys in (batch.support_y, batch.query_y)
                           for t in range(len(batch)) for y in ys[t]])
    want = F.cross_entropy(head.global_logits(head.backbone(x)), target)
    assert torch.allclose(head.loss(batch)[0], want, atol=1e-5)


def test_more_classes_than_num_classes_is_a_clear_error() -> None:
    head = TransferBaseline(build_backbone("conv4", in_channels=1, hidden=8), 3, num_classes=4)
    batches = glyph_batches(3, tasks=2, classes=1000)
    with pytest.raises(ValueError, match="num_classes=4.*model.options.num_classes"):
        for batch in batches:
            head.loss(batch)
    with pytest.raises(ValueError, match="pass num_classes"):
        TransferBaseline(Flat(), 3)
    with pytest.raises(ValueError, match="classifier"):
        build_head("baselinepp", Flat(), n_way=3, num_classes=4, classifier="linear")


def test_class_map_survives_state_dict_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = TransferBaseline(build_backbone("conv4", in_channels=1, hidden=8), 3, num_classes=16)
    for batch in glyph_batches(3):
        head.loss(batch)
    names = [n for b in glyph_batches(3) for ns in b.class_names for n in ns]
    index = {n: head.class_index(n, grow=False) for n in names}
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = TransferBaseline(build_backbone("conv4", in_channels=1, hidden=8), 3, num_classes=16)
    fresh.load_state_dict(torch.load(buf))
    assert {n: fresh.class_index(n, grow=False) for n in names} == index
    assert fresh.class_index("a new class") == len(set(index.values()))  # grows after the loaded ones
    with pytest.raises(ValueError, match="num_classes"):
        TransferBaseline(Flat(), 3, num_classes=17).set_extra_state(head.get_extra_state())
    # through the checkpoint files (safetensors) of training.checkpoint
    cfg = load_config(TINY, ["model.name=baseline", "model.options={num_classes: 16}"])
    path = ckpt_io.save_checkpoint(tmp_path, step=1, model_state=head.state_dict(), trainer_state={}, config=cfg,
                                   model_name="baseline", model_class="TransferBaseline")
    loaded = build_model(cfg)
    ckpt_io.load_weights_into(loaded, ckpt_io.read_checkpoint(path), "baseline")
    assert {n: loaded.class_index(n, grow=False) for n in names} == index


@pytest.mark.parametrize("cls", [TransferBaseline, BaselinePlusPlus])
def test_pretraining_on_glyph_classes_helps_few_shot_accuracy_on_new_classes(cls: type) -> None:
    # measured (seed 0, 1 thread, 100 test episodes): Baseline 0.237 -> 0.672, Baseline++ 0.502 -> 0.666
    # (5-way 1-shot on held-out glyph classes, chance 0.2; the cosine classifier on random features already
    # acts as a nearest-mean classifier, hence its higher start)
    torch.manual_seed(0)
    train_eps = EpisodeSampler(GlyphFamily("train", seed=0, image_size=16, num_classes=40), 5, 1, 3, seed=0)
    test_eps = EpisodeSampler(GlyphFamily("test", seed=0, image_size=16), 5, 1, 5, seed=1)
    head = cls(build_backbone("conv4", in_channels=1, hidden=16), 5, num_classes=40)
    before = evaluate(head, test_eps, 100, 50).mean
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    for i in range(30):
        opt.zero_grad()
        head.meta_backward(train_eps.batch(8 * i, 8))
        opt.step()
    after = evaluate(head, test_eps, 100, 50).mean
    assert after > 0.6 and after > before + 0.1, (before, after)


def test_sinusoid_pretraining_then_last_layer_finetuning_beats_the_support_mean() -> None:
    # measured (seed 0): query MSE 1.48 after 100 SGD steps on the last layer, 3.44 without fine-tuning,
    # 4.92 for predicting the support mean
    torch.manual_seed(0)
    family, test = SinusoidFamily(10, 10, seed=0), SinusoidFamily(10, 10, seed=1)
    head = build_head("baseline", build_backbone("mlp", in_dim=1, hidden=40, num_layers=2), kind="regression", n_out=1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for i in range(200):
        opt.zero_grad()
        _, metrics = head.meta_backward(family.batch(25 * i, 25))
        assert set(metrics) == {"loss", "mse"}
        opt.step()
    b = test.batch(0, 200)
    support_mean = float(((b.query_y - b.support_y.mean(1, keepdim=True)) ** 2).mean())
    mse = evaluate(head, test, 200, 100).mean
    assert mse < 0.5 * support_mean, (mse, support_mean)
    with pytest.raises(ValueError, match="regression"):
        build_head("baselinepp", Flat(), kind="regression", n_out=1)


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group: map this rank's own class names, save the resulting map."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        head = TransferBaseline(Flat(), 3, num_classes=10)
        names = [["shared", f"r{rank}-a", f"r{rank}-b"], [f"r{rank}-a", f"r{rank}-c", "shared"]]
        head.global_label_table(names, torch.tensor([3, 3]), torch.device("cpu"))
        torch.save(head.get_extra_state(), f"{out_dir}/map{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_keep_one_class_map_under_torch_distributed(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    maps = [torch.load(tmp_path / f"map{r}.pt") for r in (0, 1)]
    assert torch.equal(maps[0], maps[1])
    head = TransferBaseline(Flat(), 3, num_classes=10)
    head.set_extra_state(maps[0])
    order = ["shared", "r0-a", "r0-b", "r0-c", "r1-a", "r1-b", "r1-c"]  # rank 0's new names, then rank 1's
    assert [head.class_index(n, grow=False) for n in order] == list(range(7))


def test_baseline_trains_and_resumes_exactly_through_the_trainer(tmp_path: Path) -> None:
    assert {"baseline", "baselinepp"} <= set(HEADS)
    sets = ["model.name=baseline", "model.options={num_classes: 40, finetune_steps: 20}",
            "data.options={num_classes: 40}", "train.steps=6", "train.ckpt_every=3", "train.val_every=6",
            "train.val_episodes=6"]
    whole = train(load_config(TINY, sets + [f"out_dir={tmp_path / 'whole'}"]))
    assert whole.step == 6
    part = tmp_path / "part"
    train(load_config(TINY, sets + [f"out_dir={part}", "train.steps=3"]))
    train(load_config(TINY, sets + [f"out_dir={part}"]), resume=True)
    a = load_file(str(ckpt_io.list_checkpoints(tmp_path / "whole")[-1] / ckpt_io.WEIGHTS_FILE))
    b = load_file(str(ckpt_io.list_checkpoints(part)[-1] / ckpt_io.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    extra = [k for k in a if k.endswith("_extra_state")]
    assert extra and int((a[extra[0]] >= 0).sum()) > 3  # the class map is in the checkpoint
    # the CLI evaluates the checkpoint (rebuilds the model, loads weights and the class map)
    assert main(["eval", "--checkpoint", str(part), "--episodes", "6", "--no-progress"]) == 0


def test_glyph_without_num_classes_and_sinusoid_through_the_cli(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.name=baselinepp", "model.options={}"])
    with pytest.raises(ConfigError, match="model.options.num_classes"):
        build_model(cfg)
    capped = build_model(load_config(TINY, ["model.name=baselinepp", "model.options={}",
                                            "data.options={num_classes: 30}"]))
    assert capped.num_classes == 30  # counted from the training split
    out = tmp_path / "sin"
    assert main(["train", "--config", str(SINUSOID), "--set", f"out_dir={out}", "model.name=baseline",
                 "model.options={}", "train.steps=5", "train.meta_batch=5", "train.val_every=5",
                 "train.val_episodes=10", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
                 "train.num_threads=1"]) == 0
    assert ckpt_io.list_checkpoints(out)
