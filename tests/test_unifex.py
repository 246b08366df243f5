"""The UniFEx recipe inside the trainer: presets, merged labels, freezing, layer decay, end-to-end runs, export."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import timm
import torch

from main_unic import main as train_main
from tests.conftest import run_entry
from unic.config import ConfigError, load_config
from unic.data.csv_list import csv_dataset, read_csv_split, write_csv_split
from unic.data.uned import DataFormatError, read_info_file
from unic.io import load_checkpoint
from unic.models.unifex import MergedLabels, build_unifex_model, load_unifex
from unic.train.plan import build_plan, format_plan

PRESET = "unifex_m4d35k_siglip_so400m"
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}
DOMAINS = ("shapes", "gratings", "blobs")


def _kwargs_text(kwargs: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"


def _metrics(out_dir, split="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def merged_csv(tmp_path_factory, demo_root) -> str:
    """Three demo domains as one UniFEx CSV (``img_path,label``, labels offset per domain as M4D-35k's
    source data sets are), the images copied under the CSV's root; a val CSV alike."""
    root = tmp_path_factory.mktemp("m4d")
    for split in ("train", "val"):
        rows = []
        for d, domain in enumerate(DOMAINS):
            os.makedirs(root / domain, exist_ok=True)
            for path, labels in read_info_file(demo_root, domain, split):
                rel = f"{domain}/{os.path.basename(path)}"
                shutil.copy(path, root / rel)
                rows.append((rel, 8 * d + labels[0]))
        write_csv_split(str(root / f"m4d_{split}.csv"), rows)
    return str(root)


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> str:
    """A tiny timm ViT's random weights, saved as a timm state dict (the layout of timm's weight files)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def unifex_overrides(root: str, out: str, weights: str, **extra) -> list[str]:
    """The paper preset with the backbone shrunk to a tiny random timm ViT on the merged demo CSV."""
    values = {
        "unifex.backbone": "timm:vit_tiny_patch16_224", "unifex.weights": weights,
        "unifex.kwargs": _kwargs_text(TINY_VIT), "unifex.img_size": 32,
        "data.root": root, "data.train_split": "m4d_train", "data.val_split": "m4d_val",
        "data.global_batch": 16, "data.num_workers": 0, "optim.epochs": 1, "optim.warmup_epochs": 0.25,
        "train.log_every": 1, "train.validate": False, "train.save_every": 0, "run.output_dir": out,
    }
    values.update(extra)
    return ["--config", PRESET, *[f"{k}={v}" for k, v in values.items()]]


# ------------------------------------------------------------------------------------------------ presets
def test_paper_preset_builds_uniFEx_siglip_model_and_its_parameter_claims():
    """SigLIP So400m/14 at 384 frozen, Linear 1152 -> 64, sub-centre ArcFace (k 3) over M4D-35k's 34.8k
    classes. The paper: 32 % fewer parameters than the leaderboard's first (a fully trained ViT-H/14, 632.1M)
    and 289x fewer trainable ones."""
    import open_clip

    cfg = load_config(PRESET, ["data.root=/nonexistent"])
    plan = build_plan(cfg, world_size=1, num_train_images=328_400, num_classes=34_800)
    u = plan["unifex"]
    assert (u["feature_dim"], u["img_size"], u["blocks"], u["mean"]) == (1152, 384, 27, [0.5, 0.5, 0.5])
    assert u["params"] == 428_225_600 and u["trainable_params"] == 0  # the frozen backbone
    assert u["neck_params"] == 1152 * 64 + 64 and u["head_params"] == 34_800 * 3 * 64
    assert u["total_trainable_params"] == 1152 * 64 + 64 + 34_800 * 3 * 64
    sch = plan["schedule"]
    assert (sch["global_batch"], sch["lr"], sch["min_lr"], sch["optimizer"]) == (128, 0.02, 1e-3, "adam")
    assert (sch["steps_per_epoch"], sch["warmup_steps"], sch["total_steps"]) == (2565, 2565, 25_650)
    text = format_plan(plan)
    assert "frozen (27 blocks)" in text and "34800 merged classes" in text and "global 128" in text
    with torch.device("meta"):
        vit_h = sum(p.numel() for p in open_clip.create_model("ViT-H-14", device=torch.device("meta")).visual.parameters())
    assert vit_h == 632_076_800
    assert round(1 - u["total_params"] / vit_h, 2) == 0.31  # with the k = 3 head; the backbone + neck alone:
    assert round(1 - (u["params"] + u["neck_params"]) / vit_h, 2) == 0.32  # the paper's "32 % fewer"
    # 289x fewer trainable parameters matches a head of one centre per class (274.7x), not the k = 3 of the
    # released config (93.6x)
    k1 = u["neck_params"] + 34_800 * 64
    assert abs(vit_h / k1 / 289 - 1) < 0.06 and round(vit_h / u["total_trainable_params"], 1) == 93.6

    clip = build_plan(load_config("unifex_m4d35k_clip_vitb16", ["data.root=/nonexistent"]), num_classes=34_800)
    c = clip["unifex"]
    assert (c["feature_dim"], c["img_size"], c["params"], c["neck_params"]) == (768, 224, 85_799_424, 768 * 64 + 64)


def test_recipe_checks():
    base = ["unifex.enabled=true", "unifex.backbone=timm:vit_tiny_patch16_224", "loss.w_distill=0",
            "udon.enabled=false"]
    for extra, message in [
        (["loss.w_distill=1"], "trains alone"),
        (["unifex.backbone=timm:vit_tiny_patch16_2244"], "timm has no model.*did you mean 'vit_tiny_patch16_224'"),
        (["unifex.backbone=clip:ViT-B-16"], "timm:<model>"),
        (["unifex.backbone=open_clip:ViT-B-16:nope"], "no pretrained tag 'nope'"),
        (["unifex.neck=avg"], "unifex.neck"),
        (["unifex.neck=pool"], "nothing the descriptor uses"),
        (["unifex.layer_decay=0"], "layer_decay"),
        (["unifex.dropout=1"], "dropout"),
        (["heads.init=xavier"], "heads.init"),
        (["heads.name=adacos", "heads.m=0.5"], "'heads.m' does not apply"),
        (["optim.optimizer=sgd"], "optim.optimizer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + extra)
    with pytest.raises(ConfigError, match="heads.init"):  # UniFEx's init is for its own head only
        load_config(None, ["heads.init=xavier_uniform"])
    assert load_config(None, base + ["heads.init=xavier_uniform", "unifex.neck=pool",
                                     "unifex.unfreeze_last_blocks=1"]).unifex.neck == "pool"


# ------------------------------------------------------------------------------------------------ data
def test_csv_reader_and_merged_label_space(merged_csv, tmp_path):
    rows = read_csv_split(merged_csv, "m4d_train")
    assert len(rows) == 3 * 8 * 18 and {r[2] for r in rows} == {"default"}  # no domain column: one space
    ds = csv_dataset(merged_csv, "m4d_train")
    merged = MergedLabels([sorted({s[1][0] for s in ds.samples})])
    assert merged.num_classes == 24 and merged(torch.zeros(3, dtype=torch.long), torch.tensor([0, 9, 23])).tolist() == [0, 9, 23]
    # per-domain labels (UnED info files, or a CSV domain column): domain d's classes follow the previous ones
    labels = MergedLabels([[0, 1, 2], [5, 7], [0, 100]])
    assert (labels.num_classes, labels.offsets) == (7, [0, 3, 5])
    rows_B = labels(torch.tensor([0, 1, 1, 2, 2]), torch.tensor([2, 5, 7, 0, 100]))
    assert rows_B.tolist() == [2, 3, 4, 5, 6]
    assert labels.class_counts([("a", [5], 1), ("b", [5], 1), ("c", [100], 2)]) == [0, 0, 0, 2, 0, 0, 1]
    write_csv_split(str(tmp_path / "d.csv"), [("x/a.jpg", 3, "cars"), ("y/b.jpg", 3, "food")])
    ds = csv_dataset(str(tmp_path), "d")
    assert ds.domain_names == ["cars", "food"] and [s[2] for s in ds.samples] == [0, 1]
    (tmp_path / "bad.csv").write_text("img_path,label\n../escape.jpg,1\n")
    with pytest.raises(DataFormatError, match="escapes"):
        read_csv_split(str(tmp_path), "bad")
    (tmp_path / "bad2.csv").write_text("path,class\na.jpg,1\n")
    with pytest.raises(DataFormatError, match="no column"):
        read_csv_split(str(tmp_path), "bad2")
    with pytest.raises(FileNotFoundError, match="CSV splits in"):
        read_csv_split(str(tmp_path), "missing")


# ------------------------------------------------------------------------------------------------ freezing
def test_last_blocks_unfreeze_exactly_and_layer_decay_is_timms(tmp_path):
    """Last-N unfreezing trains those blocks and what follows them (a ViT's final norm, a CNN's last
    stage's block), nothing else; the per-parameter lrs are timm's ``param_groups_layer_decay``."""
    from timm.optim import param_groups_layer_decay

    from unic.train.optim import apply_schedules, layer_decay_groups

    kwargs = {**TINY_VIT, "depth": 4}
    model = build_unifex_model("timm:vit_tiny_patch16_224", "random", kwargs, img_size=32, unfreeze_last_blocks=2)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
               for n, p in model.backbone.model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.2", "blocks.3", "norm"}
    groups = layer_decay_groups(model.backbone, 0.05, "backbone", layer_decay=0.5)
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    apply_schedules(optimizer, {"backbone": (1e-3, 0.05)})
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    official = param_groups_layer_decay(model.backbone.model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.backbone.model.named_parameters()}
    checked = 0
    for group in official:
        for p in group["params"]:
            assert lr_of[id(p)] == pytest.approx(1e-3 * group["lr_scale"]), names[id(p)]
            checked += 1
    assert checked == len(lr_of) == sum(1 for p in model.backbone.parameters() if p.requires_grad)
    assert sorted({round(g["lr"], 8) for g in optimizer.param_groups}) == [5e-4, 1e-3]  # block 2; block 3 + norm

    cnn = build_unifex_model("timm:test_resnet", "random", img_size=32, unfreeze_last_blocks=1)
    trained = {n for n, p in cnn.backbone.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("layer4.") for n in trained)
    cnn.train()
    assert cnn.backbone.model.layer4[0].bn1.training and not cnn.backbone.model.layer3[0].bn1.training
    assert not cnn.backbone.model.bn1.training and cnn.neck.training
    with pytest.raises(ValueError, match="has 4 blocks"):
        build_unifex_model("timm:test_resnet", "random", unfreeze_last_blocks=5)


def test_open_clip_backbone_from_a_file_drops_its_projection(tmp_path):
    """open_clip:<arch> with a local checkpoint: the pooled ln_post feature (projection dropped, UniFEx's
    proj_layer False) or the projected embedding; the resblocks are its blocks."""
    import open_clip

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "unic-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "unic-tiny-clip.json"))
    reference = open_clip.create_model("unic-tiny-clip").eval()
    torch.save(reference.state_dict(), tmp_path / "clip.pth")
    x = torch.randn(2, 3, 32, 32)
    projected = build_unifex_model("open_clip:unic-tiny-clip", str(tmp_path / "clip.pth"), proj_layer=True).eval()
    torch.testing.assert_close(projected(x)["feature"], reference.encode_image(x))
    pooled = build_unifex_model("open_clip:unic-tiny-clip", str(tmp_path / "clip.pth"), unfreeze_last_blocks=1)
    assert pooled.backbone.feature_dim == 32 and pooled.eval()(x)["feature"].shape == (2, 32)
    trained = {n for n, p in pooled.backbone.model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in reference.visual.named_parameters()
                       if n.startswith(("transformer.resblocks.1.", "ln_post."))}


# ------------------------------------------------------------------------------------------------ runs
def test_recipe_trains_exports_and_resumes(tmp_path, merged_csv, vit_weights):
    """The paper preset (tiny ViT backbone) on the merged CSV: the backbone stays bit-identical, the neck and
    head train, the export gives the descriptor an independent timm + Linear computation gives, and a run
    stopped at step 3 and resumed ends with the weights of an uninterrupted one."""
    from unic.eval.encoders import Encoder

    straight = tmp_path / "straight"
    assert train_main(unifex_overrides(merged_csv, str(straight), vit_weights, **{"train.max_steps": 6})) == 0
    losses = [r["loss/unifex"] for r in _metrics(straight)]
    assert len(losses) == 6 and all(0 < v < 100 for v in losses)
    ckpt = load_checkpoint(str(straight / "checkpoint.pth"))
    original = torch.load(vit_weights)
    for key, value in original.items():
        assert torch.equal(ckpt["model"][f"backbone.model.{key}"], value), key  # frozen: bit-identical
    head = ckpt["model"]["unifex.head.weight"]
    assert head.shape == (24 * 3, 64)
    plan = json.loads((straight / "plan.json").read_text())
    assert plan["unifex"]["num_classes"] == 24 and plan["unifex"]["trainable_params"] == 0

    export = load_checkpoint(str(straight / "unifex.pth"))
    assert export["format"] == "unic-unifex" and export["img_size"] == 32 and export["mean"] == [0.5, 0.5, 0.5]
    model, img_size, mean, std = load_unifex(str(straight / "unifex.pth"))
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).eval()
    reference.load_state_dict(original)
    neck = export["neck"]["state_dict"]
    x = torch.randn(3, 3, 32, 32)
    expected = reference(x) @ neck["1.weight"].T + neck["1.bias"]
    torch.testing.assert_close(model(x)["embedding"], expected)
    encoder = Encoder(model, "universal", img_size, mean, std)  # what load_encoder builds from the file
    torch.testing.assert_close(encoder(x), expected)
    torch.testing.assert_close(load_unifex(str(straight / "checkpoint.pth"))[0](x)["embedding"], expected)
    backbone_only = load_unifex(str(straight / "unifex.pth"), "backbone")[0]
    torch.testing.assert_close(Encoder(backbone_only, "backbone", img_size, mean, std)(x), reference(x))

    resumed = tmp_path / "resumed"
    assert train_main(unifex_overrides(merged_csv, str(resumed), vit_weights, **{"train.max_steps": 3})) == 0
    assert train_main(unifex_overrides(merged_csv, str(resumed), vit_weights, **{"train.max_steps": 6})) == 0
    a, b = ckpt["model"], load_checkpoint(str(resumed / "checkpoint.pth"))["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cnn_backbone_with_its_last_block_trained(tmp_path, merged_csv):
    """A timm CNN through forward_features + global pooling, its last block trained (BatchNorm in train
    mode there); the frozen layers' weights and BatchNorm statistics do not move."""
    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=0)
    torch.save(cnn.state_dict(), tmp_path / "resnet.pth")
    out = tmp_path / "cnn"
    assert train_main(unifex_overrides(merged_csv, str(out), str(tmp_path / "resnet.pth"), **{
        "unifex.backbone": "timm:test_resnet", "unifex.kwargs": "{}", "unifex.unfreeze_last_blocks": 1,
        "unifex.layer_decay": 0.5, "unifex.backbone_lr_scale": 0.1, "train.max_steps": 3,
        "train.validate": True, "train.validate_first": True})) == 0
    val = _metrics(out, "val")[-1]  # the descriptor scored during training: kNN top-1 and R@1 per domain
    assert val["step"] == 0 and 0 <= val["knn20_top1"] <= 1 and 0 <= val["universal_R@1"] <= 1
    state = load_checkpoint(str(out / "checkpoint.pth"))["model"]
    original = cnn.state_dict()
    for key, value in original.items():
        if key.startswith("layer4."):
            continue
        assert torch.equal(state[f"backbone.model.{key}"], value), key
    assert not torch.equal(state["backbone.model.layer4.0.conv1.weight"], original["layer4.0.conv1.weight"])
    assert not torch.equal(state["backbone.model.layer4.0.bn1.running_mean"], original["layer4.0.bn1.running_mean"])


