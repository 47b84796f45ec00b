"""Reading and writing images, kernels and other outputs.

Images come in as float32 (H, W, C) arrays in [0, 1] with C = 1 (gray) or 3 (RGB) and go out as
8- or 16-bit PNG / TIFF or 8-bit JPEG. Every writer here is atomic: it writes a temporary file in
the target's directory and renames it over the target, so a crash never leaves a half-written file.

Pillow (imageio's PNG/JPEG backend) reads 16-bit colour PNGs at 8-bit precision and cannot write
them, so 16-bit PNGs are read and written with imagecodecs (libpng) instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import tempfile
import warnings
import zlib

import imageio.v3 as iio
import imagecodecs
import numpy as np

from kfjax.errors import KfjaxError

_PNG_SIG = b'\x89PNG\r\n\x1a\n'
_SAVE_FORMATS = {'.png': 'PNG', '.tif': 'TIFF', '.tiff': 'TIFF', '.jpg': 'JPEG', '.jpeg': 'JPEG'}
_PNG_CRITICAL = (b'IHDR', b'PLTE', b'IDAT', b'IEND')


def _get_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _get_umask()


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What load_image found. `channels` and `bit_depth` describe the returned array and how to write
  results back (bit_depth is 16 for float TIFFs); `had_alpha` says an alpha channel was dropped."""
  path: str
  height: int
  width: int
  channels: int
  bit_depth: int
  had_alpha: bool
  format: str


# ----------------------------------------------------------------------------------------------
# Loading


