"""iqray.pipeline: the Ray Data graph (readers -> decode tasks -> model actors) and the I/O it
needs (:mod:`iqray.pipeline.io`, Ray-free), plus the driver-side table work of the dataset
jobs (:mod:`iqray.pipeline.tables`, Ray-free).

Never trains; builds on :mod:`iqray.model` for everything torch. Importing this package
imports neither Ray nor torch.
"""
