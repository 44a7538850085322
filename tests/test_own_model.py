"""Your own model: ``load_model`` / ``unleash evaluate --model torchvision:NAME --weights``, its
checks against the benchmark, its preprocessing, and mixed-precision evaluation."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

from unleash_ood import HeadSplit, Preprocess, load_model
from unleash_ood.checkpoint import load_checkpoint, own_model_spec, save_checkpoint
from unleash_ood.cli import main
from unleash_ood.errors import UserError
from unleash_ood.evaluate import evaluate, forward_outputs, shard_bounds
from unleash_ood.models import ExternalModel, create_model
from unleash_ood.models.adapter import IMAGENET_MEAN, IMAGENET_STD
from unleash_ood.models.external import torchvision_classifier
from unleash_ood.models.watermark import Watermarked

GREY = Preprocess(gray_to_rgb=True)


@pytest.fixture(scope="module")
def small_benchmark(tiny_benchmark):
    """The tiny Fashion-MNIST with 60 images per set and two OOD sets: fast for a ResNet."""
    b = tiny_benchmark
    cut = {name: data.subset(torch.arange(60)) for name, data in b.ood_test.items()}
    return replace(
        b,
        id_train=b.id_train.subset(torch.arange(60)),
        id_val=b.id_val.subset(torch.arange(60)),
        id_test=b.id_test.subset(torch.arange(60)),
        ood_test={k: cut[k] for k in ("mnist", "letters")},
        ood_val={},
        ood_groups={},
        excluded_from_mean=(),
    )


def resnet18(num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# --- the API ---------------------------------------------------------------------------------


def test_api_end_to_end_with_random_weights(small_benchmark) -> None:
    b = small_benchmark
    model = load_model(
        "torchvision:resnet18",
        "none",
        num_classes=b.num_classes,
        input_shape=b.image_shape,
        preprocess=GREY,
    )
    assert (model.head_name, model.num_classes, model.feature_dim) == ("fc", 10, 512)
    ev = evaluate(model, b, "msp,energy,mahalanobis", device="cpu", batch_size=32, progress=False)
    assert set(ev.scorers()) == {"msp", "energy", "mahalanobis"}
    assert {r["dataset"] for r in ev.rows} == {"mnist", "letters", "mean"}
    assert 0.0 <= ev.row("energy")["auroc"] <= 1.0


def test_random_weights_are_the_same_every_time() -> None:
    a = load_model("torchvision:resnet18", "none", num_classes=3)
    b = load_model("torchvision:resnet18", "none", num_classes=3)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix) -> None:
    """A fine-tuned 7-class state dict comes back with its own head, logits unchanged."""
    net = resnet18(7)
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = load_model("torchvision:resnet18", path, num_classes=7, input_shape=(3, 24, 24))
    x = torch.rand(4, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), net(normalised(x)), atol=1e-5)
    assert model.source["weights"] == str(path)


def test_pth_under_a_state_dict_key_is_read(tmp_path) -> None:
    net = resnet18(5)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
    assert load_model("torchvision:resnet18", path, num_classes=5).num_classes == 5


def test_head_found_automatically() -> None:
    model = load_model("torchvision:mobilenet_v3_small", "none", num_classes=4)
    assert model.head_name == "classifier.3"
    named = load_model("torchvision:mobilenet_v3_small", "none", num_classes=4, head="classifier.3")
    assert named.head_name == "classifier.3"


def test_class_map_keeps_the_mapped_outputs_in_benchmark_order(tmp_path) -> None:
    net = resnet18(20)
    weights = tmp_path / "r20.pth"
    torch.save(net.state_dict(), weights)
    mapping = {str(c): 2 * c + 1 for c in range(10)}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    model = load_model(
        "torchvision:resnet18", weights, num_classes=10, class_map=tmp_path / "map.json"
    )
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), net(normalised(x))[:, 1::2], atol=1e-5)
    assert model.source["class_map"] == [2 * c + 1 for c in range(10)]


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({str(c): c for c in range(9)}, "missing [9]"),
        ({**{str(c): c for c in range(10)}, "10": 11}, "not classes of the benchmark [10]"),
        ({**{str(c): c for c in range(9)}, "9": 20}, "not a model output in 0..19"),
        ({**{str(c): c for c in range(9)}, "9": 0}, "same model output"),
        ({**{str(c): c for c in range(9)}, "nine": 9}, "not a class index"),
        (list(range(10)), "holds a JSON list"),
    ],
)
def test_bad_class_maps_are_refused(tmp_path, mapping, message) -> None:
    weights = tmp_path / "r20.pth"
    torch.save(resnet18(20).state_dict(), weights)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(UserError, match=re.escape(message)):
        load_model("torchvision:resnet18", weights, num_classes=10, class_map=path)


# --- mismatches: one line, before any work -----------------------------------------------------


def test_head_class_count_must_match_the_benchmark(tmp_path) -> None:
    torch.save(resnet18(1000).state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(
        UserError, match=r"predicts 1000 classes but the benchmark has 10.*class-map"
    ):
        load_model("torchvision:resnet18", tmp_path / "imagenet.pth", num_classes=10)


def test_channels_must_match_the_images() -> None:
    with pytest.raises(
        UserError, match=r"takes 3-channel images but the data's have 1.*gray-to-rgb"
    ):
        load_model("torchvision:resnet18", "none", num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(UserError, match=r"--gray-to-rgb repeats a grey channel.*3 channels"):
        load_model(
            "torchvision:resnet18", "none", num_classes=10, input_shape=(3, 8, 8), preprocess=GREY
        )


def test_input_size_the_model_cannot_take_is_one_line() -> None:
    with pytest.raises(UserError, match=r"torchvision:alexnet cannot run on 3x16x16 images") as e:
        load_model("torchvision:alexnet", "none", num_classes=10, input_shape=(3, 16, 16))
    assert "\n" not in str(e.value) and "--resize" in str(e.value)


@pytest.mark.parametrize(
    "spec, head, message",
    [
        ("timm:resnet18", None, "needs timm, which is not installed: pip install timm"),
        ("torchvision:no_such_net", None, "unknown torchvision classifier 'no_such_net'"),
        ("resnet18", None, "give torchvision:NAME or timm:NAME"),
        ("torchvision:squeezenet1_0", None, "SqueezeNet has no nn.Linear layer"),
        ("torchvision:resnet18", "layer4", "'layer4' in ResNet is a Sequential, not an nn.Linear"),
        ("torchvision:resnet18", "nope", "ResNet has no module named 'nope'"),
    ],
)
def test_bad_model_specs(spec, head, message) -> None:
    with pytest.raises(UserError, match=message):
        load_model(spec, "none", num_classes=10, head=head)


@pytest.mark.parametrize(
    "content, name, message",
    [
        (None, "weights.bin", "expected a .safetensors, .pth, .pt file"),
        (None, "torchvision:ResNet18_Weights.IMAGENET1K_V1", "never does; download the file"),
        (None, "absent.pth", "does not exist"),
        (b"not a safetensors file", "w.safetensors", "not a readable safetensors file"),
        ("module", "w.pth", "cannot be read as a state dict without unpickling code"),
        ("list", "w.pth", "holds a list, not a state dict"),
        ("other", "w.pth", r"does not fit torchvision:resnet18 \(missing"),
    ],
)
def test_bad_weight_files(tmp_path, content, name, message) -> None:
    path = tmp_path / name
    if content == "module":
        torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, refused by weights_only
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "other":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    elif name.endswith(".bin"):
        path.write_bytes(b"")
    weights = name if name.startswith("torchvision:") else path
    with pytest.raises(UserError, match=message):
        load_model("torchvision:resnet18", weights, num_classes=10)


def test_evaluator_refuses_the_silent_mismatches_of_a_bare_headsplit(small_benchmark) -> None:
    """The report that started this: ImageNet's 1000-class head on 10 classes, and 3-channel
    statistics broadcast over grey images, used to run to the end with accuracy 0."""
    wrapped = HeadSplit(torchvision.models.resnet18(), head="fc")
    with pytest.raises(UserError, match=r"predicts 1000 classes but fmnist has 10"):
        evaluate(wrapped, small_benchmark, "msp", device="cpu")
    rgb = create_model("cnn", num_classes=10, in_channels=3, width=4)
    with pytest.raises(UserError, match=r"takes 3-channel images but fmnist's have 1.*gray_to_rgb"):
        evaluate(rgb, small_benchmark, "msp", device="cpu")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )  # fmt: skip
    grey = ExternalModel(net, "3", GREY, (0.5,) * 3, (0.25,) * 3)
    assert evaluate(grey, small_benchmark, ["msp"], device="cpu", progress=False).row("msp")


def test_a_model_without_the_features_head_split_names_the_wrapper(small_benchmark) -> None:
    flat = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.Linear(32, 10)
    )
    with pytest.raises(UserError, match=r"wrap it with .*HeadSplit\(model, head='2'\)"):
        evaluate(flat, small_benchmark, "msp", device="cpu")
    with pytest.raises(UserError, match=r"a str, not a torch\.nn\.Module"):
        evaluate("fmnist_cnn", small_benchmark, "msp", device="cpu")
    split = HeadSplit(flat, head="2", mean=(0.5,), std=(0.5,))  # as the message says: it runs
    assert evaluate(split, small_benchmark, ["msp"], device="cpu", progress=False).row("msp")


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(20, 40), (33, 17), (24, 24)])
def test_preprocess_matches_torchvision_resize_and_centre_crop(h, w) -> None:
    x = torch.rand(2, 3, h, w)
    ours = Preprocess(resize=12, crop=10)(x)
    reference = TF.center_crop(TF.resize(x, 12, antialias=True), [10, 10])
    assert ours.shape == reference.shape == (2, 3, 10, 10)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert Preprocess(resize=12, crop=10).output_shape((3, h, w)) == (3, 10, 10)


def test_preprocess_gray_to_rgb_repeats_the_channel_before_normalising() -> None:
    x = torch.rand(2, 1, 8, 8)
    y = GREY(x)
    assert y.shape == (2, 3, 8, 8) and all(torch.equal(y[:, c], x[:, 0]) for c in range(3))
    model = load_model("torchvision:resnet18", "none", num_classes=10, preprocess=GREY)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.expand(-1, 3, -1, -1)), atol=1e-6)


def test_preprocess_refuses_a_crop_larger_than_the_image() -> None:
    with pytest.raises(UserError, match="crop 32 is larger than the 28x28 images"):
        Preprocess(crop=32).output_shape((3, 28, 28))
    with pytest.raises(UserError, match="resize must be a positive number"):
        Preprocess(resize=0)


# --- mixed precision and shards ----------------------------------------------------------------


def test_bf16_autocast_on_cpu_gives_float32_outputs_close_to_fp32(small_benchmark) -> None:
    model = load_model("torchvision:resnet18", "none", num_classes=10, preprocess=GREY)
    data = small_benchmark.id_test
    fp32 = forward_outputs(model, data, "cpu", batch_size=32)
    bf16 = forward_outputs(model, data, "cpu", batch_size=32, autocast=torch.bfloat16)
    assert bf16.logits.dtype == torch.float32
    assert not torch.equal(bf16.logits, fp32.logits)  # it did run in bf16
    scale = fp32.logits.abs().max()
    assert (bf16.logits - fp32.logits).abs().max() < 0.05 * scale


def test_shard_bounds_cover_every_sample_once_in_order() -> None:
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert [shard_bounds(9, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]


# --- the command line ------------------------------------------------------------------------


def own_model_argv(fmnist_dir, out, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--model",
        "torchvision:resnet18",
        "--weights",
        "none",
        "--gray-to-rgb",
        "--resize",
        "16",
        "--data-dir",
        str(fmnist_dir),
        "--scores",
        "msp,energy",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_cli_evaluates_a_torchvision_model_under_bf16(capsys, fmnist_dir, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(own_model_argv(fmnist_dir, out, "--autocast", "bf16")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["scorer"] for r in metrics["rows"]} == {"msp", "energy"}
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint_meta"]["model"] == "torchvision:resnet18"
    assert config["checkpoint_meta"]["head"] == "fc"
    assert config["checkpoint_meta"]["resize"] == 16
    assert "unleash evaluate --model torchvision:resnet18" in (out / "log.txt").read_text()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: [x for x in a if x != "--gray-to-rgb"], "add --gray-to-rgb"),
        (lambda a: [*a, "--autocast", "fp16"], "--autocast fp16 needs a GPU"),
        (lambda a: a[:3] + a[5:], "--model torchvision:resnet18 needs --weights"),
        (lambda a: [*a, "--class-map", "absent.json"], "--class-map absent.json does not exist"),
        (lambda a: ["evaluate", "--checkpoint", "fmnist_cnn", *a[3:]], "--weights goes with"),
        (lambda a: [a[0], "--model", "timm:resnet18", *a[3:]], "pip install timm"),
        (lambda a: [*a, "--crop", "20"], "crop 20 is larger than the 16x16 images"),
    ],
)
def test_cli_mismatches_are_one_line_errors(capsys, fmnist_dir, tmp_path, edit, message) -> None:
    out = tmp_path / "run"
    assert main(edit(own_model_argv(fmnist_dir, out))) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_needs_exactly_one_of_checkpoint_and_model(capsys, tmp_path) -> None:
    for argv in (
        ["evaluate", "--out", str(tmp_path / "a")],
        ["evaluate", "--checkpoint", "x", "--model", "torchvision:resnet18", "--out", "b"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


# --- fine-tuning your own model -------------------------------------------------------------


def own_weights(tmp_path: Path, classes: int = 12) -> Path:
    """A small torchvision classifier's state dict with a head of other classes."""
    torch.manual_seed(0)
    path = tmp_path / "shufflenet.pth"
    torch.save(torchvision_classifier("shufflenet_v2_x0_5", classes).state_dict(), path)
    return path


