"""MST-CLIPIQA (arXiv 2606.16799): two frozen open_clip towers, a gated fusion and two heads.

Where we differ from the public reference code, on purpose:

* One model, both outputs in one forward: quality and alignment share towers and fusion
  (the reference trains two separate variants).
* The fusion's coarse/fine projections start as identity, so the fused embedding starts in
  CLIP's joint space (the reference starts them random, which makes untrained output noise).
* The alignment head's cross-attention uses a key-padding mask, so a score never depends on
  which other prompts share the batch (the reference attends over padding).
* Tower embeddings are L2-normalised before fusion, as CLIP compares them.
* Prompt token features go through the text projection too, so keys and values live in the
  same joint space as the image query.
* The alignment MLP sees ``[h * t, h]`` (``h`` the attended image embedding, ``t`` the pooled
  prompt embedding, both normalised): with the residual gate at 0 the head can still start
  from CLIPScore-like evidence instead of from no prompt information at all.
* Zero-shot mode (no trained heads) uses the coarse stream alone: the fine tower's joint space
  is a different one from the coarse text tower's, so mixing it in untrained is meaningless.
  Quality = softmax-expected grade over the graded prompts, alignment = CLIPScore
  (2.5 * max(cos, 0)).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from iqray.model.config import MSTConfig
from iqray.model.outputs import ScoreSpec, mst_clipiqa_outputs
from iqray.model.preprocess import ImageTransform
from iqray.model.scoring_model import HEAD_INIT_SEED, MAX_LOGIT_SCALE, ScoringModule
from iqray.model.weights import (
    check_input_size,
    create_tower,
    tower_embed_dim,
    tower_preprocess_stats,
)


@dataclass
class PromptBatch:
    """Prompt features of a batch: token features once per *distinct* prompt (padded to the
    longest), ``index`` maps each row to its prompt. Generated sets repeat prompts (several
    images per prompt), so the alignment head projects each prompt's tokens once."""

    tokens: torch.Tensor  # (P, L, D) token features of the distinct prompts, joint space
    pad_mask: torch.Tensor  # (P, L) True where a position is padding
    pooled: torch.Tensor  # (B, D) pooled prompt embedding (CLIP text embedding) per row
    has_prompt: torch.Tensor  # (B,) False where the row has no prompt
    truncated: torch.Tensor  # (B,) True where the prompt was cut to the context length
    index: torch.Tensor  # (B,) row -> distinct prompt (rows without one share an empty entry)