def load_image(path, *, min_size: int = 8) -> tuple[np.ndarray, ImageInfo]:
  """Load the first frame of an image file as float32 (H, W, C) in [0, 1], C = 1 or 3.

  Supports 8/16-bit PNG, JPEG and TIFF (plus what else Pillow reads: GIF, BMP, WebP, ...), float
  TIFFs with values in [0, 1], and EXIF orientation. Alpha is dropped with a warning; a 3-channel
  image with equal channels stays 3 channels. Raises KfjaxError with a one-line message naming
  `path` for a missing/unreadable file, an unsupported pixel type or channel count, or an image
  smaller than min_size in either dimension.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise KfjaxError(f'{path}: is a directory, not an image file')
  try:
    with open(path, 'rb') as f:
      head = f.read(32)
  except FileNotFoundError:
    raise KfjaxError(f'{path}: no such file') from None
  except OSError as e:
    raise KfjaxError(f'{path}: cannot open ({e.strerror or e})') from None
  if not head:
    raise KfjaxError(f'{path}: file is empty')
  fmt = _sniff(head)
  try:
    arr = _read_pixels(path, fmt, head)
  except KfjaxError:
    raise
  except Exception as e:  # any decoder failure means the file is not a usable image
    if fmt is None:
      raise KfjaxError(f'{path}: not a recognised image file (expected PNG, JPEG or TIFF)') from e
    raise KfjaxError(f'{path}: not a readable {fmt} image ({_one_line(e)})') from e
  img, bit_depth, had_alpha = _to_float(arr, path)
  h, w, c = img.shape
  if h < min_size or w < min_size:
    raise KfjaxError(f'{path}: image is {w}×{h} pixels (width×height); '
                     f'at least {min_size}×{min_size} needed')
  fmt = fmt or os.path.splitext(path)[1].lstrip('.').upper() or 'UNKNOWN'
  return img, ImageInfo(path, h, w, c, bit_depth, had_alpha, fmt)


def _sniff(head: bytes) -> str | None:
  """Format name from the file's magic bytes, or None."""
  if head.startswith(_PNG_SIG):
    return 'PNG'
  if head.startswith(b'\xff\xd8\xff'):
    return 'JPEG'
  if head[:4] in (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+'):
    return 'TIFF'
  if head[:6] in (b'GIF87a', b'GIF89a'):
    return 'GIF'
  if head[:2] == b'BM':
    return 'BMP'
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
    return 'WEBP'
  return None


def _one_line(err: Exception, limit: int = 200) -> str:
  text = ' '.join(str(err).split()) or type(err).__name__
  return text if len(text) <= limit else text[:limit - 1] + '…'


def _read_pixels(path: str, fmt: str | None, head: bytes) -> np.ndarray:
  """First frame as stored: (H, W) or (H, W, S) of uint8/uint16/bool/float."""
  if fmt == 'PNG' and len(head) >= 25 and head[24] == 16:  # IHDR bit depth
    return _read_png16(path)
  if fmt == 'TIFF':
    return _read_tiff(path)
  with iio.imopen(path, 'r', plugin='pillow') as f:
    mode = f.metadata(index=0).get('mode')
    convert = 'RGB' if mode in ('CMYK', 'YCbCr', 'LAB', 'HSV') else None
    return f.read(index=0, mode=convert, rotate=True)


def _read_png16(path: str) -> np.ndarray:
  """A 16-bit PNG's samples as stored (any colour type, interlaced or not): (H, W) or (H, W, S)
  uint16, decoded by libpng through imagecodecs (no sBIT shift, no gamma).

  The chunk structure is checked here first: libpng stops reading after the image data, so it
  would accept a file whose IEND chunk is missing or damaged, and it skips ancillary chunks with
  bad checksums; checking up front also keeps truncated files away from imagecodecs' error path.
  """
  with open(path, 'rb') as f:
    data = f.read()
  _check_png_chunks(data)
  quiet = _DropPngWarnings()  # e.g. imagecodecs' own 'Interlace handling should be turned on'
  _IMAGECODECS_LOG.addFilter(quiet)
  try:
    arr = imagecodecs.png_decode(data)
  finally:
    _IMAGECODECS_LOG.removeFilter(quiet)
  if data[25] in (0, 2) and arr.ndim == 3 and arr.shape[2] in (2, 4):
    arr = arr[..., :-1]  # imagecodecs turns a tRNS colour key into alpha; the file has none
  return arr


def _check_png_chunks(data: bytes) -> None:
  """Raise ValueError unless `data` (starting with the PNG signature) is a sequence of whole
  chunks with correct CRCs, no unknown critical chunk, ending with IEND (bytes after it are
  ignored)."""
  view = memoryview(data)
  pos = len(_PNG_SIG)
  while True:
    if pos + 12 > len(data):
      raise ValueError(f'file is truncated: it ends after {len(data)} bytes without an IEND chunk')
    length, kind = struct.unpack_from('>I4s', data, pos)
    name = kind.decode('ascii', 'replace')
    end = pos + 12 + length
    if length >= 2 ** 31 or end > len(data):
      raise ValueError(f'file is truncated or damaged: the {name!r} chunk at byte {pos} runs past '
                       f'the end of the file ({len(data)} bytes)')
    if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack_from('>I', data, end - 4)[0]:
      raise ValueError(f'checksum error in the {name!r} chunk at byte {pos}')
    if pos == len(_PNG_SIG) and (kind != b'IHDR' or length != 13):
      raise ValueError(f'the first chunk is {name!r}, not a 13-byte IHDR')
    if not kind[0] & 0x20 and kind not in _PNG_CRITICAL:
      raise ValueError(f'unknown critical chunk {name!r} at byte {pos}')
    if kind == b'IEND':
      return
    pos = end


class _DropPngWarnings(logging.Filter):
  """Drops imagecodecs' log records of libpng warnings, none of which concern the pixels read."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('PNG')


_IMAGECODECS_LOG = logging.getLogger('imagecodecs')


def _read_tiff(path: str) -> np.ndarray:
  with iio.imopen(path, 'r', plugin='tifffile') as f:
    arr = f.read(page=0)
    meta = f.metadata(page=0, exclude_applied=False)
  if meta.get('PlanarConfiguration') == 2 and arr.ndim == 3:  # samples stored as separate planes
    arr = np.moveaxis(arr, 0, -1)
  photometric = int(meta.get('PhotometricInterpretation', 1))
  if photometric == 0:  # min-is-white
    arr = 1.0 - arr if arr.dtype.kind == 'f' else np.iinfo(arr.dtype).max - arr
  elif photometric == 3:  # palette: 16-bit colour map, shape (3, 2**bits)
    arr = np.moveaxis(np.asarray(meta['ColorMap'], np.uint16)[:, arr], 0, -1)
  elif photometric not in (1, 2) and not (photometric == 6 and meta.get('Compression') == 7):
    raise KfjaxError(f'{path}: TIFF colour model {photometric} is not supported; '
                     'convert it to RGB or grayscale')
  return arr


def _to_float(arr: np.ndarray, path: str) -> tuple[np.ndarray, int, bool]:
  """Stored pixels -> (float32 (H, W, C) in [0, 1], bit depth, had alpha)."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
    raise KfjaxError(f'{path}: unsupported image layout {tuple(arr.shape)}; '
                     'expected grayscale or RGB, optionally with alpha')
  kind = arr.dtype.kind
  if arr.dtype == np.uint8 or kind == 'b':
    scale, bit_depth = (255.0 if kind == 'u' else 1.0), 8
  elif arr.dtype == np.uint16:
    scale, bit_depth = 65535.0, 16
  elif kind == 'f':
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
      raise KfjaxError(f'{path}: floating-point pixel values must lie in [0, 1] '
                       f'(found {np.nanmin(arr):.4g} to {np.nanmax(arr):.4g}, or NaN/inf)')
    scale, bit_depth = 1.0, 16
  else:
    raise KfjaxError(f'{path}: unsupported pixel type {arr.dtype}; '
                     'expected 8- or 16-bit integers or floats in [0, 1]')
  had_alpha = arr.shape[2] in (2, 4)
  if had_alpha:
    warnings.warn(f'{path} has an alpha channel; it is ignored', stacklevel=3)
    arr = arr[..., :-1]
  img = arr.astype(np.float32)
  if scale != 1.0:
    img /= np.float32(scale)
  return img, bit_depth, had_alpha


# ----------------------------------------------------------------------------------------------
# Saving


def save_image(path, img, bit_depth: int = 8) -> None:
  """Atomically write float (H, W, C) or (H, W) in [0, 1] (clipped, rounded to nearest) as an
  8- or 16-bit image; C = 1 is written as grayscale. The format comes from the extension: .png,
  .tif/.tiff, or .jpg/.jpeg (JPEG is always 8-bit, quality 95, whatever bit_depth says)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  fmt = _SAVE_FORMATS.get(ext)
  if fmt is None:
    raise KfjaxError(f'{path}: unsupported output format {ext or "(no extension)"!r}; '
                     'use .png, .tif/.tiff or .jpg/.jpeg')
  if bit_depth not in (8, 16):
    raise KfjaxError(f'{path}: bit depth must be 8 or 16, not {bit_depth}')
  if fmt == 'JPEG':
    bit_depth = 8
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[2] == 1:
    img = img[..., 0]
  if img.dtype.kind != 'f' or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
    raise ValueError(f'expected a float (H, W, 1|3) image, got {img.dtype} {img.shape}')
  if np.isnan(img).any():
    raise ValueError(f'image for {path} contains NaN')
  top = 255 if bit_depth == 8 else 65535
  data = np.rint(np.clip(img.astype(np.float64), 0.0, 1.0) * top)
  data = data.astype(np.uint8 if bit_depth == 8 else np.uint16)

  def write(tmp):
    if fmt == 'PNG' and bit_depth == 16:
      encoded = imagecodecs.png_encode(np.ascontiguousarray(data))  # (H, W) gray or (H, W, 3)
      with open(tmp, 'wb') as f:
        f.write(encoded)
    elif fmt == 'TIFF':
      iio.imwrite(tmp, data, plugin='tifffile',
                  photometric='minisblack' if data.ndim == 2 else 'rgb')
    elif fmt == 'JPEG':
      iio.imwrite(tmp, data, plugin='pillow', quality=95)
    else:
      iio.imwrite(tmp, data, plugin='pillow')

  _atomic_write(path, write, ext)


def save_array_atomic(path, array) -> None:
  """Atomically write a numpy array as .npy (no pickles)."""
  array = np.asarray(array)

  def write(tmp):
    with open(tmp, 'wb') as f:
      np.save(f, array, allow_pickle=False)

  _atomic_write(os.fspath(path), write, os.path.splitext(os.fspath(path))[1])


def save_text_atomic(path, text: str) -> None:
  """Atomically write UTF-8 text (JSON, logs, ...)."""
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)

  _atomic_write(os.fspath(path), write, os.path.splitext(os.fspath(path))[1])


def _atomic_write(path: str, write, suffix: str) -> None:
  """Call write(tmp) on a temp file next to `path`, then rename it onto `path`.

  Creates missing parent directories; the temp file is removed if anything fails. The result gets
  the old file's permissions, or the usual ones for a new file (mkstemp's are owner-only).
  OSErrors become KfjaxError; other exceptions from `write` propagate unchanged.
  """
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=f'.{os.path.basename(path)}.', dir=parent)
  except OSError as e:
    raise KfjaxError(f'{path}: cannot write ({e.strerror or e})') from None
  os.close(fd)
  try:
    try:
      mode = os.stat(path).st_mode & 0o777
    except OSError:
      mode = 0o666 & ~_UMASK
    write(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise KfjaxError(f'{path}: cannot write ({e.strerror or e})') from e
    raise


# ----------------------------------------------------------------------------------------------
# Kernels


def kernel_to_image(kernel, size: int = 256) -> np.ndarray:
  """A (K, K) non-negative kernel as a float32 (S, S, 1) picture for people: scaled so its max is 1
  and enlarged by an integer nearest-neighbour factor, S = K * max(1, size // K)."""
  k = np.asarray(kernel, np.float64)
  if k.ndim != 2 or not np.all(np.isfinite(k)):
    raise ValueError(f'expected a finite 2-D kernel, got shape {k.shape}')
  k = np.clip(k, 0.0, None)
  top = k.max(initial=0.0)
  k = k / top if top > 0 else k
  factor = max(1, size // max(k.shape))
  return np.repeat(np.repeat(k, factor, axis=0), factor, axis=1)[..., None].astype(np.float32)


def save_kernel_png(path, kernel, size: int = 256) -> None:
  """Atomically save kernel_to_image(kernel, size) as an 8-bit grayscale PNG."""
  save_image(path, kernel_to_image(kernel, size), bit_depth=8)
