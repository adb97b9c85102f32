"""Shared fixtures: the shipped sample and tiny random-init models (never any download)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("IQRAY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample"


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    with open(SAMPLE / "prompts.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = SAMPLE / "images" / row["name"]
    return rows
