"""iqray.pipeline.io: storage, shard discovery, one reader per input format, the shard writer
with resume planning, and the embedding cache. Plain functions over fsspec and pyarrow:
imports neither Ray nor torch, so each part is tested without a cluster and runs in any
Ray task."""