class GatedFusion(nn.Module):
    """z = g * (W_c f_c) + (1 - g) * (W_f f_f),  g = sigmoid(W_g ReLU(W_h [f_c; f_f]))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(2 * dim, hidden)
        self.gate = nn.Linear(hidden, dim)
        self.coarse_proj = nn.Linear(dim, dim)
        self.fine_proj = nn.Linear(dim, dim)
        for proj in (self.coarse_proj, self.fine_proj):
            nn.init.eye_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, coarse: torch.Tensor, fine: torch.Tensor, gate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if gate is None:
            gate = torch.sigmoid(self.gate(F.relu(self.hidden(torch.cat([coarse, fine], -1)))))
        fused = gate * self.coarse_proj(coarse) + (1 - gate) * self.fine_proj(fine)
        return fused, gate


class QualityHead(nn.Module):
    """Cosine of the image embedding with graded text prompts -> softmax -> expected grade."""

    def __init__(self, grade_text: torch.Tensor, init_logit_scale: float):
        super().__init__()
        # Derived from the frozen text tower at build time, so not part of a checkpoint.
        self.register_buffer("grade_text", F.normalize(grade_text, dim=-1), persistent=False)
        grades = torch.arange(1, grade_text.shape[0] + 1, dtype=torch.float32)
        self.register_buffer("grade_values", grades, persistent=False)
        init = min(max(init_logit_scale, 1.0), MAX_LOGIT_SCALE)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init)))

    @property
    def num_grades(self) -> int:
        return int(self.grade_values.numel())

    def forward(self, image_embedding: torch.Tensor,
                grade_text: torch.Tensor | None = None) -> torch.Tensor:
        """Expected grade in [1, num_grades]. ``grade_text`` overrides the stored prompts'
        embeddings (a text tower being trained computes them live)."""
        grade_text = self.grade_text if grade_text is None else F.normalize(grade_text, dim=-1)
        scale = self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * F.normalize(image_embedding, dim=-1) @ grade_text.T
        return logits.softmax(dim=-1) @ self.grade_values


class AlignmentHead(nn.Module):
    """Image embedding attends over the prompt's tokens (masked); MLP -> score in (0, 1)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(()))  # residual gate, starts closed
        self.mlp = nn.Sequential(nn.Linear(2 * dim, mlp_hidden), nn.GELU(),
                                 nn.Linear(mlp_hidden, 1))

    def attend(self, query: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """``self.attn`` (same parameters, same result as nn.MultiheadAttention with a
        key-padding mask), with keys and values projected once per distinct prompt and then
        gathered per row: the projection was most of the head's cost on repeated prompts."""
        attn = self.attn
        batch, dim = query.shape
        heads = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        length = prompts.tokens.shape[1]
        q = F.linear(query, w_q, b_q).view(batch, heads, 1, dim // heads)
        if torch.is_grad_enabled():
            # Training: gather first, so the backward pass has no scatter-add over repeated
            # prompts (not bit-reproducible across runs on CPU threads).
            tokens = prompts.tokens[prompts.index]
            k, v = F.linear(tokens, w_k, b_k), F.linear(tokens, w_v, b_v)
        else:
            k = F.linear(prompts.tokens, w_k, b_k)[prompts.index]
            v = F.linear(prompts.tokens, w_v, b_v)[prompts.index]
        k = k.view(batch, length, heads, dim // heads).transpose(1, 2)
        v = v.view(batch, length, heads, dim // heads).transpose(1, 2)
        keep = ~prompts.pad_mask[prompts.index]  # (B, L) True where a key counts
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return attn.out_proj(out.transpose(1, 2).reshape(batch, dim))

    def forward(self, image_embedding: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        attended = self.attend(self.query_norm(image_embedding), prompts)
        h = F.normalize(image_embedding + self.alpha * attended, dim=-1)
        t = F.normalize(prompts.pooled, dim=-1)
        return torch.sigmoid(self.mlp(torch.cat([h * t, h], dim=-1)).squeeze(-1))


class MSTClipIQA(ScoringModule):
    """Two frozen towers (coarse ViT-B-32, fine ViT-B-16) + trainable fusion and heads.

    Build with :func:`iqray.model.load`. Call :meth:`score` for numbers; training code calls
    :meth:`encode_images`, :meth:`encode_prompts` and :meth:`forward_heads`.
    """

    def __init__(self, config: MSTConfig, coarse: nn.Module, fine: nn.Module,
                 tokenizer: open_clip.tokenizer.SimpleTokenizer,
                 mean: Sequence[float], std: Sequence[float], prompt_cache_size: int = 2048):
        super().__init__()
        self.config = config
        for name, tower in (("coarse", coarse), ("fine", fine)):
            check_input_size(tower, config.image_size,
                             f"{name} tower {getattr(config, name).model_name}")
        self.coarse = coarse  # image + text tower; the text side embeds prompts and grades
        self.fine_visual = fine.visual  # the fine model's text tower is never used
        self.tokenizer = tokenizer
        self.context_length = int(coarse.positional_embedding.shape[0])
        self.transform = ImageTransform(config.image_size, tuple(mean), tuple(std),
                                        config.fine_resize)

        dim = config.heads.embed_dim
        for name, tower in (("coarse", coarse), ("fine", fine)):
            out = tower_embed_dim(tower)
            if out != dim:
                raise ValueError(f"{name} tower embeds to {out}-d, heads expect {dim}-d "
                                 "(heads.embed_dim)")
        # Seeded like the towers: the same config builds the same model in every process
        # (an unseeded init made untrained heads, and any test built on them, vary by run).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_INIT_SEED)
            self.fusion = GatedFusion(dim, config.heads.fusion_hidden)
            self.quality_head = QualityHead(self._grade_text(), float(coarse.logit_scale.exp()))
            self.alignment_head = AlignmentHead(dim, config.heads.attn_heads,
                                                config.heads.align_mlp_hidden)
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, bool]] = (
            OrderedDict()
        )
        self.prompt_cache_size = prompt_cache_size
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MSTConfig, cache_dir: str | Path | None = None,
                    base_dir: str | Path | None = None, allow_download: bool | None = None,
                    ) -> MSTClipIQA:
        coarse = create_tower(config.coarse, cache_dir, base_dir, allow_download)
        fine = create_tower(config.fine, cache_dir, base_dir, allow_download)
        tokenizer = open_clip.get_tokenizer(config.coarse.model_name)
        mean, std = tower_preprocess_stats(config.coarse)
        return cls(config, coarse, fine, tokenizer, mean, std)

    def towers(self) -> list[nn.Module]:
        return [self.coarse, self.fine_visual]

    def train(self, mode: bool = True) -> MSTClipIQA:
        super().train(mode)
        if not getattr(self, "_towers_trainable", False):
            for tower in self.towers():  # frozen towers stay in eval mode (fixed norms, no dropout)
                tower.eval()
        return self

    # -- introspection --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.fusion.gate.weight.device

    @property
    def output_names(self) -> list[str]:
        return ["quality", "alignment"]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters of the fusion and heads: what a checkpoint's model.safetensors holds
        (tower weights, trained or not, travel as tower files)."""
        names = {n for n, _ in self.named_parameters()
                 if n.startswith(("fusion.", "quality_head.", "alignment_head."))}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def _grade_text(self) -> torch.Tensor:
        """Pooled text embeddings of the graded quality prompts."""
        prompts = [self.config.heads.quality_template.format(g)
                   for g in self.config.heads.quality_grades]
        return self._encode_text_tokens(self._tokenize(prompts)[0])[1]

    def refresh_grade_text(self) -> None:
        """Recompute the stored grade-prompt embeddings (after the text tower changed)."""
        with torch.no_grad():
            self.quality_head.grade_text = F.normalize(self._grade_text(), dim=-1)
        self.clear_prompt_cache()

    def set_towers_trainable(self, trainable: bool) -> None:
        """Unfreeze (or freeze again) both towers, for training small towers end to end."""
        self._towers_trainable = trainable
        for tower in self.towers():
            tower.requires_grad_(trainable)
        if not trainable:
            self.refresh_grade_text()
        self.train(self.training)

    @property
    def score_range(self) -> dict[str, ScoreSpec]:
        return mst_clipiqa_outputs(self.config)

    # -- encoders (frozen) ----------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled, projected image embeddings of both towers, float32, not normalised.

        ``pixels`` has 3 channels (one view for both towers) or 6 (coarse view, fine view).
        """
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.shape[1] != self.transform.channels:
            raise ValueError(f"expected {self.transform.channels}-channel input from this "
                             f"model's transform, got {pixels.shape[1]}")
        coarse_view, fine_view = (pixels, pixels) if pixels.shape[1] == 3 else \
            (pixels[:, :3], pixels[:, 3:])
        with self._autocast():
            coarse = self.coarse.encode_image(coarse_view)
            fine = self.fine_visual(fine_view)
        return coarse.float(), fine.float()

    def _tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int], list[bool]]:
        """Token ids (N, context), true lengths, and which prompts had to be truncated."""
        ctx = self.context_length
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        ids = torch.zeros(len(prompts), ctx, dtype=torch.long)
        lengths, truncated = [], []
        for row, prompt in enumerate(prompts):
            tokens = [sot] + self.tokenizer.encode(prompt) + [eot]
            cut = len(tokens) > ctx
            if cut:
                tokens = tokens[:ctx]
                tokens[-1] = eot
            ids[row, : len(tokens)] = torch.tensor(tokens)
            lengths.append(len(tokens))
            truncated.append(cut)
        return ids, lengths, truncated

    def _encode_text_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features (N, context, D) and pooled embeddings (N, D), joint space.

        open_clip's ``encode_text`` returns only the pooled vector; this is the same path
        (token + positional embedding, causal transformer, final LayerNorm) keeping every
        token. With the causal mask, features up to the end token ignore the padding after it.
        """
        text = self.coarse
        ids = ids.to(self.device)
        with self._autocast():
            cast = text.transformer.get_cast_dtype()
            x = text.token_embedding(ids).to(cast) + text.positional_embedding.to(cast)
            x = text.transformer(x, attn_mask=text.attn_mask)
            x = text.ln_final(x)
            pooled = text_global_pool(x, ids, text.text_pool_type,
                                      eos_token_id=getattr(text, "text_eos_id", None))
            if isinstance(text.text_projection, nn.Linear):
                x, pooled = text.text_projection(x), text.text_projection(pooled)
            elif text.text_projection is not None:
                x, pooled = x @ text.text_projection, pooled @ text.text_projection
        return x.float(), pooled.float()

    def prompt_features(self, prompts: Sequence[str]
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
        """Per distinct prompt: (token features (L, D) up to its end token, pooled (D,),
        truncated). Served from the LRU cache where possible; misses are encoded in one pass
        and cached."""
        distinct = list(dict.fromkeys(prompts))
        features = {p: self._cache_get(p) for p in distinct if p in self._prompt_cache}
        missing = [p for p in distinct if p not in features]
        self.prompt_cache_hits += len(features)
        self.prompt_cache_misses += len(missing)
        if missing:
            ids, lengths, truncated = self._tokenize(missing)
            with torch.inference_mode():
                tokens, pooled = self._encode_text_tokens(ids)
            for i, prompt in enumerate(missing):
                features[prompt] = (tokens[i, : lengths[i]].clone(), pooled[i].clone(),
                                    truncated[i])
                self._cache_put(prompt, features[prompt])
        return features

    def prime_prompt_cache(self, features: dict[str, tuple[Any, Any, bool]]) -> None:
        """Fill the prompt cache from stored features (an embedding cache), growing it so
        that nothing primed is evicted."""
        self.prompt_cache_size = max(self.prompt_cache_size, len(features))
        for prompt, (tokens, pooled, truncated) in features.items():
            self._cache_put(prompt, (torch.as_tensor(tokens, dtype=torch.float32,
                                                     device=self.device),
                                     torch.as_tensor(pooled, dtype=torch.float32,
                                                     device=self.device), bool(truncated)))

    def encode_prompts(self, prompts: Sequence[str | None], grad: bool = False) -> PromptBatch:
        """Prompt features for a batch; each distinct prompt is encoded once (LRU cached).

        ``grad=True`` (training the text tower) bypasses the cache and keeps the graph."""
        present = [_clean_prompt(p) for p in prompts]
        distinct = list(dict.fromkeys(p for p in present if p is not None))
        if grad and distinct:
            ids, lengths, cut = self._tokenize(distinct)
            tokens, pooled = self._encode_text_tokens(ids)
            features = {p: (tokens[i, : lengths[i]], pooled[i], cut[i])
                        for i, p in enumerate(distinct)}
        else:
            features = self.prompt_features(distinct)

        dim = self.config.heads.embed_dim
        entries: list[str | None] = list(distinct)
        if any(p is None for p in present):
            entries.append(None)  # rows without a prompt share one entry
        position = {p: j for j, p in enumerate(entries)}
        longest = max((features[p][0].shape[0] for p in distinct), default=1)
        # Rows are written into padded tensors; the copies carry gradients when grad=True.
        tokens = torch.zeros(len(entries), longest, dim, device=self.device)
        pad_mask = torch.ones(len(entries), longest, dtype=torch.bool, device=self.device)
        distinct_pooled = torch.zeros(len(entries), dim, device=self.device)
        for j, prompt in enumerate(entries):
            if prompt is None:
                pad_mask[j, 0] = False  # one zero key, so attention stays finite; output nulled
                continue
            row_tokens, row_pooled, _ = features[prompt]
            tokens[j, : row_tokens.shape[0]] = row_tokens
            pad_mask[j, : row_tokens.shape[0]] = False
            distinct_pooled[j] = row_pooled
        index = torch.tensor([position[p] for p in present], dtype=torch.long,
                             device=self.device)
        pooled = distinct_pooled[index]
        has_prompt = torch.tensor([p is not None for p in present], dtype=torch.bool,
                                  device=self.device)
        truncated = torch.tensor([p is not None and bool(features[p][2]) for p in present],
                                 dtype=torch.bool, device=self.device)
        return PromptBatch(tokens, pad_mask, pooled, has_prompt, truncated, index)

    def _cache_get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        self._prompt_cache.move_to_end(prompt)
        return self._prompt_cache[prompt]

    def _cache_put(self, prompt: str, value: tuple[torch.Tensor, torch.Tensor, bool]) -> None:
        self._prompt_cache[prompt] = value
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda() move cached prompt features too
        self._prompt_cache.clear()
        return super()._apply(fn, recurse)

    # -- heads (trainable) ----------------------------------------------------------------
    def forward_heads(self, coarse: torch.Tensor, fine: torch.Tensor,
                      prompts: PromptBatch, group_classifier: nn.Module | None = None
                      ) -> dict[str, torch.Tensor]:
        """Normalised predictions in [0, 1] for quality and alignment (what the loss sees).

        Works from tower embeddings, so training and re-scoring can run from a cache.
        ``group_classifier`` (training only) adds ``group_logits`` computed from the fused
        embedding.
        """
        coarse = F.normalize(coarse.to(self.device).float(), dim=-1)
        fine = F.normalize(fine.to(self.device).float(), dim=-1)
        if self.zero_shot:
            grade = self.quality_head(coarse)
            cosine = (coarse * F.normalize(prompts.pooled, dim=-1)).sum(-1)
            alignment = cosine.clamp(min=0)  # CLIPScore / 2.5
        else:
            fused, _ = self.fusion(coarse, fine)
            live = getattr(self, "_towers_trainable", False) and torch.is_grad_enabled()
            grade = self.quality_head(fused, self._grade_text() if live else None)
            alignment = self.alignment_head(fused, prompts)
        quality = (grade - 1) / (self.quality_head.num_grades - 1)
        alignment = torch.where(prompts.has_prompt, alignment,
                                torch.full_like(alignment, float("nan")))
        out = {"quality": quality, "alignment": alignment}
        if group_classifier is not None:
            out["group_logits"] = group_classifier(coarse if self.zero_shot else fused)
        return out

    def forward(self, pixels: torch.Tensor, prompts: Sequence[str | None]
                ) -> dict[str, torch.Tensor]:
        coarse, fine = self.encode_images(pixels)
        return self.forward_heads(coarse, fine, self.encode_prompts(prompts))

    def reset_heads(self, seed: int) -> None:
        """Fresh, seeded fusion and heads (one training repeat); towers are untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = self.config.heads
            self.fusion = GatedFusion(heads.embed_dim, heads.fusion_hidden)
            self.quality_head = QualityHead(self.quality_head.grade_text.cpu(),
                                            float(self.coarse.logit_scale.exp()))
            self.alignment_head = AlignmentHead(heads.embed_dim, heads.attn_heads,
                                                heads.align_mlp_hidden)
        self.fusion.to(self.device)
        self.quality_head.to(self.device)
        self.alignment_head.to(self.device)

    def reset_towers(self, seed: int) -> None:
        """Re-initialise random-init towers from ``seed`` (towers trained from scratch)."""
        from iqray.model.weights import create_tower

        for role in ("coarse", "fine"):
            tower = getattr(self.config, role)
            if tower.pretrained is not None:
                raise ValueError(f"{role} tower has pretrained weights ({tower.pretrained}); "
                                 "only random-init towers are re-initialised")
            fresh = create_tower(tower.model_copy(update={"init_seed": tower.init_seed
                                                          + 1000 * seed}))
            fresh.to(self.device)
            if role == "coarse":
                self.coarse.load_state_dict(fresh.state_dict())
            else:
                self.fine_visual.load_state_dict(fresh.visual.state_dict())
        self.refresh_grade_text()

    @torch.inference_mode()
    def score_embeddings(self, coarse, fine, prompts: Sequence[str | None],
                         batch_size: int = 256) -> dict[str, np.ndarray]:
        """Like :meth:`score`, from cached tower embeddings: only the heads run."""
        coarse = torch.as_tensor(np.asarray(coarse), dtype=torch.float32)
        fine = torch.as_tensor(np.asarray(fine), dtype=torch.float32)
        out: dict[str, list[np.ndarray]] = {"quality": [], "alignment": [],
                                            "prompt_truncated": []}
        for start in range(0, len(prompts), batch_size):
            batch = self.encode_prompts(prompts[start : start + batch_size])
            scores = self.to_score_scale(self.forward_heads(
                coarse[start : start + batch_size], fine[start : start + batch_size], batch))
            out["quality"].append(scores["quality"].cpu().numpy())
            out["alignment"].append(scores["alignment"].cpu().numpy())
            out["prompt_truncated"].append(batch.truncated.cpu().numpy())
        if not out["quality"]:
            return {"quality": np.zeros(0, np.float32), "alignment": np.zeros(0, np.float32),
                    "prompt_truncated": np.zeros(0, bool)}
        return {k: np.concatenate(v) for k, v in out.items()}

    # -- the public scoring call: ScoringModule.score over this -----------------------------
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str | None]
                     ) -> dict[str, torch.Tensor]:
        """``quality`` and ``alignment`` (NaN where there is no prompt) on the scales in
        :attr:`score_range`, and bool ``prompt_truncated``, for normalised crops. Scores do
        not depend on batch size or on the other rows of a batch."""
        prompt_batch = self.encode_prompts(prompts)
        coarse, fine = self.encode_images(pixels)
        scores = self.to_score_scale(self.forward_heads(coarse, fine, prompt_batch))
        return {**scores, "prompt_truncated": prompt_batch.truncated}


def _clean_prompt(prompt: str | None) -> str | None:
    if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
        return None
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be str or None, got {type(prompt).__name__}")
    return prompt if prompt.strip() else None

