"""Tests for kfjax.io: image round trips, alpha handling, errors, atomic writes, kernel pictures."""

import os
import struct
import warnings
import zlib

import imageio.v3 as iio
import imagecodecs
import numpy as np
import pytest
import skimage.data
import tifffile

from kfjax import io as kio
from kfjax.errors import KfjaxError


def _ints(shape, bit_depth, seed=0):
  top = 255 if bit_depth == 8 else 65535
  dtype = np.uint8 if bit_depth == 8 else np.uint16
  return np.random.default_rng(seed).integers(0, top + 1, shape).astype(dtype)


def _as_ints(img, bit_depth):
  top = 255 if bit_depth == 8 else 65535
  return np.rint(img.astype(np.float64) * top).astype(np.int64)


def _png_chunk(kind, body):
  return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def _png_with_filters(arr, ctype, kinds=5, seed=0):
  """Encode uint8/uint16 pixels as PNG with random per-row filter types 0..kinds-1 (each used):
  input files that exercise every PNG filter, whatever a writer's own filter choice would be."""
  h, w = arr.shape[:2]
  depth = 8 if arr.dtype == np.uint8 else 16
  raw = np.ascontiguousarray(arr, dtype='>u2' if depth == 16 else np.uint8)
  raw = raw.view(np.uint8).reshape(h, -1).astype(np.int64)
  bpp = raw.shape[1] // w
  a = np.zeros_like(raw)
  a[:, bpp:] = raw[:, :-bpp]
  b = np.zeros_like(raw)
  b[1:] = raw[:-1]
  c = np.zeros_like(raw)
  c[1:, bpp:] = raw[:-1, :-bpp]
  p = a + b - c
  pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
  paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
  preds = np.stack([np.zeros_like(raw), a, b, (a + b) // 2, paeth])
  types = np.random.default_rng(seed).integers(0, kinds, h)
  head = np.repeat(np.arange(kinds), 2)[:h]
  types[:len(head)] = head
  filt = (raw - preds[types, np.arange(h)]) & 255
  body = np.concatenate([types[:, None], filt], axis=1).astype(np.uint8).tobytes()
  ihdr = struct.pack('>IIBBBBB', w, h, depth, ctype, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
          + _png_chunk(b'IDAT', zlib.compress(body)) + _png_chunk(b'IEND', b''))


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2)]  # (x0, y0, dx, dy) of the seven passes


def _png16_interlaced(arr, ctype):
  """Encode uint16 pixels as an Adam7-interlaced PNG (filter type 0 in every pass)."""
  h, w = arr.shape[:2]
  body = b''
  for x0, y0, dx, dy in _ADAM7:
    sub = np.ascontiguousarray(arr[y0::dy, x0::dx], dtype='>u2')
    if sub.shape[0] and sub.shape[1]:
      rows = sub.view(np.uint8).reshape(sub.shape[0], -1)
      body += np.concatenate([np.zeros((len(rows), 1), np.uint8), rows], axis=1).tobytes()
  ihdr = struct.pack('>IIBBBBB', w, h, 16, ctype, 0, 0, 1)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
          + _png_chunk(b'IDAT', zlib.compress(body)) + _png_chunk(b'IEND', b''))


def _insert_chunk(data, kind, body, before=b'IDAT', crc_ok=True):
  """`data` with a chunk inserted before the first `before` chunk."""
  chunk = _png_chunk(kind, body)
  if not crc_ok:
    chunk = chunk[:-1] + bytes([chunk[-1] ^ 1])
  at = data.index(before) - 4
  return data[:at] + chunk + data[at:]


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize('ext', ['.png', '.tif', '.tiff'])
@pytest.mark.parametrize('bit_depth', [8, 16])
@pytest.mark.parametrize('channels', [1, 3])
def test_round_trip_exact(tmp_path, ext, bit_depth, channels):
  ints = _ints((23, 31, channels), bit_depth)
  top = 255 if bit_depth == 8 else 65535
  path = tmp_path / f'img{ext}'
  kio.save_image(path, ints / top, bit_depth=bit_depth)
  img, info = kio.load_image(path)
  assert img.dtype == np.float32 and img.shape == (23, 31, channels)
  assert 0.0 <= img.min() and img.max() <= 1.0
  np.testing.assert_array_equal(_as_ints(img, bit_depth), ints)
  assert (info.height, info.width, info.channels, info.bit_depth) == (23, 31, channels, bit_depth)
  assert info.format == ('PNG' if ext == '.png' else 'TIFF') and not info.had_alpha
  assert info.path == str(path)


