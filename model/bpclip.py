"""BPCLIP (arXiv 2506.17969): bottom-up quality assessment from distortion to semantics.

One frozen open_clip image tower is read at several depths; each level is gated, pooled and
projected to a common width; a running representation starts at the shallowest level and
attends to each deeper level in turn (distortion -> semantics); the result is scored against
antonym pairs of quality adjectives embedded once by the frozen text tower.

The paper's text is only partly public and it ships no code. Where it is silent, we chose:

* Levels: open_clip ResNets -> ``layer1..layer4``; ViTs -> the tokens (prefix tokens dropped)
  after four evenly spaced blocks, as a grid; timm towers -> the trunk's last four
  ``feature_info`` stages. Any module names can be given (``depths``).
* "Bring each level to the deepest level's spatial size" is adaptive average pooling. It has
  no parameters, so a level's pooled map is what a training run keeps in memory and reuses
  every epoch (the backbone is frozen: an epoch runs no encoder).
* Gated local pooling: per location a LayerNorm over channels and a linear projection to the
  common width ``d`` give tokens; a bottleneck 1x1 conv (C -> 64 -> 1, sigmoid) gives a
  spatial gate; tokens are scaled by the gate and pooled by the gate-weighted mean.
* Bottom-up fusion: the running vector starts as the shallowest level's pooled token; for
  each deeper level it attends (pre-norm, multi-head) over that level's gated tokens, then a
  pre-norm MLP, both residual. Attention over tokens (not a single pooled vector) is what
  lets a semantic level decide *where* the distortion evidence matters.
* Output: a zero-initialised linear map to the text tower's space is added to the tower's own
  (normalised) image embedding. Untrained, the model is therefore exactly CLIP-IQA with the
  antonym pairs (zero-shot, meaningful with pretrained towers); training moves it from there.
* Text: 20 antonym pairs (40 adjectives) in 6 dimensions (``DEFAULT_ADJECTIVE_PAIRS``),
  prompt "a {} photo.". Softmax within each pair gives 20 "good" probabilities; a linear
  layer (initialised to their mean) maps them to normalised MOS; the per-dimension outputs
  are the mean "good" probability of the dimension's pairs, in [0, 1], higher is better
  (``noise_free`` = 1 means clean).
* Full reference: the reference goes through the same frozen tower; per level the gate comes
  from |F_dist - F_ref| and gates the projection of [F_dist, F_ref, |F_dist - F_ref|]. NR and
  FR are the same modules with a mode flag (only the projections' input width differs).
  Untrained FR scores the distorted image alone (the residual is zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from iqray.model.config import BPCLIPConfig
from iqray.model.outputs import ScoreSpec, bpclip_outputs
from iqray.model.preprocess import ImageSource, ImageTransform, image_batch, prompt_list
from iqray.model.scoring_model import HEAD_INIT_SEED, MAX_LOGIT_SCALE, ScoringModule
from iqray.model.weights import check_input_size, create_tower, tower_preprocess_stats


@dataclass
class LevelFeatures:
    """Frozen-tower output for a batch: per level (B, C_l, H, W) at the deepest level's size,
    the tower's pooled embedding (B, D), and the reference's levels in FR mode."""

    levels: list[torch.Tensor]
    embedding: torch.Tensor
    reference: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    def subset(self, index) -> LevelFeatures:
        return LevelFeatures([x[index] for x in self.levels], self.embedding[index],
                             None if self.reference is None else
                             [x[index] for x in self.reference])

    @staticmethod
    def cat(parts: list[LevelFeatures]) -> LevelFeatures:
        """Batches of features as one."""
        first = parts[0]
        levels = [torch.cat([p.levels[i] for p in parts]) for i in range(len(first.levels))]
        reference = None if first.reference is None else [
            torch.cat([p.reference[i] for p in parts]) for i in range(len(first.reference))]
        return LevelFeatures(levels, torch.cat([p.embedding for p in parts]), reference)

    def to(self, device, dtype=torch.float32) -> LevelFeatures:
        move = lambda x: x.to(device, dtype, non_blocking=True)  # noqa: E731
        return LevelFeatures([move(x) for x in self.levels], move(self.embedding),
                             None if self.reference is None else
                             [move(x) for x in self.reference])


def default_depths(visual: nn.Module) -> list[str]:
    """Four stages of the tower's visual side, shallow to deep, as module names."""
    names = dict(visual.named_modules())
    if all(f"layer{i}" in names for i in range(1, 5)):  # open_clip ModifiedResNet
        return [f"layer{i}" for i in range(1, 5)]
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        blocks = len(visual.transformer.resblocks)
        picks = sorted({max(1, round(blocks * k / 4)) for k in range(1, 5)})
        return [f"transformer.resblocks.{i - 1}" for i in picks]
    trunk = getattr(visual, "trunk", None)
    info = getattr(trunk, "feature_info", None)
    if info is not None:
        modules = [f["module"] for f in info]
        return [f"trunk.{m}" for m in modules[-4:]]
    raise ValueError(f"cannot find feature levels in a {type(visual).__name__} tower; give "
                     "'depths' (module names of the visual tower) in the config")


