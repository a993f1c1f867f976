"""Every data set of the ``data`` group read from tiny files in its real format (gzip
idx, the CIFAR-100 pickle, SVHN's .mat, folders of PNG and JPEG), its facts, the
``data.classes`` relabelling, the models built from the facts, the flip rule, bad input
as one line with no result.json, and one DP run end to end per format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dp_sweeps.data import load_data, random_crop_flip
from dp_sweeps.errors import ConfigError
from dp_sweeps.run import build_model, run
from tests.helpers.datasets import write_cifar100, write_idx, write_image_folder, write_svhn
from tests.helpers.runs import TINY_CONVNET, compose_config, tiny_overrides

FORMATS = ("mnist", "fashion_mnist", "cifar100", "svhn", "image_folder")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    write_idx(root)
    write_idx(root, fashion=True, seed=1)
    write_cifar100(root)
    write_svhn(root)
    write_image_folder(root / "folder" / "train", per_class=60, fmt="png")
    write_image_folder(root / "folder" / "test", per_class=15, fmt="jpg", seed=1)
    return root


def overrides(name: str, root: Path, *extra: str, model: tuple = tuple(TINY_CONVNET)) -> list[str]:
    base = [f"data={name}", *tiny_overrides(root), *model]
    if name == "image_folder":
        base += [f"data.train_dir={root / 'folder' / 'train'}", f"data.test_dir={root / 'folder' / 'test'}"]
    return base + list(extra)


def load(name: str, root: Path, *extra: str):
    cfg = compose_config(overrides(name, root, *extra))
    return load_data(OmegaConf.to_container(cfg.data, resolve=True))


EXPECTED = {  # name: (train, test, channels, size, classes, flip keeps the label)
    "mnist": (300, 100, 1, 28, 10, False), "fashion_mnist": (300, 100, 1, 28, 10, True),
    "cifar100": (500, 200, 3, 32, 100, True), "svhn": (300, 100, 3, 32, 10, False),
    "image_folder": (180, 45, 3, 32, 3, True)}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_is_read_with_its_facts(name, tiny_root):
    data = load(name, tiny_root)
    train, test, channels, size, classes, flip = EXPECTED[name]
    assert data.train_x.shape == (train, channels, size, size) and data.test_x.shape == (test, channels, size, size)
    facts = data.facts
    assert (facts.name, facts.channels, facts.image_size, facts.num_classes, facts.hflip_preserves_label) == \
        (name, channels, size, classes, flip)
    assert set(data.train_y.tolist()) == set(range(classes)) and data.train_x.dtype == torch.float32
    # Standardised with the declared public constants: pixel 0 maps to -mean/std.
    assert data.train_x.min().item() >= min(-m / s for m, s in zip(facts.mean, facts.std)) - 1e-5


def test_svhn_label_ten_is_the_digit_zero(tiny_root):
    assert 0 in set(load("svhn", tiny_root).train_y.tolist())


def test_cifar100_reads_fine_labels(tiny_root):
    assert load("cifar100", tiny_root).train_y.max().item() > 19  # coarse labels stop at 19


def test_image_folder_resizes_greys_and_splits_off_a_test_set(tiny_root, tmp_path):
    data = load("image_folder", tiny_root, "data.test_dir=null", "data.test_fraction=0.25", "data.channels=1",
                "data.image_size=16")
    assert data.train_x.shape == (135, 1, 16, 16) and len(data.test_y) == 45
    again = load("image_folder", tiny_root, "data.test_dir=null", "data.test_fraction=0.25", "data.channels=1",
                 "data.image_size=16")
    assert torch.equal(data.test_x, again.test_x)  # the fixed split seed


def test_classes_are_kept_and_relabelled_in_order(tiny_root):
    full = load("mnist", tiny_root)
    kept = load("mnist", tiny_root, "data.classes=[7,2]")
    assert kept.facts.num_classes == 2 and kept.num_classes == 2
    assert kept.num_train == int(((full.train_y == 7) | (full.train_y == 2)).sum())
    assert set(kept.train_y.tolist()) == {0, 1}
    # Label 0 is the old 7: its images are the old class 7's.
    old_sevens = full.train_x[full.train_y == 7]
    assert {hash(x.numpy().tobytes()) for x in kept.train_x[kept.train_y == 0]} == \
        {hash(x.numpy().tobytes()) for x in old_sevens}


@pytest.mark.parametrize("model", ["convnet", "vit", "scatter_linear", "resnet18"])
def test_models_build_from_the_facts(model, tiny_root):
    data = load("mnist", tiny_root)
    small = {"convnet": ["model.width=4"], "vit": ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
             "scatter_linear": ["model.norm_groups=27"], "resnet18": ["model.width=8", "model.blocks_per_stage=[1,1]"]}
    cfg = compose_config(overrides("mnist", tiny_root, *small[model], model=(f"model={model}",)))
    net = build_model(cfg.model, data.facts)
    x = torch.zeros(2, 81, 7, 7) if model == "scatter_linear" else data.train_x[:2]
    assert net(x).shape == (2, 10)


def test_impossible_model_and_data_is_one_line_naming_both(tiny_root):
    data = load("mnist", tiny_root)
    cfg = compose_config(overrides("mnist", tiny_root, "model.patch_size=3", model=("model=vit",)))
    with pytest.raises(ConfigError, match="patch_size=3 does not divide data.image_size=28") as info:
        build_model(cfg.model, data.facts)
    assert "\n" not in str(info.value)


def test_no_flip_on_digits(tiny_root):
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    crops = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(crops, x)  # no padding: nothing but a flip could change the images
    flipped = [random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(f, x) for f in flipped)
    with pytest.raises(ValueError, match="hflip_preserves_label=false"):
        load("mnist", tiny_root).with_mirrors()


def _refused(cfg, out: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        run(cfg, out)
    assert "\n" not in str(info.value)
    assert not list(out.rglob("result.json"))


BAD_INPUT = {  # case: (data, overrides (tmp_path is {tmp}), the line's words)
    "eval_flip on digits": ("mnist", ["trainer.eval_flip=true"], "eval_flip=true: data=mnist"),
    "subset too large": ("mnist", ["data.train_subset=301"], "train_subset=301 exceeds the 300"),
    "missing folder": ("image_folder", ["data.train_dir={tmp}/missing"], "is not a folder"),
    "empty folder": ("image_folder", ["data.train_dir={tmp}"], "Couldn't find any class folder"),
    "missing data set": ("mnist", ["data.root={tmp}"], "MNIST not found"),
    "dp normalisation, classical model": ("image_folder", ["data.normalization=dp", "model=knn"], "normalization=dp"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_no_result(case, tiny_root, tmp_path):
    name, extra, match = BAD_INPUT[case]
    model = () if "model=knn" in extra else tuple(TINY_CONVNET)
    args = overrides(name, tiny_root, *(e.format(tmp=tmp_path) for e in extra), "trainer.batch_size=32", model=model)
    _refused(compose_config(args), tmp_path / "run", match)


def test_train_and_test_class_folders_must_match(tiny_root, tmp_path):
    other = write_image_folder(tmp_path / "other", classes=("cat", "dog", "bird"), per_class=2)
    _refused(compose_config(overrides("image_folder", tiny_root, f"data.test_dir={other}")), tmp_path / "a",
             r"class folders differ .*only in train \['fish'\], only in test \['bird'\]")


def test_unreadable_image_is_named_by_its_path(tiny_root, tmp_path):
    broken = write_image_folder(tmp_path / "broken", per_class=3)
    (broken / "dog" / "1.png").write_bytes(b"not a png")
    _refused(compose_config(overrides("image_folder", tiny_root, f"data.train_dir={broken}", "data.test_dir=null",
                                      "trainer.batch_size=4")),
             tmp_path / "b", f"unreadable image {broken / 'dog' / '1.png'}")


def test_label_outside_the_class_count_and_corrupt_idx(tmp_path):
    bad_labels = write_idx(tmp_path / "labels", labels_override=[12])
    _refused(compose_config(overrides("mnist", bad_labels)), tmp_path / "c", "label 12 is outside the 10 classes")
    corrupt = write_idx(tmp_path / "corrupt")
    (corrupt / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03short"))
    _refused(compose_config(overrides("mnist", corrupt)), tmp_path / "d", "MNIST under")


@pytest.mark.parametrize("name,what", [("mnist", "MNIST"), ("cifar100", "CIFAR-100"), ("svhn", "SVHN")])
def test_checksums_are_verified_by_default(name, what, tiny_root):
    with pytest.raises(ConfigError, match=f"{what} file .* fails its official md5"):
        load(name, tiny_root, "data.verify_checksums=true")


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_under_dp(name, tiny_root, tmp_path):
    """One tiny epoch of DP-SGD; the record names the data and its sizes."""
    cfg = compose_config(overrides(name, tiny_root, "privacy.epsilon=8", "privacy.accountant=rdp",
                                   "trainer.batch_size=32", "data.val_size=20", "data.augment=true"))
    result = run(cfg, tmp_path)
    recorded = json.loads((tmp_path / "result.json").read_text())
    train, test, channels, size, classes, _ = EXPECTED[name]
    assert result["status"] == "completed" and result["private"] and 0 < recorded["epsilon"] <= 8.0 + 1e-6
    assert {k: recorded[k] for k in ("data_name", "num_train", "num_val", "num_test", "channels", "image_size",
                                     "num_classes")} == {
        "data_name": name, "num_train": train - 20, "num_val": 20, "num_test": test, "channels": channels,
        "image_size": size, "num_classes": classes}
    assert 0.0 <= recorded["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_dp_normalization_is_charged_to_epsilon(tiny_root, tmp_path):
    """data.normalization=dp: the release enters the accountant (its entry is in the
    record), so σ is calibrated for the remaining budget and the run meets its ε."""
    from dp_sweeps.privacy.plan import plan_privacy

    cfg = compose_config(overrides("image_folder", tiny_root, "data.normalization=dp", "privacy.epsilon=8",
                                   "privacy.accountant=rdp", "trainer.batch_size=32"))
    result = run(cfg, tmp_path)
    assert result["prior_releases"] == [[8.0, 1.0, 2]] and result["normalization"] == "dp"
    assert result["status"] == "completed" and result["epsilon"] <= 8.0 + 1e-6
    plain = plan_privacy(cfg.privacy, num_train=result["num_train"], batch_size=32, epochs=1)
    assert plain.noise_multiplier < result["noise_multiplier"]  # the release costs budget: more noise

def test_dp_normalization_standardises_with_a_noisy_release(tiny_root):
    """The released statistics are noisy (fresh entropy: two releases differ) and close
    to the exact ones at σ=8 with clip √C over 180 images (noise std 8·√3/180 ≈ 0.08)."""
    from dp_sweeps.data.dp_normalization import release_normalization

    data = load("image_folder", tiny_root, "data.normalization=dp")
    assert data.facts.mean is None and data.train_x.min() >= 0 and data.train_x.max() <= 1
    settings = {"noise_multiplier": 8.0}
    first = release_normalization(data, settings=settings, private=True)
    second = release_normalization(data, settings=settings, private=True)
    exact = data.train_x.mean(dim=(0, 2, 3))
    assert first.facts.mean != second.facts.mean
    assert torch.allclose(torch.tensor(first.facts.mean), exact, atol=0.5)
    assert first.prior_releases == ((8.0, 1.0, 2),)
    mean, std = torch.tensor(first.facts.mean).view(1, -1, 1, 1), torch.tensor(first.facts.std).view(1, -1, 1, 1)
    assert torch.allclose(first.test_x, (data.test_x - mean) / std, atol=1e-5)
    none = release_normalization(data, settings=settings, private=False)
    assert none.prior_releases == () and torch.allclose(torch.tensor(none.facts.mean), exact, atol=1e-4)


@pytest.mark.slow
def test_scatter_linear_recipe_trains_on_mnist(tiny_root, tmp_path):
    """experiment=tramer_boneh_scatter_linear data=mnist end to end on the tiny copy: the
    scattering at 28x28x1, the DP data normalisation charged to ε, one epoch of DP-SGD."""
    cfg = compose_config(["data=mnist", *tiny_overrides(tiny_root), "experiment=tramer_boneh_scatter_linear",
                          "trainer.batch_size=64", "trainer.physical_batch_size=64", "privacy.accountant=rdp",
                          f"data.feature_cache={tmp_path / 'cache'}"])
    result = run(cfg, tmp_path / "run")
    assert result["status"] == "completed" and result["data_name"] == "mnist" and result["channels"] == 1
    assert result["parameters"] == 81 * 7 * 7 * 10 + 10 and result["prior_releases"] == [[8.0, 1.0, 2]]
    assert result["epsilon"] <= 3.0 + 1e-6

@pytest.mark.slow  # kymatio builds its filters: seconds
def test_scattering_of_grey_28x28_images_feeds_the_scatter_models(tiny_root):
    """MNIST's ScatterNet features: 81 maps of 7x7 per image, read by both scatter models
    (the MNIST CNN head of the recipe included)."""
    from dp_sweeps.data.features.scattering import scattering

    data = load("mnist", tiny_root)
    features = scattering(data.train_x[:4])
    assert features.shape == (4, 81, 7, 7)
    for model, extra in (("scatter_linear", ()), ("scatter_cnn", ("model.layers=[{conv: 16, stride: 2}, 32]",
                                                                  "model.hidden=32"))):
        cfg = compose_config(overrides("mnist", tiny_root, *extra, model=(f"model={model}",)))
        assert build_model(cfg.model, data.facts)(features).shape == (4, 10)


def test_pixel_bounds_follow_the_data_facts(tiny_root):
    """The bounds Naive Bayes relies on come from the data's public constants and hold
    on its features (grey one-channel data included)."""
    from dp_sweeps.data.features.pixels import feature_bounds, pixels

    data = load("mnist", tiny_root)
    for spec in ({"name": "pixels", "size": 8, "grey": False}, {"name": "pixels", "size": 8, "grey": True}):
        settings = {k: v for k, v in spec.items() if k != "name"}
        features = pixels(data.train_x, data_facts=data.facts, **settings).flatten(1).numpy()
        lower, upper = feature_bounds(spec, data_facts=data.facts)
        assert features.shape[1] == len(lower) and (features >= lower - 1e-5).all() and (features <= upper + 1e-5).all()
        assert lower.min() == pytest.approx(-0.1307 / 0.3081, rel=1e-4)  # MNIST's constants, not CIFAR-10's


@pytest.mark.parametrize("experiment", ["paper_epsilon", "paper_classical", "tramer_boneh_scatter_linear",
                                        "tramer_boneh_scatter_cnn"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_experiments_compose_and_build_on_other_data(experiment, name, tiny_root):
    """experiment=paper_* on any data choice, and the ScatterNet recipes on MNIST and
    Fashion-MNIST (their own values merged): every model of the sweep builds for the data."""
    # The experiment's own values (the tiny overrides would replace its batch size).
    cfg = compose_config([f"experiment={experiment}", f"data={name}", f"data.root={tiny_root}"]
                         + (["scale=smoke"] if experiment.startswith("paper") else []))
    if experiment.startswith("tramer"):
        recipe = {"mnist": {"tramer_boneh_scatter_linear": (4096, 8.0), "tramer_boneh_scatter_cnn": (1024, 1.0)},
                  "fashion_mnist": {"tramer_boneh_scatter_linear": (8192, 16.0),
                                    "tramer_boneh_scatter_cnn": (2048, 4.0)}}[name][experiment]
        assert (cfg.trainer.batch_size, cfg.optimizer.lr) == recipe
        assert cfg.trainer.eval_flip is (name == "fashion_mnist")
        build_model(cfg.model, load(name, tiny_root).facts)
    else:
        assert cfg.trainer.eval_flip is False and cfg.data.name == name