def test_real_photo_png_8_and_16_bit(tmp_path):
  photo = skimage.data.astronaut()  # (512, 512, 3) uint8
  kio.save_image(tmp_path / 'a8.png', photo / 255.0)
  img, info = kio.load_image(tmp_path / 'a8.png')
  np.testing.assert_array_equal(_as_ints(img, 8), photo)
  deep = photo.astype(np.uint16) * 257 + _ints(photo.shape, 8).astype(np.uint16)
  kio.save_image(tmp_path / 'a16.png', deep / 65535.0, bit_depth=16)
  img, info = kio.load_image(tmp_path / 'a16.png')
  np.testing.assert_array_equal(_as_ints(img, 16), deep)
  assert info.bit_depth == 16 and info.channels == 3


def test_jpeg_within_tolerance(tmp_path):
  photo = skimage.data.astronaut()
  path = tmp_path / 'a.jpg'
  kio.save_image(path, photo / 255.0, bit_depth=16)  # JPEG is always 8-bit
  img, info = kio.load_image(path)
  assert img.shape == photo.shape and info.format == 'JPEG' and info.bit_depth == 8
  assert np.abs(img - photo / 255.0).mean() < 0.02
  kio.save_image(tmp_path / 'g.jpeg', (photo[..., :1] / 255.0))
  img, info = kio.load_image(tmp_path / 'g.jpeg')
  assert img.shape == (512, 512, 1) and info.channels == 1


def test_save_rounds_and_clips(tmp_path):
  x = np.array([[-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 7.0]] * 8, np.float32)
  x = np.concatenate([x, x], axis=1)
  kio.save_image(tmp_path / 'r.png', x)
  assert iio.imread(tmp_path / 'r.png')[0, :6].tolist() == [0, 0, 0, 1, 255, 255]


def test_16_bit_png_interoperates_with_pillow(tmp_path):
  gray, rgb = _ints((20, 30), 16, 1), _ints((20, 30, 3), 16, 2)
  iio.imwrite(tmp_path / 'pil.png', gray)  # written by Pillow (mode I;16)
  img, _ = kio.load_image(tmp_path / 'pil.png')
  np.testing.assert_array_equal(_as_ints(img[..., 0], 16), gray)
  kio.save_image(tmp_path / 'g.png', gray[..., None] / 65535.0, bit_depth=16)
  np.testing.assert_array_equal(iio.imread(tmp_path / 'g.png'), gray)
  kio.save_image(tmp_path / 'c.png', rgb / 65535.0, bit_depth=16)
  np.testing.assert_array_equal(iio.imread(tmp_path / 'c.png'), rgb >> 8)  # Pillow keeps 8 bits


@pytest.mark.parametrize('shape, ctype', [((17, 13), 0), ((17, 13, 3), 2), ((9, 21, 2), 4)])
def test_16_bit_png_with_every_filter_type(tmp_path, shape, ctype):
  pixels = _ints(shape, 16, 3)
  (tmp_path / 'f.png').write_bytes(_png_with_filters(pixels, ctype))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # gray+alpha
    img, info = kio.load_image(tmp_path / 'f.png')
  expected = pixels[..., :1] if ctype == 4 else pixels.reshape(img.shape)
  np.testing.assert_array_equal(_as_ints(img, 16), expected)


