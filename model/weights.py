"""Where tower weights come from, and nothing else (like open_clip's ``pretrained.py``).

Resolution order for a tower's ``pretrained`` value:

1. an explicit local file (``.safetensors``);
2. an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...) found in a cache
   dir: ``cache_dir`` argument, ``$IQRAY_CACHE_DIR``, ``~/.cache/iqray``, the Hugging Face
   hub cache (``$HF_HUB_CACHE``), and open_clip's URL cache (``~/.cache/clip``);
3. a download through open_clip into the cache, only where downloads are allowed
   (not with ``IQRAY_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``);
4. otherwise :class:`WeightsNotFoundError`, naming the options and every path it looked in.

Only safetensors files are ever loaded: pickled checkpoints (``.pt``, ``.bin``, ...) are
refused, since unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from iqray.model.config import TowerConfig

if TYPE_CHECKING:
    import torch

_REGISTERED = False


def _open_clip():
    """open_clip, imported on first use (torch with it: seconds), with this package's tower
    configs registered: the tiny test towers and the shipped small towers are just more
    open_clip model configs. Resolving a tower given as a file needs neither."""
    global _REGISTERED
    import open_clip

    if not _REGISTERED:
        open_clip.add_model_config(Path(__file__).parent / "configs" / "towers")
        _REGISTERED = True
    return open_clip

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
SAFE_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


class WeightsNotFoundError(FileNotFoundError):
    """No weights for a tower could be found; the message says where it looked."""


class UnsafeCheckpointError(ValueError):
    """A pickled file was offered where only safetensors are accepted."""


def downloads_allowed() -> bool:
    return not (_env_true("IQRAY_OFFLINE") or _env_true("HF_HUB_OFFLINE"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def default_cache_dirs(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs: list[Path] = []
    if cache_dir:
        dirs.append(Path(cache_dir).expanduser())
    if os.environ.get("IQRAY_CACHE_DIR"):
        dirs.append(Path(os.environ["IQRAY_CACHE_DIR"]).expanduser())
    dirs.append(Path("~/.cache/iqray").expanduser())
    from huggingface_hub import constants as hf_constants

    dirs.append(Path(hf_constants.HF_HUB_CACHE))
    dirs.append(Path("~/.cache/clip").expanduser())
    # Keep order, drop repeats.
    return list(dict.fromkeys(dirs))


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path}: pickled checkpoints are refused (unpickling runs arbitrary code). "
            "Convert it once, on a machine you trust, to safetensors: "
            "`from safetensors.torch import save_file; "
            "save_file(torch.load(p, weights_only=True), 'tower.safetensors')`."
        )


def looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith((".", "~"))
        or value.lower().endswith((".safetensors",) + PICKLE_SUFFIXES)
    )


def resolve_tower_weights(
    tower: TowerConfig,
    cache_dir: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
    allow_download: bool | None = None,
) -> Path | None:
    """Return the local safetensors file for ``tower``, or None for a random-init tower.

    ``base_dir`` anchors relative file paths (a checkpoint directory that ships its towers).
    """
    value = tower.pretrained
    if value is None:
        return None

    if looks_like_path(value):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        refuse_pickle(path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"tower {tower.model_name}: weights file {path} does not exist. Give an existing "
                ".safetensors file, or an open_clip pretrained tag (e.g. 'openai')."
            )
        return path

    tag_cfg = _open_clip().get_pretrained_cfg(tower.model_name, value)
    if not tag_cfg:
        known = _open_clip().list_pretrained_tags_by_model(tower.model_name)
        raise WeightsNotFoundError(
            f"tower {tower.model_name}: {value!r} is neither an existing file nor an open_clip "
            f"pretrained tag for this model; known tags: {', '.join(known) or 'none'}."
        )

    looked_in: list[str] = []
    found = _find_cached(tag_cfg, default_cache_dirs(cache_dir), looked_in)
    if found is not None:
        return found

    if allow_download is None:
        allow_download = downloads_allowed()
    download_error = ""
    if allow_download and tag_cfg.get("hf_hub"):
        try:
            return _download(tag_cfg, cache_dir)
        except Exception as exc:  # network, auth, missing file: reported below with the options
            download_error = f" The download failed: {exc}."
    elif not allow_download:
        download_error = " Downloads are off (IQRAY_OFFLINE/HF_HUB_OFFLINE)."

    raise WeightsNotFoundError(
        f"tower {tower.model_name} with pretrained tag {value!r}: no safetensors weights found."
        f"{download_error}\nLooked in:\n  " + "\n  ".join(looked_in) + "\n"
        "Options: (1) set the tower's `pretrained` to a local .safetensors file; "
        "(2) put the open_clip weights for this tag in one of the cache dirs above "
        "(e.g. run once with network access, or copy ~/.cache/huggingface/hub from a machine "
        "that has them); (3) pass cache_dir= / set IQRAY_CACHE_DIR to where they are."
    )


def _hf_repo_and_names(tag_cfg: dict) -> tuple[str, list[str]]:
    """Hub repo id and the safetensors file names open_clip would fetch for this tag."""
    # open_clip's form: 'org/repo/' (default file name) or 'org/repo/file.bin'.
    repo_id, filename = os.path.split(tag_cfg["hf_hub"])
    if not filename or filename == "open_clip_pytorch_model.bin":
        return repo_id, list(SAFE_WEIGHT_NAMES)
    if filename.endswith(".safetensors"):
        return repo_id, [filename]
    return repo_id, [os.path.splitext(filename)[0] + ".safetensors"]


def _find_cached(tag_cfg: dict, dirs: Iterable[Path], looked_in: list[str]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hf_repo, hf_names = _hf_repo_and_names(tag_cfg) if tag_cfg.get("hf_hub") else (None, [])
    url_name = os.path.basename(tag_cfg.get("url", ""))
    for folder in dirs:
        if hf_repo:
            for name in hf_names:
                looked_in.append(f"{folder} (Hugging Face cache layout: {hf_repo}/{name})")
                hit = try_to_load_from_cache(hf_repo, name, cache_dir=str(folder))
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
            for name in hf_names:
                # A flat copy: <dir>/<org>--<repo>/<file> or <dir>/<file>.
                for candidate in (folder / hf_repo.replace("/", "--") / name, folder / name):
                    looked_in.append(str(candidate))
                    if candidate.is_file():
                        return candidate
        if url_name.endswith(".safetensors"):
            candidate = folder / url_name
            looked_in.append(str(candidate))
            if candidate.is_file():
                return candidate
    return None


def _download(tag_cfg: dict, cache_dir: str | os.PathLike | None) -> Path:
    repo_id, names = _hf_repo_and_names(tag_cfg)
    path = _open_clip().pretrained.download_pretrained_from_hf(
        repo_id, filename=names[0], cache_dir=str(cache_dir) if cache_dir else None
    )
    return Path(path)


def tower_preprocess_stats(tower: TowerConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std the tower was trained with (CLIP's unless the tag says else)."""
    cfg = {}
    if tower.pretrained and not looks_like_path(tower.pretrained):
        cfg = _open_clip().get_pretrained_cfg(tower.model_name, tower.pretrained)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))


