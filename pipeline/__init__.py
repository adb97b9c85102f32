"""iqray.pipeline: the Ray Data graph (readers -> decode tasks -> model actors) and the I/O it
needs (:mod:`iqray.pipeline.io`, Ray-free), plus the driver-side table work of the dataset
jobs (:mod:`iqray.pipeline.tables`, Ray-free).

Never trains; builds on :mod:`iqray.model` for everything torch. Importing this package
imports neither Ray nor torch.
"""


def __getattr__(name: str):
    # Lazy: `import iqray.pipeline` stays cheap (no Ray, no torch) for the CLI and the
    # Ray-free subpackages; the stage is imported on first use.
    if name == "score_dataset":
        from iqray.pipeline.dataset import score_dataset

        return score_dataset
    raise AttributeError(f"module 'iqray.pipeline' has no attribute {name!r}")


__all__ = ["score_dataset"]
