"""CLIP models: named configurations and parameter counts, tower shapes, temperature, text pooling, patch
dropout, gradient checkpointing, weight-decay exemptions and the errors on bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from clip_train.models import (
    CLIP,
    CLIPConfig,
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
    build_model,
    get_model_config,
    list_model_configs,
)

EOT = 49_407

# Published parameter counts, in millions: OpenCLIP's model profile table,
# https://github.com/mlfoundations/open_clip/blob/main/docs/model_profile.csv (column "mparams"), whose
# RN50/RN101/RN50x4/ViT-B-32/ViT-L-14(-336) rows also match the exact counts of OpenAI's released models
# (e.g. ViT-B/32: 151,277,313; RN50: 102,007,137).
PUBLISHED_MPARAMS = {
    "RN50": 102.01,
    "RN101": 119.69,
    "RN50x4": 178.30,
    "RN50x16": 290.98,
    "RN50x64": 623.26,
    "ViT-B/32": 151.28,
    "ViT-B/16": 149.62,
    "ViT-L/14": 427.62,
    "ViT-L/14@336px": 427.94,
}


def make_tokens(
    batch: int, length: int = 77, eot: int = EOT, seed: int = 0, max_word: int = 40_000
) -> torch.Tensor:
    """Random texts: start token, a few word ids below `max_word`, end-of-text, zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(1, min(10, length - 2), (1,), generator=g))
        tokens[row, 0] = eot - 1
        tokens[row, 1 : 1 + n] = torch.randint(1, max_word, (n,), generator=g)
        tokens[row, 1 + n] = eot
    return tokens


def make_images(model: CLIP, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, model.image_size, model.image_size)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The models here are tiny: one intra-op thread is fastest, and on a shared 2-core machine several
    # threads spin against other processes' work (a 10x slowdown when the machine is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit_tiny() -> CLIP:
    return build_model("vit-tiny").eval()


@pytest.fixture(scope="module")
def rn_tiny() -> CLIP:
    return build_model("rn-tiny").eval()


# ------------------------------------------------------------------------------------ named configs


@pytest.mark.parametrize("name", list(PUBLISHED_MPARAMS))
def test_parameter_count_matches_published(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2) == pytest.approx(PUBLISHED_MPARAMS[name], abs=0.006)


def test_exact_parameter_count_of_vit_b32() -> None:
    with torch.device("meta"):
        model = build_model("ViT-B/32")
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


def test_every_paper_model_and_the_tiny_ones_are_registered() -> None:
    names = list_model_configs()
    assert set(PUBLISHED_MPARAMS) <= set(names)
    assert {"vit-tiny", "rn-tiny"} <= set(names)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("vit_b32", "ViT-B/32"),
        ("ViT-B-32", "ViT-B/32"),
        ("vit-b/16", "ViT-B/16"),
        ("vit_l14_336", "ViT-L/14@336px"),
        ("ViT-L-14-336", "ViT-L/14@336px"),
        ("rn50x4", "RN50x4"),
        ("VIT_TINY", "vit-tiny"),
        ("rn_tiny", "rn-tiny"),
    ],
)
def test_aliases(alias: str, canonical: str) -> None:
    assert get_model_config(alias) == get_model_config(canonical)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown model config 'ViT-Q/7'.*ViT-B/32.*rn-tiny"):
        get_model_config("ViT-Q/7")


def test_get_model_config_returns_a_fresh_copy() -> None:
    config = get_model_config("vit-tiny")
    config.vision.layers = 99
    assert get_model_config("vit-tiny").vision.layers == 2


def test_paper_architectures() -> None:
    vit = get_model_config("ViT-L/14@336px")
    assert (vit.vision.image_size, vit.vision.patch_size, vit.vision.width, vit.vision.layers) == (
        336,
        14,
        1024,
        24,
    )
    assert vit.vision.heads == 16 and vit.text.heads == 12 and vit.embed_dim == 768
    rn = get_model_config("RN50x64")
    assert (rn.vision.image_size, rn.vision.layers, rn.vision.width, rn.vision.heads) == (
        448,
        (3, 15, 36, 10),
        128,
        64,
    )


def test_overrides() -> None:
    model = build_model("vit-tiny", quick_gelu=True, vision={"patch_dropout": 0.5}, text={"layers": 1})
    assert model.config.quick_gelu and model.config.vision.patch_dropout == 0.5
    assert len(model.text.transformer.resblocks) == 1
    assert get_model_config("vit-tiny").vision.patch_dropout == 0.0  # the registry is untouched
    with pytest.raises(ValueError, match="unknown CLIPConfig field"):
        build_model("vit-tiny", emb_dim=3)
    with pytest.raises(ValueError, match=r"unknown VisionTransformerConfig field.*patch_drop"):
        build_model("vit-tiny", vision={"patch_drop": 0.5})