def test_16_bit_gray_photo_written_by_pillow(tmp_path):
  """Pillow's adaptive filtering (Sub/Up/Paeth) on a real photo."""
  deep = skimage.data.camera()[:96, :128].astype(np.uint16) * 257
  iio.imwrite(tmp_path / 'p.png', deep)  # Pillow mode I;16
  img, info = kio.load_image(tmp_path / 'p.png')
  np.testing.assert_array_equal(_as_ints(img[..., 0], 16), deep)
  assert info.bit_depth == 16 and info.channels == 1


@pytest.mark.parametrize('channels', [1, 3])
def test_16_bit_png_written_by_imagecodecs(tmp_path, channels):
  pixels = _ints((19, 27, channels), 16, 4)
  (tmp_path / 'p.png').write_bytes(imagecodecs.png_encode(pixels[..., 0] if channels == 1
                                                          else pixels))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # full precision: nothing to warn about
    img, info = kio.load_image(tmp_path / 'p.png')
  np.testing.assert_array_equal(_as_ints(img, 16), pixels)
  assert img.dtype == np.float32 and (info.bit_depth, info.channels, info.format) == (16, channels,
                                                                                      'PNG')
  assert not info.had_alpha


@pytest.mark.parametrize('shape, ctype', [((19, 27), 0), ((19, 27, 3), 2), ((5, 3, 3), 2),
                                          ((9, 10, 4), 6)])
def test_16_bit_interlaced_png(tmp_path, caplog, shape, ctype):
  pixels = _ints(shape, 16, 5)
  (tmp_path / 'i.png').write_bytes(_png16_interlaced(pixels, ctype))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore' if ctype == 6 else 'error')
    img, info = kio.load_image(tmp_path / 'i.png', min_size=3)
  expected = pixels[..., :3] if ctype == 6 else pixels.reshape(img.shape)
  np.testing.assert_array_equal(_as_ints(img, 16), expected)
  assert info.bit_depth == 16 and info.had_alpha == (ctype == 6)
  assert not caplog.records  # no libpng chatter about interlace handling


def test_16_bit_png_ancillary_chunks_change_nothing(tmp_path):
  """tRNS is not turned into an alpha channel, sBIT does not shift values, gAMA is not applied."""
  rgb, gray = _ints((12, 10, 3), 16, 6), _ints((12, 10), 16, 7)
  extra = [(b'tRNS', struct.pack('>HHH', 1, 2, 3)), (b'sBIT', bytes([12, 12, 12])),
           (b'gAMA', struct.pack('>I', 100000))]
  data = imagecodecs.png_encode(rgb)
  for kind, body in extra:
    data = _insert_chunk(data, kind, body)
  (tmp_path / 'c.png').write_bytes(data)
  data = _insert_chunk(imagecodecs.png_encode(gray), b'tRNS', struct.pack('>H', 5))
  (tmp_path / 'g.png').write_bytes(data)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    img, info = kio.load_image(tmp_path / 'c.png')
    np.testing.assert_array_equal(_as_ints(img, 16), rgb)
    assert info.channels == 3 and not info.had_alpha
    img, info = kio.load_image(tmp_path / 'g.png')
    np.testing.assert_array_equal(_as_ints(img[..., 0], 16), gray)
    assert info.channels == 1 and not info.had_alpha


def test_equal_channels_stay_rgb_and_palette_becomes_rgb(tmp_path):
  gray = _ints((16, 16), 8)
  iio.imwrite(tmp_path / 'eq.png', np.stack([gray] * 3, axis=-1))
  img, info = kio.load_image(tmp_path / 'eq.png')
  assert img.shape == (16, 16, 3) and info.channels == 3
  from PIL import Image
  Image.fromarray(skimage.data.astronaut()[:32, :32]).convert('P').save(tmp_path / 'pal.png')
  img, info = kio.load_image(tmp_path / 'pal.png')
  assert img.shape == (32, 32, 3) and info.bit_depth == 8