REVERSED = {str(c): 11 - c for c in range(10)}


def test_own_model_checkpoint_rebuilds_head_class_map_and_preprocessing(tmp_path) -> None:
    """A checkpoint of load_model's model (class map, grey-to-RGB, resize) loads back into the
    same function, so fine-tuning and every other command can start from it."""
    model = load_model(
        "torchvision:shufflenet_v2_x0_5",
        own_weights(tmp_path),
        num_classes=10,
        input_shape=(1, 28, 28),
        class_map=REVERSED,
        preprocess=Preprocess(resize=32, gray_to_rgb=True),
    )
    save_checkpoint(tmp_path / "c", model, own_model_spec(model, 28))
    meta = json.loads((tmp_path / "c.json").read_text())
    assert (meta["in_channels"], meta["num_classes"], len(meta["mean"])) == (1, 10, 3)
    assert meta["model_kwargs"] == {"head": "fc", "resize": 32, "crop": None, "gray_to_rgb": True}
    loaded, _ = load_checkpoint(tmp_path / "c", num_classes=10, input_shape=(1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        full = torchvision_classifier("shufflenet_v2_x0_5", 12)
        full.load_state_dict(torch.load(tmp_path / "shufflenet.pth", weights_only=True))
        grey = TF.resize(x.expand(-1, 3, -1, -1), [32], antialias=True)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        reference = full.eval()((grey - mean[:, None, None]) / std[:, None, None])
        assert torch.allclose(loaded(x), reference[:, [11 - c for c in range(10)]], atol=1e-5)
    with pytest.raises(UserError, match="takes 1x28x28 input"):
        load_checkpoint(tmp_path / "c", input_shape=(3, 28, 28))
    marked = Watermarked(loaded, torch.full((1, 28, 28), 0.1))  # a pattern on the grey input
    assert marked.in_channels == 1
    with torch.no_grad():
        assert torch.equal(marked(x), loaded(x + 0.1))


def test_cli_fine_tunes_your_own_model_with_um(capsys, fmnist_dir, tmp_path) -> None:
    weights, out = own_weights(tmp_path), tmp_path / "um"
    argv = [
        "finetune",
        *("--model", "torchvision:shufflenet_v2_x0_5", "--weights", str(weights)),
        *("--class-map", str(tmp_path / "map.json"), "--gray-to-rgb"),
        *("--method", "um", "--xi", "3", "--recipe", "quick", "--epochs", "1"),
        *("--batch-size", "64", "--data-dir", str(fmnist_dir), "--device", "cpu"),
        *("--out", str(out), "--no-progress"),
    ]
    assert main(argv) == 2  # the class map does not exist yet: nothing written
    assert "--class-map" in capsys.readouterr().err and not out.exists()
    (tmp_path / "map.json").write_text(json.dumps(REVERSED))
    assert main(argv) == 0, capsys.readouterr().err
    assert "fine-tuned with um (recipe quick: 1 epoch" in capsys.readouterr().out
    start = json.loads((out / "start.json").read_text())
    assert start["architecture"] == "torchvision:shufflenet_v2_x0_5"
    assert start["source"]["class_map"] == [11 - c for c in range(10)]
    config = json.loads((out / "config.json").read_text())
    assert config["from"] == str(out / "start")
    assert config["recipe"]["model"] == "torchvision:shufflenet_v2_x0_5"
    final = out / "checkpoints" / "final"
    assert json.loads(final.with_suffix(".json").read_text())["model_kwargs"]["gray_to_rgb"]
    copy = tmp_path / "copy.pth"
    copy.write_bytes(weights.read_bytes())
    other = [a if a != str(weights) else str(copy) for a in argv]  # resumed from other weights
    assert main([*other, "--resume"]) == 2
    assert "it started from another model" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # the same flags: nothing left to train
    capsys.readouterr()
    evaluated = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(final), "--data-dir", str(fmnist_dir)]
    assert main([*argv, "--out", str(evaluated), "--no-progress"]) == 0
    assert {r["scorer"] for r in json.loads((evaluated / "metrics.json").read_text())["rows"]}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--from", "fmnist_cnn", "--gray-to-rgb"], "--gray-to-rgb goes with --model, not --from"),
        (["--model", "torchvision:shufflenet_v2_x0_5"], "needs --weights"),
        (["--model", "torchvision:shufflenet_v2_x0_5", "--weights", "none"], "add --gray-to-rgb"),
    ],
)
def test_cli_fine_tune_of_your_own_model_refuses_bad_input(
    capsys, fmnist_dir, tmp_path, flags, message
) -> None:
    out = tmp_path / "run"
    argv = ["finetune", *flags, "--data-dir", str(fmnist_dir), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
