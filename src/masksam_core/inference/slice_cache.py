"""Slice embeddings of one volume, encoded once and cached, and prompt decoding on them.

SAM's image encoder is nearly all of a prompt's cost (LiteMedSAM on 2 CPU cores: about a second
per slice; the prompt encoder and mask decoder: tens of milliseconds). :class:`SliceEncoder` owns
one volume, one backbone and one intensity window; each slice is encoded the first time a prompt
needs it (or ahead of time by :meth:`SliceEncoder.encode_iter`, a progress generator) and its
embedding kept in an :class:`EmbeddingCache`, a least-recently-used store bounded by bytes, in
bf16 by default (half the memory of fp32; the decoder's logits move by about 1e-2). Every later
prompt on that slice runs only the prompt encoder and mask decoder (:meth:`SliceEncoder.decode`).

Slices are prepared exactly as :class:`BoxPrompter`'s zero-shot path prepares them (clip to the
window, :class:`SliceFrame` resize, scale and pad), so with fp32 storage the logits equal it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import autocast_dtype, select_device
from ..errors import MaskSAMError
from ..modeling.backbone import SamBackbone
from ..progress import drive
from .box_prompt import SliceFrame
from .sliding_window import Progress
from .windows import Window, intensity_range

__all__ = ["Decoded", "EmbeddingCache", "SliceEncoder"]

DEFAULT_CACHE_BYTES = 2 * 1024**3


class EmbeddingCache:
    """Slice index -> embedding tensor, least recently used dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, dtype: torch.dtype = torch.bfloat16) -> None:
        self.max_bytes, self.dtype = int(max_bytes), dtype
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, z: int) -> bool:
        return z in self._items

    def __len__(self) -> int:
        return len(self._items)

    def slices(self) -> list[int]:
        """The cached slice indices, least recently used first."""
        return list(self._items)

    def get(self, z: int) -> torch.Tensor | None:
        """The stored embedding of slice ``z`` (now most recently used), or None."""
        item = self._items.get(z)
        if item is not None:
            self._items.move_to_end(z)
        return item

    def put(self, z: int, embedding: torch.Tensor) -> None:
        """Store slice ``z``'s embedding on the CPU in the cache's dtype, evicting the oldest beyond the budget."""
        if z in self._items:
            self.nbytes -= self._items.pop(z).nbytes
        item = embedding.detach().to("cpu", self.dtype).contiguous()
        self._items[z] = item
        self.nbytes += item.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


@dataclass(frozen=True)
class Decoded:
    """One decoded prompt on one slice: logits on the slice grid (Y, X), SAM's low-resolution logits
    (L, L) in SAM's input frame (usable as the next mask prompt) and SAM's predicted IoU."""

    logits: torch.Tensor
    low: torch.Tensor
    iou: float

    @property
    def mask(self) -> np.ndarray:
        return (self.logits > 0).numpy()