def test_float_tiff(tmp_path):
  x = np.random.default_rng(0).random((12, 10, 3)).astype(np.float32)
  tifffile.imwrite(tmp_path / 'f.tif', x, photometric='rgb')
  img, info = kio.load_image(tmp_path / 'f.tif')
  np.testing.assert_array_equal(img, x)
  assert info.bit_depth == 16
  tifffile.imwrite(tmp_path / 'bad.tif', x * 2, photometric='rgb')
  with pytest.raises(KfjaxError, match='bad.tif.*\\[0, 1\\]'):
    kio.load_image(tmp_path / 'bad.tif')


def test_first_frame_of_multipage_tiff_and_gif(tmp_path):
  frames = np.stack([_ints((12, 14, 3), 8, s) for s in range(3)])
  tifffile.imwrite(tmp_path / 'm.tif', frames, photometric='rgb')
  img, _ = kio.load_image(tmp_path / 'm.tif')
  np.testing.assert_array_equal(_as_ints(img, 8), frames[0])
  gray = np.stack([np.full((12, 14), v, np.uint8) for v in (10, 200)])
  iio.imwrite(tmp_path / 'a.gif', gray)
  img, info = kio.load_image(tmp_path / 'a.gif')
  assert info.format == 'GIF' and np.allclose(img, 10 / 255)


def test_planar_tiff(tmp_path):
  rgb = _ints((12, 14, 3), 16)
  tifffile.imwrite(tmp_path / 'p.tif', np.moveaxis(rgb, -1, 0), photometric='rgb',
                   planarconfig='separate')
  img, _ = kio.load_image(tmp_path / 'p.tif')
  np.testing.assert_array_equal(_as_ints(img, 16), rgb)


# ----------------------------------------------------------------------------------------------
# Alpha


def test_rgba_drops_alpha_with_warning(tmp_path):
  rgba = _ints((16, 16, 4), 8)
  iio.imwrite(tmp_path / 'a.png', rgba)
  with pytest.warns(UserWarning, match='a.png has an alpha channel; it is ignored'):
    img, info = kio.load_image(tmp_path / 'a.png')
  np.testing.assert_array_equal(_as_ints(img, 8), rgba[..., :3])
  assert info.had_alpha and info.channels == 3


def test_16_bit_rgba_png(tmp_path):
  rgba = _ints((16, 16, 4), 16)
  (tmp_path / 'a.png').write_bytes(_png_with_filters(rgba, ctype=6))
  with pytest.warns(UserWarning, match='alpha'):
    img, info = kio.load_image(tmp_path / 'a.png')
  np.testing.assert_array_equal(_as_ints(img, 16), rgba[..., :3])
  assert info.bit_depth == 16 and info.had_alpha


def test_gray_alpha_gives_one_channel(tmp_path):
  la = _ints((16, 16, 2), 8)
  iio.imwrite(tmp_path / 'la.png', la)
  with pytest.warns(UserWarning, match='alpha'):
    img, info = kio.load_image(tmp_path / 'la.png')
  assert img.shape == (16, 16, 1) and info.channels == 1 and info.had_alpha
  np.testing.assert_array_equal(_as_ints(img[..., 0], 8), la[..., 0])


def test_no_warning_without_alpha(tmp_path):
  kio.save_image(tmp_path / 'x.png', np.zeros((8, 8, 3)))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    kio.load_image(tmp_path / 'x.png')


# ----------------------------------------------------------------------------------------------
# Errors


def _expect_error(path, match=''):
  with pytest.raises(KfjaxError) as err:
    kio.load_image(path)
  message = str(err.value)
  assert str(path) in message and '\n' not in message and match in message
  return message


