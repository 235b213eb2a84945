"""The parameter and FLOP calculator against the published ViT counts and against a built model."""
import pytest

from tinyvit import VisionTransformer
from tinyvit.benchmark import flops
# timm's vit_{tiny,small,base}_patch16_224 (1000 classes, class-token pool): parameters exactly,
# GMACs as fvcore / the DeiT paper print them (1.3 / 4.6 / 17.6), to 1%.
PUBLISHED = {
    "vit_ti16": (5_717_416, 1.25),
    "vit_s16": (22_050_664, 4.60),
    "vit_b16": (86_567_656, 17.56),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_params_exact(name):
    assert flops.count_params(name) == PUBLISHED[name][0]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_gmacs_within_one_percent(name):
    gmacs = flops.forward_macs(name) / 1e9
    assert gmacs == pytest.approx(PUBLISHED[name][1], rel=0.01)


def test_params_match_a_built_model():
    kwargs = dict(image_size=(16, 24), patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=24,
                  distilled=True, qkv_bias=False)
    m = VisionTransformer(**kwargs)
    assert flops.count_params(m.config) == m.num_params()


def test_macs_by_hand_for_a_tiny_model():
    # 8x8 image, patch 4: Np = 4, N = 5, D = 6, F = 10, K = 3, depth 1, C*P*P = 48
    cfg = dict(image_size=8, patch_size=4, num_classes=3, dim=6, depth=1, heads=2, mlp_dim=10)
    by_layer = flops.macs_by_layer(cfg, batch=2)
    assert by_layer == {"patch_embed": 2 * 4 * 48 * 6, "qkv": 2 * 5 * 6 * 18, "attn_scores": 2 * 25 * 6,
                        "attn_values": 2 * 25 * 6, "proj": 2 * 5 * 36, "fc1": 2 * 5 * 60, "fc2": 2 * 5 * 60,
                        "head": 2 * 18}
    assert flops.train_step_flops(cfg, 2) == 3 * 2 * sum(by_layer.values())


def test_attention_share_grows_with_tokens():
    small = flops.attention_share(dict(PUBLISHED_CFG, image_size=112))
    large = flops.attention_share(dict(PUBLISHED_CFG, image_size=448))
    assert 0 < small < flops.attention_share("vit_ti16") < large < 1


PUBLISHED_CFG = flops.PRESETS["vit_ti16"]


def test_bad_preset_names_the_choices():
    with pytest.raises(ValueError, match="vit_ti16"):
        flops.count_params("vit_huge")
    with pytest.raises(TypeError, match="ViTConfig"):
        flops.count_params(3)
