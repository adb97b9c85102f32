"""The installed iqray's version (package metadata; no torch, for `iqray --version`)."""

from __future__ import annotations


def iqray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iqray")
    except PackageNotFoundError:
        return "0+unknown"
