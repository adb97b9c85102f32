"""iqray.pipeline: Ray Data readers, decode, scoring actors, writers and resume.

Never trains; builds on :mod:`iqray.model` for everything torch.
"""