def test_config_from_mappings_as_hydra_gives_them() -> None:
    config = CLIPConfig(
        embed_dim=32,
        vision={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        text={"width": 64, "heads": 1, "layers": 1},
    )
    assert isinstance(config.vision, ModifiedResNetConfig) and config.vision.layers == (1, 1, 1, 1)
    assert isinstance(CLIPConfig(vision={"layers": 2}).vision, VisionTransformerConfig)
    assert isinstance(
        build_model(
            {
                "embed_dim": 16,
                "vision": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1},
                "text": {"width": 64, "heads": 1, "layers": 1},
            }
        ),
        CLIP,
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: VisionTransformerConfig(image_size=30, patch_size=8), "not a multiple of patch_size"),
        (lambda: VisionTransformerConfig(width=100), "not a multiple of head_width"),
        (lambda: VisionTransformerConfig(patch_dropout=1.0), r"patch_dropout must lie in \[0, 1\)"),
        (lambda: VisionTransformerConfig(layers=0), "layers must be positive"),
        (lambda: ModifiedResNetConfig(image_size=100), "multiple of 32"),
        (lambda: ModifiedResNetConfig(layers=(1, 1, 1)), "four positive block counts"),
        (lambda: TextTransformerConfig(width=64, heads=3), "not a multiple of heads"),
        (lambda: TextTransformerConfig(vocab_size=1000), "eot_token_id 49407 is outside the vocabulary"),
        (lambda: CLIPConfig(init_logit_scale=5.0), "exceeds max_logit_scale"),
    ],
)
def test_invalid_configs(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", ["vit-tiny", "rn-tiny"])
def test_forward_shapes_and_normalisation(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name.replace("-", "_"))
    images, tokens = make_images(model, 3), make_tokens(3)
    with torch.no_grad():
        assert model.encode_image(images).shape == (3, 64)
        assert model.encode_text(tokens).shape == (3, 64)
        out = model(images, tokens)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 64)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert out.logit_bias is None
    assert model.context_length == 77


def test_resnet_tower_has_anti_aliased_downsampling_and_attention_pool(rn_tiny: CLIP) -> None:
    visual = rn_tiny.visual
    assert [visual.conv1.stride, visual.conv2.stride, visual.conv3.stride] == [(2, 2), (1, 1), (1, 1)]
    block = visual.layer2[0]
    assert block.stride == 2 and block.conv2.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    assert visual.attnpool.positional_embedding.shape == (2 * 2 + 1, 16 * 32)  # 64 px / 32 = 2


def test_temperature_is_clamped_at_100(vit_tiny: CLIP) -> None:
    model = build_model("vit-tiny")
    images, tokens = make_images(model, 2), make_tokens(2)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        assert model(images, tokens).logit_scale.item() == pytest.approx(100.0)
        model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    # The clamp in forward passes no gradient beyond the limit, the parameter still receives one below it.
    model.logit_scale.data.fill_(1.0)
    model(images, tokens).logit_scale.backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.e)