def tower_input_size(tower: torch.nn.Module) -> int:
    """The square input size an open_clip model's image tower takes (``image_size`` is an
    int or an (h, w) pair depending on the tower type)."""
    size = tower.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def check_input_size(tower: torch.nn.Module, image_size: int, what: str) -> None:
    """ValueError unless the tower takes the config's ``image_size`` (``what`` names it)."""
    size = tower_input_size(tower)
    if size != image_size:
        raise ValueError(f"{what} takes {size} px input, config says image_size={image_size}")


def tower_embed_dim(tower: torch.nn.Module) -> int:
    """The width of an open_clip model's projected image embedding."""
    return int(getattr(tower.visual, "output_dim", 0) or tower.text_projection.shape[-1])


def create_tower(
    tower: TowerConfig,
    cache_dir: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
    allow_download: bool | None = None,
) -> torch.nn.Module:
    """Build an open_clip CLIP model for ``tower`` with its weights, frozen and in eval mode."""
    import torch

    open_clip = _open_clip()
    weights = resolve_tower_weights(tower, cache_dir, base_dir, allow_download)
    quick_gelu = False
    if tower.pretrained and not looks_like_path(tower.pretrained):
        quick_gelu = bool(open_clip.get_pretrained_cfg(tower.model_name, tower.pretrained).get(
            "quick_gelu", False
        ))
    if tower.model_name not in open_clip.list_models():
        from iqray.model.registry import UnknownModel

        raise UnknownModel(
            f"unknown open_clip model {tower.model_name!r}; register its JSON config with "
            "open_clip.add_model_config(path) first."
        )
    if weights is None:
        # Random init must be reproducible: the same seed gives the same tower.
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(tower.init_seed)
            model = open_clip.create_model(tower.model_name, pretrained=None,
                                           force_quick_gelu=quick_gelu,
                                           force_image_size=tower.image_size)
    else:
        with _quiet_random_init_warning():  # weights are loaded right below
            model = open_clip.create_model(tower.model_name, pretrained=None,
                                           force_quick_gelu=quick_gelu,
                                           force_image_size=tower.image_size)
        try:
            _load_tower_file(model, weights)
        except Exception as exc:
            raise ValueError(
                f"tower {tower.model_name}: weights in {weights} do not fit this model: {exc}"
            ) from exc
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger when it builds a tower without weights; here that
    is either asked for (random init) or followed by our own load, so the warning misleads."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _load_tower_file(model: torch.nn.Module, path: Path) -> None:
    """Full open_clip weights, or a vision-only file (``visual.*``) for a tower whose text
    side is never used (MST-CLIPIQA's fine tower)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if keys and all(k.startswith("visual.") for k in keys):
        from safetensors.torch import load_file

        state = {k[len("visual."):]: v for k, v in load_file(str(path)).items()}
        model.visual.load_state_dict(state, strict=True)
    else:
        _open_clip().load_checkpoint(model, str(path), strict=True)
