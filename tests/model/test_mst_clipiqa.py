"""MST-CLIPIQA behaviour on tiny random-init towers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import iqray.model
from iqray.model.mst_clipiqa import GatedFusion


def head_parameter_count(dim=512, hidden=128, mlp_hidden=256) -> int:
    """The parameter layout the paper describes, counted by hand."""
    fusion = (2 * dim * hidden + hidden) + (hidden * dim + dim) + 2 * (dim * dim + dim)
    quality = 1  # log logit scale; the graded text embeddings are frozen buffers
    alignment = (2 * dim  # query LayerNorm
                 + 4 * dim * dim + 4 * dim  # multi-head attention in/out projections
                 + 1  # residual gate
                 + (2 * dim * mlp_hidden + mlp_hidden) + (mlp_hidden + 1))
    return fusion + quality + alignment


def test_trainable_parameters_match_the_architecture_and_stay_under_3m(zero_shot_model):
    counts = zero_shot_model.parameter_counts()
    print(f"MST-CLIPIQA trainable parameters: {counts['trainable']:,}")
    assert counts["trainable"] == head_parameter_count()
    assert counts["trainable"] < 3_000_000
    assert set(zero_shot_model.trainable_state_dict()) == {
        n for n, p in zero_shot_model.named_parameters() if p.requires_grad}
    assert all(not n.startswith(("coarse.", "fine_visual."))
               for n in zero_shot_model.trainable_state_dict())


def test_score_returns_one_value_per_image_with_documented_ranges(zero_shot_model, sample_rows):
    rows = sample_rows[:6]
    scores = zero_shot_model.score([r["path"] for r in rows], [r["prompt"] for r in rows])
    assert set(scores) == {"quality", "alignment", "prompt_truncated"}
    for key in ("quality", "alignment", "prompt_truncated"):
        assert scores[key].shape == (6,)
    spec = zero_shot_model.score_range
    assert np.all((scores["quality"] >= spec["quality"].low)
                  & (scores["quality"] <= spec["quality"].high))
    assert np.all((scores["alignment"] >= spec["alignment"].low)
                  & (scores["alignment"] <= spec["alignment"].high))
    assert not scores["prompt_truncated"].any()


def test_towers_are_frozen_and_get_no_gradient(trained_model):
    trained_model.train()
    assert all(not t.training for t in trained_model.towers())
    pixels = torch.randn(3, 3, 224, 224)
    out = trained_model(pixels, ["a red car", "a blue house at night", None])
    loss = out["quality"].sum() + out["alignment"][:2].sum()
    loss.backward()
    trained_model.eval()
    tower_params = [p for t in trained_model.towers() for p in t.parameters()]
    assert tower_params and all(p.grad is None and not p.requires_grad for p in tower_params)
    head_grads = {n: p.grad for n, p in trained_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in head_grads.values())
    assert head_grads["alignment_head.attn.in_proj_weight"].abs().sum() > 0
    trained_model.zero_grad(set_to_none=True)


def test_identity_initialised_fusion_reproduces_the_tower_embedding_when_the_gate_is_fixed():
    fusion = GatedFusion(dim=16, hidden=8)
    coarse, fine = torch.randn(4, 16), torch.randn(4, 16)
    z, _ = fusion(coarse, fine, gate=torch.ones(4, 16))
    torch.testing.assert_close(z, coarse)
    z, _ = fusion(coarse, fine, gate=torch.zeros(4, 16))
    torch.testing.assert_close(z, fine)
    z, gate = fusion(coarse, fine)
    assert torch.all((gate > 0) & (gate < 1))
    torch.testing.assert_close(z, gate * coarse + (1 - gate) * fine)


def test_alignment_ignores_padding_from_longer_prompts_in_the_batch(trained_model, sample_rows):
    image = sample_rows[0]["path"]
    short = "a cat"
    long = "a highly detailed oil painting of a majestic lighthouse on a cliff at sunset, " * 3
    alone = trained_model.score([image], [short])["alignment"][0]
    beside_long = trained_model.score([image, image], [short, long])["alignment"][0]
    assert abs(alone - beside_long) < 1e-5

    # The same comparison without the mask differs: the test can see a missing mask.
    model = trained_model
    with torch.inference_mode():
        coarse, fine = model.encode_images(torch.stack([model.transform.load(image)] * 2))
        prompts = model.encode_prompts([short, long])
        masked = model.forward_heads(coarse, fine, prompts)["alignment"][0]
        prompts.pad_mask[:] = False
        unmasked = model.forward_heads(coarse, fine, prompts)["alignment"][0]
    assert abs(float(masked - unmasked)) > 1e-4


@pytest.mark.parametrize("fixture", ["zero_shot_model", "trained_model"])
def test_scores_do_not_depend_on_batch_size(fixture, request, sample_rows):
    model = request.getfixturevalue(fixture)
    rows = sample_rows[:16]
    images = [r["path"] for r in rows]
    prompts = [r["prompt"] if i % 5 else None for i, r in enumerate(rows)]
    one = model.score(images, prompts, batch_size=1)
    sixteen = model.score(images, prompts, batch_size=16)
    for key in ("quality", "alignment"):
        np.testing.assert_allclose(one[key], sixteen[key], atol=1e-5, rtol=0)
    assert np.isnan(one["alignment"][0]) and np.isnan(sixteen["alignment"][5])


def test_a_300_token_prompt_is_truncated_and_flagged_not_a_crash(trained_model, sample_rows):
    long_prompt = " ".join(f"word{i}" for i in range(300))
    ids, lengths, truncated = trained_model._tokenize([long_prompt])
    assert truncated == [True] and lengths == [trained_model.context_length]
    assert ids[0, -1] == trained_model.tokenizer.eot_token_id
    scores = trained_model.score([sample_rows[0]["path"]] * 2, [long_prompt, "a cat"])
    assert scores["prompt_truncated"].tolist() == [True, False]
    assert np.isfinite(scores["alignment"]).all()


def test_images_without_a_prompt_get_a_null_alignment(zero_shot_model, sample_rows):
    scores = zero_shot_model.score([sample_rows[0]["path"]] * 3, [None, "", "   "])
    assert np.isnan(scores["alignment"]).all()
    assert np.isfinite(scores["quality"]).all()
    assert np.isnan(zero_shot_model.score([sample_rows[0]["path"]])["alignment"]).all()


def test_zero_shot_mode_is_clip_similarity_and_says_so(zero_shot_model, sample_rows):
    model = zero_shot_model
    assert model.zero_shot and model.mode == "zero-shot"
    assert all(spec.zero_shot for spec in model.score_range.values())
    rows = sample_rows[:4]
    scores = model.score([r["path"] for r in rows], [r["prompt"] for r in rows])

    # Recompute both outputs with open_clip's own encoders.
    clip = model.coarse
    with torch.inference_mode():
        pixels = torch.stack([model.transform.load(r["path"]) for r in rows])
        image = F.normalize(clip.encode_image(pixels), dim=-1)
        text = F.normalize(clip.encode_text(model.tokenizer([r["prompt"] for r in rows])), dim=-1)
        grades = F.normalize(clip.encode_text(model.tokenizer(
            [f"a photo with {g} quality" for g in ("bad", "poor", "fair", "good", "perfect")])),
            dim=-1)
        probs = (clip.logit_scale.exp() * image @ grades.T).softmax(-1)
        quality = probs @ torch.arange(1.0, 6.0)
        clipscore = 2.5 * (image * text).sum(-1).clamp(min=0)
    np.testing.assert_allclose(scores["quality"], quality.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores["alignment"], clipscore.numpy(), atol=1e-5)


def test_image_inputs_of_every_kind_give_the_same_score(zero_shot_model, sample_rows):
    path = sample_rows[3]["path"]
    data = path.read_bytes()
    pil = Image.open(io.BytesIO(data))
    array = np.asarray(Image.open(path).convert("RGB"))
    pixels = zero_shot_model.transform.load(path).unsqueeze(0)
    scores = [zero_shot_model.score([src])["quality"][0] for src in (str(path), data, pil, array)]
    scores.append(zero_shot_model.score(pixels)["quality"][0])
    np.testing.assert_allclose(scores, scores[0], atol=1e-6)


def test_each_distinct_prompt_is_encoded_once_and_cached(sample_rows):
    model = iqray.model.load("mst-clipiqa-tiny-random", prompt_cache_size=2)
    images = [r["path"] for r in sample_rows[:8]]
    model.score(images, ["p1"] * 4 + ["p2"] * 4)
    assert (model.prompt_cache_misses, model.prompt_cache_hits) == (2, 0)
    model.score(images[:2], ["p1", "p2"])
    assert (model.prompt_cache_misses, model.prompt_cache_hits) == (2, 2)
    model.score(images[:1], ["p3"])  # evicts the least recently used (p1)
    model.score(images[:2], ["p2", "p1"])
    assert (model.prompt_cache_misses, model.prompt_cache_hits) == (4, 3)


def test_token_path_pools_to_open_clip_encode_text(zero_shot_model):
    prompts = ["a photo of a dog", "an astronaut riding a horse on the moon"]
    with torch.inference_mode():
        batch = zero_shot_model.encode_prompts(prompts)
        reference = zero_shot_model.coarse.encode_text(zero_shot_model.tokenizer(prompts))
    torch.testing.assert_close(batch.pooled, reference, atol=1e-5, rtol=1e-5)
    lengths = (~batch.pad_mask).sum(1).tolist()
    assert lengths == [len(zero_shot_model.tokenizer.encode(p)) + 2 for p in prompts]


def test_mismatched_image_and_prompt_counts_are_an_error(zero_shot_model, sample_rows):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        zero_shot_model.score([sample_rows[0]["path"]] * 2, ["a"])


def test_uint8_crops_score_like_the_full_transform(zero_shot_model, sample_rows):
    paths = [r["path"] for r in sample_rows[:3]]
    transform = zero_shot_model.transform
    crops = torch.stack([transform.crop(iqray.model.open_image(p)) for p in paths])
    assert crops.dtype == torch.uint8 and crops.shape == (3, 3, 224, 224)
    np.testing.assert_allclose(zero_shot_model.score(crops)["quality"],
                               zero_shot_model.score(paths)["quality"], atol=1e-6)


@pytest.mark.parametrize("preset", ["mst-clipiqa-tiny-random", "mst-clipiqa-small-scratch"])
def test_offline_presets_build_and_score(preset, sample_rows):
    model = iqray.model.load(preset)
    assert model.parameter_counts()["trainable"] == 2_036_867  # same heads on every tower
    scores = model.score([r["path"] for r in sample_rows[:2]], [r["prompt"] for r in
                                                                 sample_rows[:2]])
    assert np.isfinite(scores["quality"]).all() and np.isfinite(scores["alignment"]).all()


def test_score_takes_what_users_pass(sample_rows):
    """One image of each kind, a list, an NCHW batch of full images; one prompt for all."""
    model = iqray.model.load("mst-clipiqa-tiny-random")
    path = sample_rows[0]["path"]
    image = Image.open(path)
    array = np.array(image.convert("RGB"))
    chw = torch.from_numpy(array).permute(2, 0, 1)
    expected = model.score([str(path)], ["a prompt"])
    for single in (str(path), path, path.read_bytes(), image, array, chw, chw.float() / 255):
        got = model.score(single, "a prompt")
        assert got["quality"].shape == (1,), type(single)
        np.testing.assert_allclose(got["quality"], expected["quality"], atol=1e-4)
        np.testing.assert_allclose(got["alignment"], expected["alignment"], atol=1e-4)
    batch = model.score(torch.stack([chw, chw]), "a prompt")  # NCHW of full-size images
    np.testing.assert_allclose(batch["quality"], np.repeat(expected["quality"], 2), atol=1e-4)
    both = model.score([image, array], ["a prompt", None])
    assert np.isfinite(both["alignment"][0]) and np.isnan(both["alignment"][1])
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        model.score([image, array], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"CHW or NCHW, got shape \(5,\)"):
        model.score(torch.zeros(5))