class LevelTaps:
    """Forward hooks that keep the outputs of chosen modules of the visual tower."""

    def __init__(self, visual: nn.Module, depths: Sequence[str]):
        modules = dict(visual.named_modules())
        missing = [d for d in depths if d not in modules]
        if missing:
            known = ", ".join(n for n, _ in visual.named_children())
            raise ValueError(f"no module {', '.join(missing)} in the visual tower; known "
                             f"top-level modules: {known}")
        self.visual = visual
        self.captured: dict[str, torch.Tensor] = {}
        for name in depths:
            modules[name].register_forward_hook(self._keep(name))
        self.depths = list(depths)

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def maps(self) -> list[torch.Tensor]:
        """Captured outputs as (B, C, H, W) maps, shallow to deep."""
        out = [self._as_map(self.captured.pop(name)) for name in self.depths]
        self.captured.clear()
        return out

    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x
        if x.ndim != 3:
            raise ValueError(f"feature level of shape {tuple(x.shape)} is neither a map nor "
                             "a token sequence")
        transformer = getattr(self.visual, "transformer", None)
        if transformer is not None and not getattr(transformer, "batch_first", True):
            x = x.transpose(0, 1)  # (N, B, D) -> (B, N, D)
        grid = getattr(self.visual, "grid_size", None)
        h, w = (grid if isinstance(grid, tuple | list) else (grid, grid)) if grid else (0, 0)
        if not h:
            side = int(math.isqrt(x.shape[1]))
            h = w = side
        tokens = x[:, x.shape[1] - h * w:]  # drop class/register tokens (they come first)
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class GatedLevel(nn.Module):
    """One level: spatial gate (from F, or |F - F_ref|), gated tokens of width d, gated mean."""

    def __init__(self, channels: int, width: int, gate_hidden: int, full_reference: bool):
        super().__init__()
        features = channels * (3 if full_reference else 1)
        self.full_reference = full_reference
        self.gate = nn.Sequential(nn.Conv2d(channels, gate_hidden, 1), nn.ReLU(),
                                  nn.Conv2d(gate_hidden, 1, 1))
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, width)

    def forward(self, dist: torch.Tensor, ref: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full_reference:
            if ref is None:
                raise ValueError("full-reference mode needs reference features")
            diff = (dist - ref).abs()
            gate_in, features = diff, torch.cat([dist, ref, diff], dim=1)
        else:
            gate_in, features = dist, dist
        weight = torch.sigmoid(self.gate(gate_in)).flatten(2).transpose(1, 2)  # (B, N, 1)
        tokens = self.proj(self.norm(features.flatten(2).transpose(1, 2)))  # (B, N, d)
        gated = weight * tokens
        pooled = gated.sum(1) / weight.sum(1).clamp_min(1e-6)
        return gated, pooled


class BottomUpBlock(nn.Module):
    """The running representation attends over the next deeper level's tokens."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(width)
        self.key_norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, running: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.key_norm(tokens)
        attended, _ = self.attn(self.query_norm(running).unsqueeze(1), keys, keys,
                                need_weights=False)
        running = running + attended.squeeze(1)
        return running + self.mlp(self.mlp_norm(running))


class BPCLIP(ScoringModule):
    """Frozen multi-depth tower + trainable gated pooling, bottom-up fusion and quality layer.

    Build with :func:`iqray.model.load` (``"bpclip"`` or a checkpoint). ``score(images,
    references=...)`` returns ``quality`` and one column per quality dimension.
    """

    def __init__(self, config: BPCLIPConfig, tower: nn.Module,
                 tokenizer: open_clip.tokenizer.SimpleTokenizer,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.config = config
        check_input_size(tower, config.image_size, f"backbone {config.backbone.model_name}")
        self.backbone = tower
        self.backbone.requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = int(tower.positional_embedding.shape[0])
        self.transform = ImageTransform(config.image_size, tuple(mean), tuple(std))
        self.depths = list(config.depths or default_depths(tower.visual))
        self.taps = LevelTaps(tower.visual, self.depths)
        heads = config.heads
        embed_dim = int(self.backbone.text_projection.shape[-1]
                        if not isinstance(self.backbone.text_projection, nn.Linear)
                        else self.backbone.text_projection.out_features)
        self.out_proj = nn.Linear(heads.width, embed_dim)
        self.dimensions = heads.dimensions
        pairs = [p for d in self.dimensions for p in heads.adjective_pairs[d]]
        self.register_buffer("pair_text", self._pair_text(pairs), persistent=False)
        membership = torch.zeros(len(self.dimensions), len(pairs))
        start = 0
        for i, name in enumerate(self.dimensions):
            count = len(heads.adjective_pairs[name])
            membership[i, start:start + count] = 1.0 / count
            start += count
        self.register_buffer("dimension_weights", membership, persistent=False)
        self.log_logit_scale = nn.Parameter(torch.zeros(()))
        channels = self._probe_channels()
        # Seeded so that the same config builds the same model in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_INIT_SEED)
            self.quality_layer = nn.Linear(len(pairs), 1)
            self._fresh_trainable(channels)

    def _fresh_trainable(self, channels: list[int]) -> None:
        """New levels and blocks for levels of ``channels``; the output projection, quality
        layer and logit scale back to their starting values (untrained = CLIP-IQA)."""
        heads = self.config.heads
        self.levels = nn.ModuleList(GatedLevel(c, heads.width, heads.gate_hidden,
                                               self.full_reference) for c in channels)
        self.blocks = nn.ModuleList(BottomUpBlock(heads.width, heads.attn_heads, heads.mlp_ratio)
                                    for _ in channels[1:])
        self.out_norm = nn.LayerNorm(heads.width)
        nn.init.zeros_(self.out_proj.weight)  # starts as the tower's own embedding (CLIP-IQA)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.constant_(self.quality_layer.weight, 1.0 / self.quality_layer.in_features)
        nn.init.zeros_(self.quality_layer.bias)
        with torch.no_grad():
            self.log_logit_scale.fill_(math.log(min(max(
                float(self.backbone.logit_scale.exp()), 1.0), MAX_LOGIT_SCALE)))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: BPCLIPConfig, cache_dir: str | Path | None = None,
                    base_dir: str | Path | None = None, allow_download: bool | None = None
                    ) -> BPCLIP:
        tower = create_tower(config.backbone, cache_dir, base_dir, allow_download)
        tokenizer = open_clip.get_tokenizer(config.backbone.model_name)
        mean, std = tower_preprocess_stats(config.backbone)
        return cls(config, tower, tokenizer, mean, std)

    def _probe_channels(self) -> list[int]:
        size = self.config.image_size
        with torch.no_grad():
            self.backbone.visual.eval()
            self.backbone.visual(torch.zeros(1, 3, size, size))
            return [m.shape[1] for m in self.taps.maps()]

    def _pair_text(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        template = self.config.heads.adjective_template
        words = [template.format(w) for pair in pairs for w in pair]
        with torch.no_grad():
            tokens = self.tokenizer(words)
            text = self.backbone.encode_text(tokens).float()
        return F.normalize(text, dim=-1).reshape(len(pairs), 2, -1)

    def towers(self) -> list[nn.Module]:
        return [self.backbone]

    def train(self, mode: bool = True) -> BPCLIP:
        super().train(mode)
        self.backbone.eval()  # frozen: fixed norms, no dropout
        return self

    # -- introspection --------------------------------------------------------------------
    @property
    def full_reference(self) -> bool:
        return self.config.full_reference

    @property
    def input_channels(self) -> int:
        """Channels of a pre-cropped input tensor: the image, then its reference in FR."""
        return 6 if self.full_reference else 3

    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    @property
    def output_names(self) -> list[str]:
        return ["quality", *self.dimensions]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if not n.startswith("backbone.")}
        return {k: v for k, v in self.state_dict().items() if k in names}

    @property
    def score_range(self) -> dict[str, ScoreSpec]:
        return bpclip_outputs(self.config)

    def reset_heads(self, seed: int) -> None:
        """Fresh, seeded trainable part (one training repeat); the backbone is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._fresh_trainable([level.gate[0].in_channels for level in self.levels])
        self.to(self.device)

    # -- frozen backbone --------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def encode_levels(self, pixels: torch.Tensor) -> LevelFeatures:
        """Frozen-tower features of normalised pixels (3 channels, or 6 = image + reference
        in FR mode), each level pooled to the deepest level's spatial size."""
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels}-channel input ("
                             + ("image + reference" if self.full_reference else "image")
                             + f"), got {pixels.shape[1]}")
        batch = pixels.shape[0]
        views = torch.cat([pixels[:, :3], pixels[:, 3:]]) if self.full_reference else pixels
        with torch.no_grad(), self._autocast():
            embedding = self.backbone.encode_image(views).float()
            maps = self.taps.maps()
        size = maps[-1].shape[-2:]
        levels = [F.adaptive_avg_pool2d(m.float(), size) for m in maps]
        if not self.full_reference:
            return LevelFeatures(levels, embedding)
        return LevelFeatures([x[:batch] for x in levels], embedding[:batch],
                             [x[batch:] for x in levels])

    # -- trainable part ----------------------------------------------------------------------
    def forward_heads(self, features: LevelFeatures) -> dict[str, torch.Tensor]:
        """Normalised quality (what the loss sees) and per-dimension scores in [0, 1]."""
        features = features.to(self.device)
        base = F.normalize(features.embedding, dim=-1)
        if self.zero_shot:
            image = base
        else:
            refs = features.reference or [None] * len(features.levels)
            tokens, pooled = zip(*(level(x, r) for level, x, r in
                                   zip(self.levels, features.levels, refs, strict=True)),
                                 strict=True)
            running = pooled[0]
            for block, level_tokens in zip(self.blocks, tokens[1:], strict=True):
                running = block(running, level_tokens)
            image = F.normalize(base + self.out_proj(self.out_norm(running)), dim=-1)
        scale = self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * torch.einsum("bd,pkd->bpk", image, self.pair_text)
        good = logits.softmax(dim=-1)[..., 0]  # (B, pairs)
        quality = good.mean(-1) if self.zero_shot else self.quality_layer(good).squeeze(-1)
        out = {"quality": quality}
        dims = good @ self.dimension_weights.T
        for i, name in enumerate(self.dimensions):
            out[name] = dims[:, i]
        return out

    def to_score_scale(self, normalised: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = self.config.quality_scale
        out = dict(normalised)
        out["quality"] = q.low + normalised["quality"] * (q.high - q.low)
        return out

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_heads(self.encode_levels(pixels))

    # -- the public scoring call ----------------------------------------------------------
    @torch.inference_mode()
    def score(self, images: Sequence[ImageSource] | torch.Tensor,
              prompts: Sequence[str | None] | None = None,
              references: Sequence[ImageSource] | None = None,
              batch_size: int = 32) -> dict[str, np.ndarray]:
        """Score one image or many, as MST-CLIPIQA's ``score`` takes them (an NCHW tensor at
        the model's crop shape is crops: uint8 or normalised floats; in FR mode 6 channels =
        image then reference). ``prompts`` are
        accepted for the common interface and unused. FR mode needs ``references`` (one per
        image) unless the tensor carries them. Returns float32 ``quality`` (on
        :attr:`score_range`) and one [0, 1] column per quality dimension."""
        images = image_batch(images, self.input_channels, self.transform.size)
        count = len(images)
        prompt_list(prompts, count)  # unused, but counted like MST-CLIPIQA's
        if references is not None:
            references = image_batch(references, 3, -1)  # never a tensor of crops
        tensor_input = isinstance(images, torch.Tensor)
        if self.full_reference and not tensor_input:
            if references is None or len(references) != count:
                raise ValueError("full-reference mode needs one reference per image "
                                 f"(got {0 if references is None else len(references)} for "
                                 f"{count} images)")
        elif references is not None and not self.full_reference:
            raise ValueError("references given to a no-reference model (mode 'nr')")
        was_training = self.training
        self.eval()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.output_names}
        try:
            for start in range(0, count, batch_size):
                chunk = images[start:start + batch_size]
                if tensor_input:
                    pixels = chunk.to(self.device)
                    if pixels.dtype == torch.uint8:
                        pixels = self.transform.normalize(pixels)
                else:
                    pixels = torch.stack([self.transform.load(img) for img in chunk])
                    if self.full_reference:
                        refs = torch.stack([self.transform.load(img) for img in
                                            references[start:start + batch_size]])
                        pixels = torch.cat([pixels, refs], dim=1)
                scores = self.to_score_scale(self.forward(pixels))
                for key in self.output_names:
                    parts[key].append(scores[key].float().cpu().numpy())
        finally:
            self.train(was_training)
        if count == 0:
            return {k: np.zeros(0, np.float32) for k in self.output_names}
        return {k: np.concatenate(v) for k, v in parts.items()}
