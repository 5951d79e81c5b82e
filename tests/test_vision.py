"""model/vision.py against transformers' PixtralVisionModel (fp32, eager attention): images of
different sizes and aspect ratios packed in one call, weights converted both ways (model/hf_vision.py)."""

import pytest
import torch
from transformers import PixtralVisionConfig, PixtralVisionModel

from model.hf import HFCheckpointError
from model.hf_vision import pixtral_config, vision_config_from_hf, vision_from_hf, vision_to_hf
from model.vision import VisionEncoder, vision_config

CFG = vision_config("debug", rope_theta=5000.0)
SIZES = [(32, 48), (64, 16), (16, 16), (48, 80)]  # (H, W): landscape, portrait, one patch, 3 x 5 patches


def hf_encoder(seed=0) -> PixtralVisionModel:
    """transformers' own random init, from its own config (not from pixtral_config)."""
    torch.manual_seed(seed)
    hc = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 5000.0})
    hc._attn_implementation = "eager"
    return PixtralVisionModel(hc).eval()


def images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in SIZES]


def hf_features(hf: PixtralVisionModel, imgs) -> torch.Tensor:
    """transformers' batch form: images zero-padded to the largest height and width, plus their sizes."""
    H, W = max(i.shape[1] for i in imgs), max(i.shape[2] for i in imgs)
    pixels = torch.zeros(len(imgs), 3, H, W)
    for k, img in enumerate(imgs):
        pixels[k, :, :img.shape[1], :img.shape[2]] = img
    with torch.no_grad():
        return hf(pixels, image_sizes=torch.tensor([i.shape[1:] for i in imgs])).last_hidden_state[0]


def test_hf_weights_give_equal_features():
    hf = hf_encoder()
    ours = VisionEncoder(CFG)
    ours.load_state_dict(vision_from_hf(hf.state_dict(), CFG), strict=True)
    with torch.no_grad():
        got = ours.eval()(images())
    want = hf_features(hf, images())
    assert got.shape == want.shape == (sum(h * w for h, w in SIZES) // 256, 32)
    assert (got - want).abs().max().item() < 1e-4


def test_our_weights_load_into_transformers_with_equal_features():
    ours = VisionEncoder(CFG)
    ours.init_weights(seed=3)
    hf = PixtralVisionModel(pixtral_config(CFG)).eval()
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(vision_to_hf(ours.state_dict(), CFG), strict=True)
    with torch.no_grad():
        got = ours.eval()(images())
    assert (got - hf_features(hf, images())).abs().max().item() < 1e-4
    assert vars(vision_config_from_hf(hf.config.to_dict())) == vars(CFG) | {"preset": None}


def test_packed_images_do_not_see_each_other():
    ours = VisionEncoder(CFG)
    ours.init_weights(seed=4)
    imgs = images()
    with torch.no_grad():
        packed = ours.eval()(imgs)
        alone = torch.cat([ours([img]) for img in imgs])
    assert (packed - alone).abs().max().item() < 1e-5


def test_conversion_names_the_bad_tensor():
    sd = vision_to_hf(VisionEncoder(CFG).state_dict(), CFG)
    del sd["transformer.layers.1.feed_forward.up_proj.weight"]
    sd["transformer.layers.1.feed_forward.w3.weight"] = torch.zeros(64, 32)
    layer = "transformer.layers.1.feed_forward"
    with pytest.raises(HFCheckpointError, match=f"missing tensor '{layer}.up_proj.weight'.*unexpected tensor "
                                                f"'{layer}.w3.weight'"):
        vision_from_hf(sd, CFG)


def test_image_shape_and_config_errors():
    with pytest.raises(ValueError, match=r"multiples of 16, got \(3, 20, 32\)"):
        VisionEncoder(CFG)([torch.zeros(3, 20, 32)])
    with pytest.raises(ValueError, match="head_dim = dim / num_heads \\(6\\) must be a multiple of 4"):
        vision_config("debug", dim=36, num_heads=6)
