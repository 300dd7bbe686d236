"""The paper's image transforms (PAPER.md §Data), kept in uint8 until the last moment.

Both transforms first make the paper's 256×256 image: rescale the shorter side to ``resize`` and
centre-crop ``resize``×``resize``. This is done in one step: the central square of the source
(integer offsets) is resized to ``resize``×``resize`` with an antialiased bilinear filter
(torch's uint8 path). Training then takes a random ``crop``×``crop`` patch and flips it
half the time; evaluation takes the centre patch. :func:`normalize_batch` subtracts the mean
RGB at the end, on a whole batch, wherever the batch lives.

PCA colour noise, the paper's third augmentation, adds one RGB offset per image
(:func:`pca_lighting_offset`); it is drawn with the crop from the same per-image generator and
added by :func:`normalize_batch` together with the mean subtraction, batched and in float, so the
images stay uint8 until then. Evaluation can also take the paper's ten views
(:class:`TenViewTransform`).

Decoding. :func:`decode_rgb` decodes a whole image (evaluation, and any file the region decoder
cannot take). A training view needs only the source window of its crop, about 70% of a typical
photo's pixels, so :meth:`TrainTransform.from_jpeg` draws the crop first, reads the JPEG's size
and decodes just that window with libjpeg-turbo (:func:`region_size`, :func:`decode_region`:
the C extension ``data._jpegroi``, data/_jpegroi.c). The window's pixels equal a full decode's
bit for bit, so the view is the one ``TrainTransform()(decode_rgb(jpg), rng)`` gives. Without
the extension (no compiler at install time) every image is decoded whole, with one warning.

Resizing. The same extension resizes a training view's window, flips it and writes it into its
row of the batch in one C call (``_jpegroi.resample``; ``_jpegroi.decode_view`` does it right
after the region decode, so the window never reaches Python). It does the integer arithmetic of
torch's antialiased bilinear uint8 kernel with the same weights, so its pixels are torch's bit
for bit; without the extension torch does it (``TrainTransform._torch_view``).

Evaluation views are resized by the same extension (``_jpegroi.resize``: to a size, as
``F.interpolate(..., size=...)`` computes it), only their patches, bit for bit torch's.

Arrays, not tensors: every view is a numpy uint8 array, and PyTorch is imported only where it
computes (a resize without the extension) or is asked for (:func:`normalize_batch`), so that a
loader actor, which builds its batches with the extension, starts without it
(cluster/rank/loader.py).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import typing

import numpy as np
import simplejpeg
from PIL import Image

try:  # the region-of-interest JPEG decoder (data/_jpegroi.c), built by `pip install -e .`
    from data import _jpegroi
except ImportError:
    _jpegroi = None

__all__ = [
    "LIGHTING_VARIANTS",
    "MEAN_RGB",
    "EvalTransform",
    "TenViewTransform",
    "TrainTransform",
    "decode_region",
    "decode_rgb",
    "normalize_batch",
    "pca_lighting_offset",
    "region_size",
    "view_transform",
]

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """``MEAN_RGB`` and ``normalize_batch``, from data/normalize.py (PyTorch's) when first asked for."""
    if name in ("MEAN_RGB", "normalize_batch"):
        from data import normalize

        return getattr(normalize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# PCA colour augmentation (PAPER.md §Data): RGB eigenvectors as columns, rows R, G, B.
PCA_EIGENVECTORS = np.array([[-0.5675, 0.7192, 0.4009],
                             [-0.5808, -0.0045, -0.8140],
                             [-0.5836, -0.6948, 0.4203]])
# What multiplies α_i ~ N(0, 0.1) along eigenvector i, on the 0–255 scale:
#   paper: λ_i (eigenvalues on the 0–1 scale) × 255;
#   cuda-convnet-2012: the original code's std-devs, √λ on 0–255 (largest component first), which
#   is about 2× stronger on the first component.
PCA_SCALES = {
    "paper": np.array([0.2175, 0.0188, 0.0045]) * 255.0,
    "cuda-convnet-2012": np.array([121.78, 37.09, 19.72]),
}
LIGHTING_VARIANTS = tuple(PCA_SCALES)
PCA_ALPHA_STD = 0.1

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_TURBO_RGB_SOURCES = ("YCbCr", "Gray", "RGB")  # colour spaces libjpeg-turbo maps to RGB exactly


def decode_rgb(jpg: bytes) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 RGB array.

    JPEGs in YCbCr/grey/RGB go through simplejpeg (libjpeg-turbo); anything else (CMYK/YCCK
    JPEGs, PNGs or other formats behind a ``.jpg`` name) goes through PIL and is converted to
    RGB. Raises ``ValueError`` if neither can decode it.
    """
    if jpg[:2] == _JPEG_SOI:
        try:
            _, _, colorspace, _ = simplejpeg.decode_jpeg_header(jpg)
            if colorspace in _TURBO_RGB_SOURCES:
                return simplejpeg.decode_jpeg(jpg, colorspace="RGB")  # (H, W, 3)
        except ValueError:
            pass  # let PIL try: it is more lenient with unusual files
    try:
        with Image.open(io.BytesIO(jpg)) as image:
            return np.array(image.convert("RGB"))  # (H, W, 3), writable
    except Exception as err:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode image ({len(jpg)} bytes): {err}") from err


def region_size(jpg: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG that :func:`decode_region` can decode, else None.

    None when the extension ``data._jpegroi`` is not built (logged once), for data that is
    not a JPEG, does not end with the EOI marker (a truncated file: the region decoder stops
    at the window's last row and would not notice), or is a CMYK/YCCK JPEG.
    """
    if _jpegroi is None:
        _warn_no_region_decoder()
        return None
    if jpg[:2] != _JPEG_SOI or jpg[-2:] != _JPEG_EOI:
        return None
    try:
        height, width, colorspace, _ = _jpegroi.read_header(jpg)
    except ValueError:
        return None
    return (height, width) if colorspace in _TURBO_RGB_SOURCES else None


def decode_region(jpg: bytes, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray | None:
    """Rows [r0, r1) and columns [c0, c1) of a JPEG (one :func:`region_size` accepts), decoding
    only them: a (r1 - r0, c1 - c0, 3) uint8 view equal to ``decode_rgb(jpg)[r0:r1, c0:c1]``
    bit for bit (data/_jpegroi.c says why). None when libjpeg reports corrupt or truncated
    data, even only a warning: :func:`decode_rgb` then decides, as for any file. Releases the
    GIL while decoding.
    """
    try:
        pixels, x, stride = _jpegroi.decode_region(
            jpg, rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0]
        )
    except ValueError:
        return None
    decoded = np.frombuffer(pixels, np.uint8).reshape(rows[1] - rows[0], stride, 3)  # no copy
    return decoded[:, cols[0] - x : cols[1] - x]  # columns x.. were decoded; keep c0..c1


@functools.cache
def _warn_no_region_decoder() -> None:
    log.warning(
        "data._jpegroi is not built (needs a C compiler and libjpeg-turbo's header: apt-get "
        "install gcc libjpeg-dev, then pip install -e .): training views decode whole images, "
        "the same views but slower"
    )


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side → ``size``, centre crop ``size``×``size``: (H, W, 3) → (size, size, 3).

    The central square is resized with torch's antialiased bilinear filter on uint8, whose
    vectorised channels-last path was 2–3× faster than PIL's here (within one grey level of it).
    """
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]  # (side, side, 3)
    if side == size:
        return square
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(square).permute(2, 0, 1).unsqueeze(0)  # (1, 3, side, side), channels last
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()  # (size, size, 3)


def _to_chw(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 array → contiguous (3, H, W) uint8 array."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


class _CropTransform:
    """``crop``×``crop`` views of the ``resize``×``resize`` square (see the module docstring)."""

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        if not 0 < crop <= resize:
            raise ValueError(f"crop must be in 1..resize={resize}, got {crop}")
        self.resize, self.crop = resize, crop

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop})"

    def _patch(self, image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
        """The (3, size, size) patch at (top, left) of the image's ``resize`` square: resized
        by ``data._jpegroi.resize``, torch's filter bit for bit and only the patch computed, or
        by :func:`_square` when the extension cannot take the image."""
        if _in_c(image):
            height, width = image.shape[:2]
            side = min(height, width)
            out = np.empty((3, size, size), dtype=np.uint8)
            _jpegroi.resize(image, image.strides[0], (height - side) // 2, (width - side) // 2, side, side,
                            self.resize, self.resize, top, left, size, False, out)
            return out
        square = _square(image, self.resize)  # (resize, resize, 3)
        return _to_chw(square[top : top + size, left : left + size])


class _Plan(typing.NamedTuple):
    """How a training view is made from an image: the source window, rows [r0, r1) and columns
    [c0, c1), is resized by ``scale_factor`` (1.0: not resized), and the view is the
    ``crop``×``crop`` patch at (dy, dx) of the result."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    scale_factor: float
    dy: int
    dx: int


class TrainTransform(_CropTransform):
    """Training view: 256 square, random ``crop`` patch, random horizontal flip.

    Every random choice comes from the ``rng`` passed in, drawn in a fixed order (top, left,
    flip) before anything else, so the same generator state gives the same view.

    Only the part of the source that the patch needs is resized (a quarter less work at 256 →
    224): the source window starts at a whole source pixel, so the patch is sampled on the 256
    grid shifted by under half an output pixel, where resizing the whole square and cropping
    would start exactly at (top, left). Where no resize is needed (shards already at 256) the
    patch is an exact crop.

    The resize, flip and write into the batch's row are one C call, ``data._jpegroi.resample``
    (data/_jpegroi.c): the arithmetic of torch's antialiased bilinear uint8 kernel, so the pixels
    are those of ``F.interpolate(..., antialias=True)``, bit for bit, which is what runs when the
    extension is not built.

    Two entry points give the same view, bit for bit: calling the transform on a decoded image,
    and :meth:`from_jpeg` on the encoded bytes, which decodes only the source window (see
    :func:`decode_region`).
    """

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(H, W, 3) uint8 → (3, crop, crop) uint8 array, written into ``out`` when given."""
        top, left, flip = self._draw(rng)
        return self._view(image, top, left, flip, out)

    def from_jpeg(
        self, jpg: bytes, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Image bytes → the view ``self(decode_rgb(jpg), rng, out)`` gives, bit for bit.

        Only the source window is decoded when :func:`decode_region` can (a JPEG in YCbCr,
        grey or RGB, with the extension built), and it never reaches Python: the extension
        decodes, resizes and writes the view in one call. Any other file is decoded whole by
        :func:`decode_rgb`. Raises ``ValueError`` if neither can decode it (``rng`` has then
        given its three draws).
        """
        top, left, flip = self._draw(rng)
        size = region_size(jpg)
        if size is not None:
            view = self._target(out)
            if _decode_view(jpg, self._plan(*size, top, left), self.crop, flip, view):
                return _into(out, view)
        return self._view(decode_rgb(jpg), top, left, flip, out)

    def _draw(self, rng: np.random.Generator) -> tuple[int, int, bool]:
        """The view's random choices, in their fixed order: top, left, flip."""
        span = self.resize - self.crop + 1
        top, left = int(rng.integers(span)), int(rng.integers(span))
        return top, left, bool(rng.random() < 0.5)

    def _target(self, out: np.ndarray | None) -> np.ndarray:
        """Where the C functions write the view: ``out``, unless it is not a C-contiguous
        (3, crop, crop) uint8 array (then a new one, copied into ``out`` after)."""
        shape = (3, self.crop, self.crop)
        if out is None or out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
            return np.empty(shape, dtype=np.uint8)
        return out

    def _plan(self, height: int, width: int, top: int, left: int) -> _Plan:
        """How the patch at (top, left) of the 256 grid is made from a ``height`` × ``width``
        image (see :class:`_Plan`)."""
        side = min(height, width)
        y0, x0 = (height - side) // 2, (width - side) // 2  # the central square's corner
        if side == self.resize:  # no resize: the patch itself
            rows = (y0 + top, y0 + top + self.crop)
            return _Plan(rows, (x0 + left, x0 + left + self.crop), 1.0, 0, 0)
        scale = side / self.resize  # source pixels per output pixel
        (r0, r1), (c0, c1) = self._window(top, scale, side), self._window(left, scale, side)
        scale_factor = 1 / scale
        # where output pixel (top, left) of the full grid falls in the window's resize, whose
        # size torch computes as trunc(window * scale_factor)
        dy = self._offset(top, r0, scale, int((r1 - r0) * scale_factor))
        dx = self._offset(left, c0, scale, int((c1 - c0) * scale_factor))
        return _Plan((y0 + r0, y0 + r1), (x0 + c0, x0 + c1), scale_factor, dy, dx)

    def _view(
        self, image: np.ndarray, top: int, left: int, flip: bool, out: np.ndarray | None
    ) -> np.ndarray:
        """The view of a decoded (H, W, 3) image, written into ``out`` when given."""
        plan = self._plan(image.shape[0], image.shape[1], top, left)
        (r0, r1), (c0, c1) = plan.rows, plan.cols
        if _in_c(image):
            view = self._target(out)
            _jpegroi.resample(image, image.strides[0], r0, c0, r1 - r0, c1 - c0,
                              plan.scale_factor, plan.dy, plan.dx, self.crop, flip, view)
            return _into(out, view)
        return self._torch_view(image[r0:r1, c0:c1], plan, flip, out)

    def _torch_view(
        self, window: np.ndarray, plan: _Plan, flip: bool, out: np.ndarray | None
    ) -> np.ndarray:
        """What ``_jpegroi.resample`` does, with torch: the window (h, w, 3) → the patch."""
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(window).permute(2, 0, 1)  # (3, h, w), channels last
        if plan.scale_factor != 1.0:
            pixels = F.interpolate(pixels.unsqueeze(0), scale_factor=plan.scale_factor,
                                   mode="bilinear", antialias=True, align_corners=False,
                                   recompute_scale_factor=False)[0]
        patch = pixels[:, plan.dy : plan.dy + self.crop, plan.dx : plan.dx + self.crop]
        if flip:
            patch = patch.flip(-1)
        return patch.contiguous().numpy() if out is None else _into(out, patch.numpy())

    def _window(self, start: int, scale: float, side: int) -> tuple[int, int]:
        """Source pixels [a, b) of the square whose resize covers output pixels
        start..start+crop of the ``resize`` grid, with a filter's support to spare on each side."""
        margin = math.ceil(max(scale, 1.0)) + 1
        first = max(0, math.floor(start * scale) - margin)
        last = min(side, math.ceil((start + self.crop) * scale) + margin)
        return first, last

    def _offset(self, start: int, first: int, scale: float, size: int) -> int:
        """Where output pixel ``start`` of the full grid falls in the window's resize."""
        return max(0, min(round(start - first / scale), size - self.crop))


def _in_c(image: np.ndarray) -> bool:
    """Whether data._jpegroi can resize ``image``: built, and a C-contiguous uint8 array."""
    return _jpegroi is not None and image.flags.c_contiguous and image.dtype == np.uint8


def _into(out: np.ndarray | None, view: np.ndarray) -> np.ndarray:
    """``view``, copied into ``out`` when one is given and it is not ``view`` itself."""
    if out is None or out is view:
        return view
    out[...] = view
    return out


def _decode_view(jpg: bytes, plan: _Plan, crop: int, flip: bool, out: np.ndarray) -> bool:
    """Decode only ``plan``'s window of a JPEG (one :func:`region_size` accepts) and write its
    view into ``out`` (``data._jpegroi.decode_view``): True, or False when libjpeg reports
    corrupt or truncated data, even only a warning (:func:`decode_rgb` then decides, as for any
    file). Releases the GIL."""
    (r0, r1), (c0, c1) = plan.rows, plan.cols
    try:
        _jpegroi.decode_view(jpg, r0, c0, r1 - r0, c1 - c0, plan.scale_factor, plan.dy, plan.dx,
                             crop, flip, out)
    except ValueError:
        return False
    return True


def pca_lighting_offset(rng: np.random.Generator, variant: str = "paper") -> np.ndarray:
    """One image's colour shift: [p1 p2 p3]·[α1·s1, α2·s2, α3·s3]ᵀ, α ~ N(0, 0.1) drawn from
    ``rng``; (3,) float32 RGB on the 0–255 scale, added to every pixel of that image."""
    if variant not in PCA_SCALES:
        raise ValueError(f"lighting variant must be one of {', '.join(PCA_SCALES)}, got {variant!r}")
    alphas = rng.normal(0.0, PCA_ALPHA_STD, size=3)
    return (PCA_EIGENVECTORS @ (alphas * PCA_SCALES[variant])).astype(np.float32)


class EvalTransform(_CropTransform):
    """Evaluation view: 256 square, centre ``crop`` patch. Deterministic."""


    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (3, crop, crop) uint8 array."""
        offset = (self.resize - self.crop) // 2
        return self._patch(image, offset, offset, self.crop)


class TenViewTransform(_CropTransform):
    """The paper's test views (§4.1): the four corner and the centre ``crop`` patches of the 256
    square, then the same five flipped. Deterministic; the network's softmax is averaged over them."""


    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (10, 3, crop, crop) uint8 array: TL, TR, BL, BR, centre, then flips."""
        square = self._patch(image, 0, 0, self.resize)  # (3, resize, resize), resized once
        far, mid = self.resize - self.crop, (self.resize - self.crop) // 2
        corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
        views = [square[:, top : top + self.crop, left : left + self.crop] for top, left in corners]
        return np.stack(views + [view[:, :, ::-1] for view in views])


def view_transform(resize: int, crop: int, views: int) -> EvalTransform | TenViewTransform:
    """The evaluation transform of ``views`` views: the centre crop (1) or the paper's ten (10)."""
    if views not in (1, 10):
        raise ValueError(f"views must be 1 or 10, got {views!r}")
    return EvalTransform(resize, crop) if views == 1 else TenViewTransform(resize, crop)