def test_load_errors_name_the_file(tmp_path):
  _expect_error(tmp_path / 'missing.png', 'no such file')
  _expect_error(tmp_path, 'directory')
  (tmp_path / 'text.png').write_text('this is not a PNG\n')
  _expect_error(tmp_path / 'text.png', 'not a recognised image')
  (tmp_path / 'empty.png').write_bytes(b'')
  _expect_error(tmp_path / 'empty.png', 'empty')
  kio.save_image(tmp_path / 'small.png', np.zeros((5, 6, 3)))
  _expect_error(tmp_path / 'small.png',
                'image is 6×5 pixels (width×height); at least 8×8 needed')
  img, _ = kio.load_image(tmp_path / 'small.png', min_size=5)
  assert img.shape == (5, 6, 3)


def test_corrupt_and_unsupported_files(tmp_path):
  kio.save_image(tmp_path / 'ok.png', np.full((32, 32, 3), 0.5), bit_depth=16)
  data = (tmp_path / 'ok.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
  _expect_error(tmp_path / 'cut.png', 'not a readable PNG image')
  idat = data.index(b'IDAT') + 8
  (tmp_path / 'crc.png').write_bytes(data[:idat] + bytes([data[idat] ^ 1]) + data[idat + 1:])
  _expect_error(tmp_path / 'crc.png', 'not a readable PNG image (checksum error')
  kio.save_image(tmp_path / 'ok.jpg', np.full((32, 32, 3), 0.5))
  (tmp_path / 'cut.jpg').write_bytes((tmp_path / 'ok.jpg').read_bytes()[:100])
  _expect_error(tmp_path / 'cut.jpg', 'not a readable JPEG image')
  tifffile.imwrite(tmp_path / 'i32.tif', np.zeros((16, 16), np.int32))
  _expect_error(tmp_path / 'i32.tif', 'unsupported pixel type int32')
  tifffile.imwrite(tmp_path / 'c5.tif', np.zeros((16, 16, 5), np.uint8), photometric='minisblack',
                   planarconfig='contig')
  _expect_error(tmp_path / 'c5.tif', 'unsupported image layout')


def test_damaged_16_bit_pngs(tmp_path):
  """Every truncation, a missing or damaged IEND, bad checksums even in ancillary chunks and
  unknown critical chunks are one-line errors; data after IEND is ignored."""
  pixels = _ints((40, 50, 3), 16, 8)  # noise: several IDAT chunks
  data = imagecodecs.png_encode(pixels)
  assert data.count(b'IDAT') > 1
  iend = data.index(b'IEND') - 4
  for cut in sorted({*range(8, 40), *range(40, len(data), 97), *range(iend - 3, len(data))}):
    (tmp_path / 'cut.png').write_bytes(data[:cut])  # under 25 bytes: no bit depth, Pillow reads
    _expect_error(tmp_path / 'cut.png',
                  'not a readable PNG image' + (' (file is truncated' if cut >= 25 else ''))
  (tmp_path / 'iend.png').write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  _expect_error(tmp_path / 'iend.png', "checksum error in the 'IEND' chunk")
  (tmp_path / 'text.png').write_bytes(_insert_chunk(data, b'tEXt', b'k\0v', crc_ok=False))
  _expect_error(tmp_path / 'text.png', "checksum error in the 'tEXt' chunk")
  (tmp_path / 'crit.png').write_bytes(_insert_chunk(data, b'ABCD', b'xy'))
  _expect_error(tmp_path / 'crit.png', "unknown critical chunk 'ABCD'")
  short = _png_chunk(b'IDAT', zlib.compress(b'\0' * 10))  # intact chunks, too little image data
  (tmp_path / 'short.png').write_bytes(data[:33] + short + _png_chunk(b'IEND', b''))
  _expect_error(tmp_path / 'short.png', 'not a readable PNG image')
  (tmp_path / 'tail.png').write_bytes(data + b'trailing bytes')
  np.testing.assert_array_equal(_as_ints(kio.load_image(tmp_path / 'tail.png')[0], 16), pixels)


def test_save_errors(tmp_path):
  with pytest.raises(KfjaxError, match='unsupported output format'):
    kio.save_image(tmp_path / 'x.bmp', np.zeros((8, 8, 3)))
  with pytest.raises(KfjaxError, match='bit depth'):
    kio.save_image(tmp_path / 'x.png', np.zeros((8, 8, 3)), bit_depth=12)
  with pytest.raises(ValueError):
    kio.save_image(tmp_path / 'x.png', np.zeros((8, 8, 2)))
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize('name', ['o.png', 'o.tif', 'o.jpg'])
def test_save_leaves_no_temp_files(tmp_path, name):
  target = tmp_path / 'new' / 'dir' / name  # parents are created
  kio.save_image(target, np.full((8, 8, 3), 0.25))
  kio.save_image(target, np.full((8, 8, 3), 0.75))  # overwrite
  assert os.listdir(target.parent) == [name]
  assert abs(kio.load_image(target)[0].mean() - 0.75) < 0.01
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize('bit_depth', [8, 16])
def test_failed_write_keeps_old_file(tmp_path, monkeypatch, bit_depth):
  target = tmp_path / 'o.png'
  kio.save_image(target, np.full((8, 8, 3), 0.25))
  before = target.read_bytes()

  def broken(path, *args, **kwargs):
    with open(path, 'wb') as f:
      f.write(b'partial')
    raise RuntimeError('disk on fire')

  def broken_encode(*args, **kwargs):
    raise RuntimeError('disk on fire')

  monkeypatch.setattr(iio, 'imwrite', broken)
  monkeypatch.setattr(imagecodecs, 'png_encode', broken_encode)
  with pytest.raises(RuntimeError, match='disk on fire'):
    kio.save_image(target, np.full((8, 8, 3), 0.75), bit_depth=bit_depth)
  assert target.read_bytes() == before
  assert os.listdir(tmp_path) == ['o.png']


def test_save_array_and_text_atomic(tmp_path):
  arr = np.arange(12, dtype=np.float32).reshape(3, 4)
  kio.save_array_atomic(tmp_path / 'sub' / 'k.npy', arr)
  np.testing.assert_array_equal(np.load(tmp_path / 'sub' / 'k.npy'), arr)
  kio.save_text_atomic(tmp_path / 'sub' / 'm.json', '{"a": "ü"}\n')
  assert (tmp_path / 'sub' / 'm.json').read_text(encoding='utf-8') == '{"a": "ü"}\n'
  assert sorted(os.listdir(tmp_path / 'sub')) == ['k.npy', 'm.json']


# ----------------------------------------------------------------------------------------------
# Kernels


def test_kernel_to_image():
  k = np.random.default_rng(0).random((13, 13))
  k[0, 0] = -0.1  # negatives are shown as 0
  img = kio.kernel_to_image(k)
  factor = 256 // 13
  assert img.shape == (13 * factor, 13 * factor, 1) and img.dtype == np.float32
  assert img.max() == 1.0 and img.min() == 0.0
  blocks = img[..., 0].reshape(13, factor, 13, factor)
  assert np.all(blocks == blocks[:, :1, :, :1])
  np.testing.assert_allclose(blocks[:, 0, :, 0], np.clip(k, 0, None) / k.max(), rtol=1e-6)
  assert kio.kernel_to_image(np.ones((300, 300)), size=256).shape == (300, 300, 1)
  assert kio.kernel_to_image(np.zeros((4, 4))).max() == 0.0


def test_save_kernel_png(tmp_path):
  k = np.zeros((5, 5))
  k[2, 2], k[2, 3] = 1.0, 0.5
  kio.save_kernel_png(tmp_path / 'k.png', k, size=50)
  img, info = kio.load_image(tmp_path / 'k.png')
  assert img.shape == (50, 50, 1) and info.bit_depth == 8
  assert img[25, 25, 0] == 1.0 and img[25, 35, 0] == 128 / 255
