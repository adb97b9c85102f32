"""The embed stage: ``Embedder`` (the actor pool's callable class: frozen-tower embeddings of
every decodable image not already cached) and ``EmbedSink`` (embeddings into the cache, the
row index through a ShardWriter); `iqray embed` (jobs/embed.py) runs them. Prompt token
features are computed once per distinct prompt on the driver (``embed_prompts``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from iqray.pipeline import rows as R
from iqray.pipeline.io.embed_cache import EmbeddingCache
from iqray.pipeline.io.writer import ShardWriter
from iqray.pipeline.scoring import ModelStage, split_on_oom
from iqray.pipeline.staging import ModelSpec

PROMPT_CHUNK = 256


class Embedder(ModelStage):
    """The towers' embeddings (one per tower role, side by side in one row) for every
    decodable image not already cached."""

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None,
                 prompt_cache_size: int = 4096, known: list | None = None,
                 dtype: str = "float16", precision: str = "fp32", compile: bool = False):
        # A cache is shared by every later run of the same towers: fp32 towers only
        # (compiled towers are fp32 too).
        super().__init__(spec, device, threads, prompt_cache_size, compile=compile)
        self.known_ref = known
        self.dtype = np.dtype(dtype)

    name = "Embedder"
    contract = "embed"

    def setup(self) -> None:
        super().setup()
        known = self.known_ref
        self.known: set[str] = set()
        if known:  # an object ref on Ray (one copy for every actor), the set in process
            if isinstance(known[0], set | frozenset):
                self.known = set(known[0])
            else:
                import ray

                self.known = ray.get(known[0])

    def _embed(self, pixels: torch.Tensor, prompts: list) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            normalised = self.model.transform.normalize(pixels.to(self.model.device))
            vectors = self.model.encode_images(normalised)
        return {role: v.cpu().numpy() for role, v in zip(self.roles, vectors, strict=True)}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.model.config.tower_roles)

    def add_outputs(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        count, dim = len(ok), self.model.config.embedding_dim
        embeddings = np.zeros((count, len(self.roles) * dim), self.dtype)
        error = np.zeros(count, np.float32)
        todo = np.array([bool(ok[i]) and batch[R.IMAGE_SHA256][i] not in self.known
                         for i in range(count)], dtype=bool)
        index = np.flatnonzero(todo)
        if index.size:
            out = split_on_oom(self._embed, self.pixels(batch, index), [None] * index.size)
            for number, role in enumerate(self.roles):
                exact = out[role]
                columns = slice(number * dim, (number + 1) * dim)
                embeddings[index, columns] = exact.astype(self.dtype)
                # Storage error on the unit sphere, which is what the heads consume.
                unit = exact / np.linalg.norm(exact, axis=1, keepdims=True)
                stored = embeddings[index, columns].astype(np.float32)
                stored /= np.linalg.norm(stored, axis=1, keepdims=True)
                error[index] = np.maximum(error[index], np.abs(unit - stored).max(axis=1))
        batch[R.EMBEDDINGS] = embeddings
        batch[R.EMBEDDED] = todo
        batch[R.EMBED_ERROR] = error


class EmbedSink:
    """Embeddings into cache parts, row index into per-shard files (after the parts)."""

    def __init__(self, cache: EmbeddingCache, writer: ShardWriter, dim: int):
        self.cache, self.writer, self.dim = cache, writer, dim
        self.added: set[str] = set()
        self.max_error = 0.0
        self.embedded = 0

    def add(self, table: pa.Table) -> None:
        fresh = table.filter(table[R.EMBEDDED])
        if fresh.num_rows:
            shas = fresh[R.IMAGE_SHA256].to_pylist()
            keep = [i for i, sha in enumerate(shas) if sha not in self.added]
            # The same image twice in one run: both rows were embedded, one is stored.
            fresh = fresh.take(pa.array(keep, pa.int64()))
            shas = [shas[i] for i in keep]
            self.added.update(shas)
            self.embedded += len(shas)
            side_by_side = _vectors(fresh[R.EMBEDDINGS], self.dim * len(self.cache.roles))
            self.cache.add_images(shas, *np.split(side_by_side, len(self.cache.roles), axis=1))
            self.max_error = max(self.max_error, pc.max(fresh[R.EMBED_ERROR]).as_py() or 0.0)
        self.writer.add(table)

    def finish(self) -> None:
        self.writer.finish()
        self.cache.flush()

    def tally(self):
        return self.writer.tally()


def _vectors(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    array = column.combine_chunks()
    if isinstance(array.type, pa.FixedShapeTensorType) or hasattr(array, "to_numpy_ndarray"):
        return array.to_numpy_ndarray()
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False)).reshape(len(array), dim)


def embed_prompts(cache: EmbeddingCache, spec: ModelSpec, prompts: set[str]) -> int:
    """Token features of every prompt not yet cached, on the driver (text tower only)."""
    missing = sorted(prompts - cache.prompt_keys())
    if not missing:
        return 0
    model = spec.load("cpu")
    for start in range(0, len(missing), PROMPT_CHUNK):
        chunk = missing[start : start + PROMPT_CHUNK]
        features = model.prompt_features(chunk)
        cache.add_prompts({p: (t.cpu().numpy(), v.cpu().numpy(), cut)
                           for p, (t, v, cut) in features.items()})
        model.clear_prompt_cache()
    return len(missing)