class SliceEncoder:
    """One volume (Z, Y, X) + one zero-shot backbone + one window: cached encoding, prompt decoding.

    Args:
        volume: the scan as read, axes (Z, Y, X).
        sam: a :class:`SamBackbone` (e.g. ``load_sam_backbone("lite")``).
        window: see :mod:`.windows` (``auto``: soft-tissue for HU CT, else percentiles).
        device / amp: as :class:`BoxPrompter`'s.
        cache_bytes / cache_dtype: the embedding cache's budget and storage dtype.
    """

    def __init__(self, volume: np.ndarray, sam: SamBackbone, *, window: Window = "auto", device: str = "auto",
                 amp: str = "auto", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache_dtype: torch.dtype = torch.bfloat16) -> None:
        volume = np.asarray(volume)
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise MaskSAMError(f"interactive prompts take one (Z, Y, X) volume, got shape {volume.shape}")
        self.volume = volume
        self.shape: tuple[int, int, int] = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
        self.device = select_device(device)
        self.amp = autocast_dtype(self.device, amp, cpu_bf16=True)
        self.sam = sam.to(self.device).eval()
        self.window = intensity_range(volume, window)
        self.frame = SliceFrame(self.shape[1], self.shape[2], sam.image_size)
        self.cache = EmbeddingCache(cache_bytes, cache_dtype)
        self._pe = None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def image(self, z: int) -> torch.Tensor:
        """SAM's input (3, S, S) for slice ``z``."""
        low, high = self.window
        x = torch.from_numpy(np.clip(self.volume[z].astype(np.float32), low, high)).to(self.device)
        return self.frame.image(x, self.sam.pixel_mean, self.sam.pixel_std)

    def check_slice(self, z: int) -> int:
        if not 0 <= int(z) < self.shape[0]:
            raise MaskSAMError(f"slice {z} is outside the volume (0 <= Z < {self.shape[0]})")
        return int(z)

    @torch.no_grad()
    def embedding(self, z: int) -> torch.Tensor:
        """Slice ``z``'s image embedding (1, D, h, w) on the device; encoded now unless cached."""
        z = self.check_slice(z)
        cached = self.cache.get(z)
        if cached is None:
            with self._autocast():
                emb = self.sam.image_encoder(self.image(z)[None]).float()
            self.cache.put(z, emb)  # stored in the cache's dtype; used in that precision as later calls would
            cached = self.cache.get(z)
            if cached is None:  # a budget below one slice keeps nothing
                cached = emb.to(self.cache.dtype)
        return cached.to(self.device, torch.float32)

    def encode_iter(self, slices: Iterable[int] | None = None) -> Generator[Progress, None, int]:
        """Encode ``slices`` (default: the whole volume) not yet cached; yields :class:`Progress` per slice,
        returns how many were encoded. Closing the generator stops before the next slice."""
        todo = [self.check_slice(z) for z in (range(self.shape[0]) if slices is None else slices)]
        todo = [z for z in dict.fromkeys(todo) if z not in self.cache]
        start = time.perf_counter()
        for done, z in enumerate(todo, 1):
            self.embedding(z)
            yield Progress(done, len(todo), time.perf_counter() - start)
        return len(todo)

    def encode(self, slices: Iterable[int] | None = None) -> int:
        """:meth:`encode_iter` run to the end."""
        return drive(self.encode_iter(slices))

    def encode_around(self, z: int, radius: int = 2) -> int:
        """Encode the slices within ``radius`` of ``z`` (the slice in view and its neighbours)."""
        return self.encode(range(max(0, z - radius), min(self.shape[0], z + radius + 1)))

    def box(self, y0: int, x0: int, y1: int, x1: int) -> tuple[float, float, float, float]:
        """A half-open voxel box (y0, x0, y1, x1) as SAM's (x0, y0, x1, y1) input pixels."""
        return self.frame.box(y0, x0, y1, x1)

    def point(self, y: float, x: float) -> tuple[float, float]:
        """A voxel (y, x) centre as SAM's (x, y) input coordinates (the prompt encoder adds 0.5)."""
        nh, nw = self.frame.resized
        return (x + 0.5) * nw / self.shape[2] - 0.5, (y + 0.5) * nh / self.shape[1] - 0.5

    def mask_prompt(self, mask: np.ndarray, strength: float = 8.0) -> torch.Tensor:
        """A binary slice mask (Y, X) as low-resolution mask-prompt logits (L, L): +strength inside, -strength out."""
        size, low_side = self.sam.image_size, 4 * self.sam.embedding_size
        nh, nw = self.frame.resized
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
        m = torch.nn.functional.interpolate(m, size=(nh, nw), mode="bilinear", align_corners=False)
        m = torch.nn.functional.pad(m, (0, size - nw, 0, size - nh))
        m = torch.nn.functional.interpolate(m, size=(low_side, low_side), mode="bilinear", align_corners=False)
        return ((m[0, 0] > 0.5).float() * 2 - 1) * strength

    @torch.no_grad()
    def decode(self, z: int, box: Sequence[int] | None = None, points: Sequence[tuple[float, float, bool]] = (),
               mask: torch.Tensor | None = None) -> Decoded:
        """Prompt slice ``z``: ``box`` half-open (y0, x0, y1, x1), ``points`` (y, x, positive) voxels, ``mask``
        low-resolution logits (L, L) as SAM's mask prompt. At least one prompt is needed."""
        if box is None and not points and mask is None:
            raise MaskSAMError("a prompt needs a box, a point or a mask")
        emb = self.embedding(z)
        dev = self.device
        boxes = None if box is None else torch.tensor([self.box(*box)], dtype=torch.float32, device=dev)
        pts = None
        if points:
            coords = torch.tensor([[self.point(y, x) for y, x, _ in points]], dtype=torch.float32, device=dev)
            labels = torch.tensor([[1 if p else 0 for *_, p in points]], dtype=torch.int64, device=dev)
            pts = (coords, labels)
        masks = None if mask is None else mask.to(dev, torch.float32)[None, None]
        if self._pe is None:
            self._pe = self.sam.prompt_encoder.get_dense_pe()
        with self._autocast():
            sparse, dense = self.sam.prompt_encoder(points=pts, boxes=boxes, masks=masks)
            low, iou = self.sam.mask_decoder(image_embeddings=emb, image_pe=self._pe, sparse_prompt_embeddings=sparse,
                                             dense_prompt_embeddings=dense, multimask_output=False)
        low = low[0, 0].float().cpu()
        return Decoded(self.frame.logits(low[None])[0], low, float(iou[0, 0]))