def test_two_processes_match_one_with_and_without_partial_fc(tmp_path, merged_csv, vit_weights):
    """torchrun with 2 gloo processes = 1 process, step by step: the replicated head (its gradients averaged
    by hand, the neck's by DDP) and Partial FC at rate 1 (centres sharded over the 2 ranks, never all-reduced),
    whose checkpoint resumes on 1 process (its centres and their Adam state gathered in class order) and
    continues as the uninterrupted 1-process run. Neck dropout off: its masks differ per process by design."""
    common = {"unifex.dropout": 0.0, "optim.lr": 1e-4}
    one, two, pfc = tmp_path / "one", tmp_path / "two", tmp_path / "pfc"
    assert train_main(unifex_overrides(merged_csv, str(one), vit_weights, **common, **{"train.max_steps": 4})) == 0
    result = run_entry(["main_unic.py", *unifex_overrides(merged_csv, str(two), vit_weights, **common,
                                                          **{"train.max_steps": 4})], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_entry(["main_unic.py", *unifex_overrides(merged_csv, str(pfc), vit_weights, **common, **{
        "train.max_steps": 2, "heads.partial_fc": 1.0})], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = load_checkpoint(str(pfc / "checkpoint.pth"))
    assert state["partial_fc"]["unifex"]["weight"].shape == (24 * 3, 64) and "unifex.head.weight" not in state["model"]
    assert train_main(unifex_overrides(merged_csv, str(pfc), vit_weights, **common, **{
        "train.max_steps": 4, "heads.partial_fc": 1.0})) == 0  # resumed on 1 process
    m1, m2, mp = _metrics(one), _metrics(two), _metrics(pfc)
    assert len(m1) == len(m2) == len(mp) == 4
    for r1, r2, rp in zip(m1, m2, mp):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=1e-5)
        assert rp["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=1e-5)
    w1 = load_checkpoint(str(one / "checkpoint.pth"))
    w2 = load_checkpoint(str(two / "checkpoint.pth"))["model"]
    wp = load_checkpoint(str(pfc / "checkpoint.pth"))
    for key in w1["model"]:
        torch.testing.assert_close(w1["model"][key], w2[key], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(wp["partial_fc"]["unifex"]["weight"], w1["model"]["unifex.head.weight"],
                               rtol=1e-3, atol=1e-5)


def test_partial_fc_samples_classes_in_the_trainer(tmp_path, merged_csv, vit_weights):
    """heads.partial_fc < 1: a seeded draw of the global batch's classes plus others each step; it trains."""
    out = tmp_path / "sampled"
    assert train_main(unifex_overrides(merged_csv, str(out), vit_weights, **{
        "train.max_steps": 2, "heads.partial_fc": 0.5, "heads.name": "curricularface", "heads.k": 1})) == 0
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    state = load_checkpoint(str(out / "checkpoint.pth"))
    assert state["partial_fc"]["unifex"]["weight"].shape == (24, 64) and "unifex.head.head.t" in state["model"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["unifex"]["partial_fc"] == 0.5 and plan["unifex"]["head_params_per_rank"] == 24 * 64
    with pytest.raises(ConfigError, match="heads.partial_fc"):
        load_config(PRESET, ["heads.partial_fc=0"])


def test_recipe_on_uned_info_files_evaluates_with_main_retrieval(tmp_path, demo_root, vit_weights):
    """The merged label space of UnED info files (labels offset per domain); the exported descriptor through
    main_retrieval's UnED protocol once load_encoder reads the format (unic.eval.encoders' hook)."""
    from main_retrieval import main as retrieval_main
    from unic.eval.encoders import load_encoder

    out = tmp_path / "uned"
    assert train_main(unifex_overrides(demo_root, str(out), vit_weights, **{
        "data.dataset": "demo", "data.domains": "[shapes,gratings]", "data.train_split": "train",
        "data.val_split": "val", "train.max_steps": 2})) == 0
    export = load_checkpoint(str(out / "unifex.pth"))
    assert export["domains"] == ["shapes", "gratings"] and export["num_classes"] == 16
    encoder = load_encoder(str(out / "unifex.pth"))
    assert encoder.kind == "universal" and encoder.img_size == 32 and encoder.embed_dim == 64
    uned = tmp_path / "retrieval_uned"
    assert retrieval_main([f"model.source={out / 'unifex.pth'}", "data.dataset=uned", f"data.root={demo_root}",
                           "data.domains=[shapes,gratings]", "data.num_workers=0", f"run.output_dir={uned}"]) == 0
    results = json.loads((uned / "results.json").read_text())
    assert list(results["merged"]) == ["shapes", "gratings", "average"]
    assert all(0 <= scores["R@1"] <= 1 for scores in results["merged"].values())
    # the folder R@k protocol (SOP / CUB / Cars layout: root/<class>/<image>, leave-one-out)
    folder = tmp_path / "folder"
    for path, labels in read_info_file(demo_root, "shapes", "test"):
        os.makedirs(folder / f"class{labels[0]}", exist_ok=True)
        shutil.copy(path, folder / f"class{labels[0]}")
    recall = tmp_path / "retrieval_folder"
    assert retrieval_main([f"model.source={out / 'unifex.pth'}", "data.dataset=folder", f"data.root={folder}",
                           "data.num_workers=0", f"run.output_dir={recall}"]) == 0
    scores = next(iter(json.loads((recall / "results.json").read_text())["separate"].values()))
    assert 0 <= scores["R@1"] <= scores["R@2"] <= scores["R@4"] <= 1


def test_udon_domain_heads_train_and_resume_with_partial_fc(tmp_path, demo_root):
    """heads.partial_fc reaches UDON's per-domain classifiers too: their centres are checkpointed by
    full_state (every domain's teacher and universal classifier) and the run resumes."""
    from tests.conftest import tiny_overrides

    out = tmp_path / "udon_pfc"
    extra = {"heads.partial_fc": 0.5, "train.validate": False, "loss.w_distill": 0.0, "udon.update_every": 2}
    assert train_main(tiny_overrides(demo_root, str(out), **extra, **{"train.max_steps": 2})) == 0
    assert train_main(tiny_overrides(demo_root, str(out), **extra, **{"train.max_steps": 4})) == 0
    state = load_checkpoint(str(out / "checkpoint.pth"))
    assert state["step"] == 4
    assert sorted(state["partial_fc"]) == [f"udon.{kind}_classifiers.{d}" for kind in ("teacher", "universal")
                                           for d in ("gratings", "shapes")]
    assert state["partial_fc"]["udon.teacher_classifiers.shapes"]["weight"].shape == (8, 256)
    assert [r["step"] for r in _metrics(out)] == [2, 4]


def test_bench_measures_the_recipe_and_its_baseline(merged_csv, vit_weights, tmp_path, capsys):
    """bench_train.py on the UniFEx recipe: its steps get the merged labels the trainer gives them."""
    import json

    from unic.train.bench import main as bench_main

    assert bench_main(["--warmup", "0", "--steps", "1", "--baseline",
                       *unifex_overrides(merged_csv, str(tmp_path / "ignored"), vit_weights)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.rindex("\n{\n") + 1:])
    assert result["fast"]["student"] == "timm:vit_tiny_patch16_224" and result["fast"]["img_size"] == 32
    assert result["baseline"]["images_per_s"] > 0


def test_trained_backbone_blocks_follow_the_scaled_cosine():
    """With unifex.backbone_lr_scale the trained blocks' cosine is the head's scaled, floor included: it never
    rises (the preset's floor optim.min_lr = 1e-3 is above 2e-2 * 0.01)."""
    import numpy as np

    from unic.train.build import build_schedules

    cfg = load_config(PRESET, ["data.root=/nonexistent", "unifex.unfreeze_last_blocks=2",
                               "unifex.backbone_lr_scale=0.01"])
    schedules = build_schedules(cfg, 128, 100)
    head, backbone = schedules.lr["unic"], schedules.lr["backbone"]
    warm = round(cfg.optim.warmup_epochs * 100)
    assert np.all(np.diff(backbone[warm:]) <= 0) and backbone[-1] < backbone[warm]
    np.testing.assert_allclose(backbone, head * 0.01, rtol=1e-9)