def test_siglip_bias() -> None:
    model = build_model("vit-tiny", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    out = model(make_images(model, 2), make_tokens(2))
    assert out.logit_scale.item() == pytest.approx(10.0)
    assert out.logit_bias.item() == -10.0 and out.logit_bias.requires_grad


def test_text_features_ignore_everything_after_end_of_text(vit_tiny: CLIP) -> None:
    tokens = make_tokens(4)
    noisy = tokens.clone()
    for row in range(4):
        eot = int((tokens[row] == EOT).nonzero()[0])
        noisy[row, eot + 1 :] = torch.randint(1, 40_000, (77 - eot - 1,))
    with torch.no_grad():
        reference = vit_tiny.encode_text(tokens)
        torch.testing.assert_close(vit_tiny.encode_text(noisy), reference)
        # Shorter sequences give the features of their zero-padded version.
        torch.testing.assert_close(vit_tiny.encode_text(tokens[:, :12]), reference, rtol=1e-5, atol=1e-5)
        # ... and the causal mask is real: changing a word before end-of-text changes them.
        changed = tokens.clone()
        changed[:, 1] = 7
        assert not torch.allclose(vit_tiny.encode_text(changed), reference)


def test_configurable_end_of_text_id() -> None:
    # A vocabulary whose end-of-text token is not the largest id: pooling follows the configured id.
    model = build_model("vit-tiny", text={"vocab_size": 1000, "eot_token_id": 3}).eval()
    tokens = torch.tensor([[1, 500, 900, 3, 0, 0, 0, 999]])  # argmax of the ids would pick position 7
    with torch.no_grad():
        features = model.encode_text(tokens)
        # Equal up to float rounding: the two lengths take different matmul kernels on some CPUs.
        torch.testing.assert_close(features, model.encode_text(tokens[:, :4]), rtol=1e-5, atol=1e-5)
        # ... and not the features at position 7, where the largest id sits.
        at_largest_id = model.encode_text(torch.tensor([[1, 500, 900, 4, 0, 0, 0, 3]]))
        assert not torch.allclose(features, at_largest_id, rtol=1e-3, atol=1e-3)


def test_patch_dropout_keeps_class_token_and_a_random_subset() -> None:
    model = build_model("vit-tiny", vision={"patch_dropout": 0.5})
    visual = model.visual
    x = torch.randn(3, 17, 128)  # class token + 16 patches
    kept = visual.drop_patches(x)
    assert kept.shape == (3, 1 + 8, 128)
    assert torch.equal(kept[:, 0], x[:, 0])
    for row in range(3):  # every kept token is one of the row's own patches, none twice
        matches = (kept[row, 1:, None, :] == x[row, None, 1:, :]).all(-1)  # (8, 16)
        assert matches.sum(1).eq(1).all() and matches.sum(0).le(1).all()
    images = make_images(model, 2)
    model.train()
    assert not torch.equal(model.encode_image(images), model.encode_image(images))
    model.eval()  # no dropout outside training
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("name", ["vit-tiny", "rn-tiny"])
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    small_vocab = {"vocab_size": 1000, "eot_token_id": 999}
    plain = build_model(name, text=small_vocab).train()
    checkpointed = build_model(name, text=small_vocab).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    images, tokens = make_images(plain, 4), make_tokens(4, eot=999, max_word=998)
    calls = []
    first_block = checkpointed.text.transformer.resblocks[0]
    first_block.register_forward_pre_hook(lambda *_: calls.append(1))
    for model in (plain, checkpointed):
        out = model(images, tokens)
        logits = out.logit_scale * out.image_embeds @ out.text_embeds.T
        labels = torch.arange(4)
        (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).backward()
    for (name_p, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name_p)
    assert len(calls) == 2  # forward, then the recomputation in backward
    # Recomputation must not update the BatchNorm running statistics a second time.
    for (name_b, b), (_, c) in zip(plain.named_buffers(), checkpointed.named_buffers()):
        torch.testing.assert_close(c, b, msg=name_b)


def test_a_few_steps_of_training_fit_a_batch() -> None:
    torch.manual_seed(0)
    # A 1,000-token vocabulary keeps the optimiser step cheap; the towers are the registered ones.
    model = build_model("vit-tiny", text={"vocab_size": 1000, "eot_token_id": 999}).train()
    images = make_images(model, 8)
    tokens = make_tokens(8, eot=999, max_word=998)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(images, tokens)
        logits = out.logit_scale * out.image_embeds @ out.text_embeds.T
        labels = torch.arange(8)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bfloat16_model_accepts_float32_images(vit_tiny: CLIP) -> None:
    model = build_model("rn-tiny").eval().to(torch.bfloat16)
    with torch.no_grad():
        assert model.encode_image(make_images(model, 2)).dtype == torch.bfloat16


def test_no_weight_decay_names(vit_tiny: CLIP, rn_tiny: CLIP) -> None:
    names = vit_tiny.no_weight_decay_param_names()
    for expected in [
        "logit_scale",
        "visual.class_embedding",
        "visual.positional_embedding",
        "text.positional_embedding",
        "text.token_embedding.weight",
        "visual.ln_pre.weight",
        "text.transformer.resblocks.0.attn.in_proj_bias",
        "text.ln_final.bias",
    ]:
        assert expected in names
    for decayed in [
        "visual.proj",
        "text.text_projection",
        "visual.conv1.weight",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "text.transformer.resblocks.0.mlp.c_fc.weight",
    ]:
        assert decayed not in names
    rn_names = rn_tiny.no_weight_decay_param_names()
    assert "visual.attnpool.positional_embedding" in rn_names and "visual.layer1.0.bn1.weight" in rn_names
    assert "visual.attnpool.q_proj.weight" not in rn_names


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.randn(3, 32, 32), ValueError, r"shape \(B, 3, 32, 32\), got \(3, 32, 32\)"),
        (torch.randn(2, 1, 32, 32), ValueError, "3 channels"),
        (torch.randn(2, 32, 32, 3), ValueError, "3 channels"),
        (torch.randn(2, 3, 64, 64), ValueError, "32×32 images, got 64×64"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        ([[0.0]], TypeError, "must be a tensor"),
    ],
)
def test_bad_images(vit_tiny: CLIP, images, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        vit_tiny.encode_image(images)


def test_bad_images_resnet(rn_tiny: CLIP) -> None:
    with pytest.raises(ValueError, match="64×64 images, got 32×32"):
        rn_tiny.encode_image(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (make_tokens(2, length=78), ValueError, r"length 1\.\.77.*got 78"),
        (make_tokens(2)[0], ValueError, r"shape \(B, L\)"),
        (make_tokens(2).float(), TypeError, "integer ids"),
        (
            make_tokens(2).masked_fill(torch.eye(2, 77, dtype=torch.bool), -1),
            ValueError,
            r"\[0, 49408\).*\[-1,",
        ),
        (make_tokens(2).masked_fill(torch.eye(2, 77, dtype=torch.bool), 49_408), ValueError, r"49408\]"),
        (
            make_tokens(3).masked_fill(make_tokens(3) == EOT, 0),
            ValueError,
            r"rows \[0, 1, 2\] have no end-of-text",
        ),
    ],
)
def test_bad_tokens(vit_tiny: CLIP, tokens, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        vit_tiny.encode_text(tokens)


def test_bad_model_argument() -> None:
    with pytest.raises(TypeError, match="model name or a CLIPConfig"):
        build_model(3)
    with pytest.raises(TypeError, match="must be a string"):
        get_model_config(None)
