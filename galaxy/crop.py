"""How a galaxy is cropped: an image's bytes -> the square crop the network sees, and its box.

preprocess.py, predict.py and plot_image.py all crop through crop_galaxy, so a galaxy is cut
exactly the same way for training, for prediction and for the plot. crop=roi boxes the galaxy
at the frame centre (the original design's region-of-interest crop); crop=center takes a fixed central square.
"""
import io
import json
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
import numpy as np
from scipy import ndimage

CROP_KEYS = ("crop", "image_size", "roi_threshold", "roi_pad", "roi_min_size", "center_crop_size")
KAGGLE_SIDE = 424                   # Kaggle's JPEGs are 424 x 424
ROI_WORK_SIDE = KAGGLE_SIDE // 4    # the ROI is found on a frame about this wide (106 px)
ORIENTATION_TAG = 0x0112            # EXIF: how the stored pixels must be turned to stand upright


class BadImage(ValueError):
    """An image that cannot be used; str() is a short reason, 'category: detail'."""


def _square_box(center_x, center_y, side, width, height):
    """An integer square of the given side about a centre, shifted inside the frame (shrunk only if too big)."""
    side = max(1, int(round(min(side, width, height))))   # a tiny frame still gives a pixel, never an empty box
    left = int(round(center_x - side / 2))
    top = int(round(center_y - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def center_box(width, height, cfg):
    """The central square the network was trained on (crop=center).

    cfg.center_crop_size is in pixels of Kaggle's 424-px frames; any other frame gives the same
    fraction of its shorter side, so a cutout of another size, framed like Kaggle's, shows the
    galaxy at the scale the network learned (a fixed pixel count would zoom it in or out).
    """
    side = cfg.center_crop_size * min(width, height) / KAGGLE_SIDE
    return _square_box(width / 2, height / 2, side, width, height)


def _mean3x3(gray):
    """The mean of each pixel's 3x3 neighbourhood, edges mirrored, as float32.

    The same as scipy's uniform_filter(size=3) up to float rounding, in a third of the time:
    this runs once per image, and on a 106 px frame scipy's per-call overhead dominates.
    """
    height, width = gray.shape
    padded = np.empty((height + 2, width + 2), np.float32)
    padded[1:-1, 1:-1] = gray
    padded[0, 1:-1], padded[-1, 1:-1] = gray[0], gray[-1]
    padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9


_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)   # made once: label() would make it per call


def _central_blob(smooth, level, cy, cx):
    """(row slice, column slice) bounding the blob of pixels above level that holds (cy, cx), or lies nearest.

    Labelling blobs is most of the cost of roi_box, so it starts on the central window of 2/3 of
    the frame's side, which holds most galaxies; only a blob that touches the window's edge (it may
    go on outside), or a dark centre, needs the whole frame. The result is the same either way.
    """
    reach = max(smooth.shape) // 3
    top, left = max(cy - reach, 0), max(cx - reach, 0)
    for frame, (y0, x0) in ((smooth[top:cy + reach, left:cx + reach], (top, left)), (smooth, (0, 0))):
        blobs, _ = ndimage.label(frame > level, _FOUR_NEIGHBOURS)
        galaxy = blobs[cy - y0, cx - x0]
        if galaxy == 0:
            if frame is not smooth:
                continue   # the nearest blob may lie outside the window
            ys, xs = np.nonzero(blobs)
            nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
            galaxy = blobs[ys[nearest], xs[nearest]]
        pixels = blobs == galaxy   # its bounding box; twice as fast as ndimage.find_objects here
        rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
        inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < frame.shape[0] - 1 and cols[-1] < frame.shape[1] - 1
        if inside or frame is smooth:
            return slice(y0 + rows[0], y0 + rows[-1] + 1), slice(x0 + cols[0], x0 + cols[-1] + 1)


def roi_box(gray, cfg, scale=1.0):
    """(left, top, right, bottom) of a square around the central galaxy, in gray's pixel coordinates.

    gray is a 2-D array of the image; scale is how many raw pixels one of its pixels spans (so
    roi_min_size, in raw pixels, means the same on a reduced image). Pixels brighter than
    sky + roi_threshold * (central brightness - sky) form connected blobs; the one holding the
    frame centre (or nearest to it) is the galaxy, even if a neighbour elsewhere is brighter.
    Its bounding box grows by roi_pad of its side, is made square about its centre, at least
    roi_min_size, and shifted inside the frame.
    """
    height, width = gray.shape
    # light smoothing so sky noise neither fragments the galaxy nor sets the central brightness
    smooth = _mean3x3(gray)
    border = max(1, min(height, width) // 16)
    edges = np.sort(np.concatenate([smooth[:border].ravel(), smooth[-border:].ravel(),
                                    smooth[:, :border].ravel(), smooth[:, -border:].ravel()]))
    # their median, 3x faster than np.median
    sky = (float(edges[(len(edges) - 1) // 2]) + float(edges[len(edges) // 2])) / 2
    cy, cx = height // 2, width // 2
    reach = max(1, min(height, width) // 16)   # the galaxy's peak may sit a little off centre
    centre = float(smooth[cy - reach:cy + reach + 1, cx - reach:cx + reach + 1].max())
    if centre - sky < 2.0:   # (grey levels) nothing stands out of the sky: fall back to the fixed crop
        left, top, right, bottom = center_box(width * scale, height * scale, cfg)
        return left / scale, top / scale, right / scale, bottom / scale
    rows, cols = _central_blob(smooth, sky + cfg.roi_threshold * (centre - sky), cy, cx)
    side = max(rows.stop - rows.start, cols.stop - cols.start) * (1 + cfg.roi_pad)
    side = max(side, cfg.roi_min_size / scale)
    side = min(side, width, height)
    # the same shift-inside-the-frame rule as _square_box, kept in floats at this reduced scale
    left = min(max((cols.start + cols.stop) / 2 - side / 2, 0), width - side)
    top = min(max((rows.start + rows.stop) / 2 - side / 2, 0), height - side)
    return left, top, left + side, top + side


def _read_source(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()
    return Path(source).read_bytes()


def _open(data):
    """The image with only its header read, so that draft can still pick the decoding scale.

    An image with more pixels than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is
    refused from its header size, never decoded. Pillow's own check is lifted for the header read
    only, because its error does not say the width and height.
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: Pillow knows no image format that starts like this file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"not an image: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if limit and image.width * image.height > limit:
        raise BadImage(f"too many pixels: {image.width}x{image.height} is above Pillow's decompression-bomb limit "
                       f"of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
    return image


def _orientation(image):
    """The EXIF orientation tag (1 = upright; 5-8 swap width and height), from the header alone."""
    try:
        return int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:   # a damaged EXIF block says nothing about the pixels: take them as stored
        return 1


def to_rgb(image):
    """8-bit RGB of any mode Pillow opens, scaled by the mode's real range; BadImage if there is none.

    Alpha is composited onto black: a transparent sky is dark sky. 16-bit images (I;16*, and mode I
    within 0..65535, which is how Pillow opens 16-bit PNGs and TIFFs) are divided by 257, the
    type's range: a faint galaxy stays as faint as in the 8-bit image the network was trained on,
    where stretching min..max would brighten the sky and the galaxy alike. Float images within
    0..1 are the usual convention and are multiplied by 255; any other I or F range has no
    convention, so it is stretched from its own min to max.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)),
                                     image.convert("RGBA")).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, np.float64)
        finite = values[np.isfinite(values)]
        if not finite.size:
            raise BadImage(f"no finite pixel values in a {mode} image")
        low, high = float(finite.min()), float(finite.max())
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
            low, high = 0.0, 65535.0
        elif mode == "F" and low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        scaled = (np.nan_to_num(values, nan=low) - low) * (255 / max(high - low, 1e-12))
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)).convert("RGB")
    raise BadImage(f"unsupported image mode {mode}: no known way to 8-bit RGB")


def _decode(image, reduction, orientation=1):
    """image (fresh from _open) decoded as upright 8-bit RGB, at 1/reduction of its size where it is a JPEG."""
    try:
        if reduction > 1:
            image.draft("RGB", (image.width // reduction, image.height // reduction))
        image.load()
        if orientation != 1:   # a camera's rotation tag: the galaxy is cropped as it is seen
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise BadImage(f"too many pixels: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:   # Pillow's ways of saying corrupt or truncated
        raise BadImage(f"corrupt or truncated image: {err}") from None
    return to_rgb(image)


def read_image(source):
    """The whole image as upright 8-bit RGB, decoded as crop_galaxy decodes it (for showing it)."""
    data = _read_source(source)
    if not data:
        raise BadImage("empty file")
    image = _open(data)
    return _decode(image, 1, _orientation(image))


def _reduction_for(side, image_size):
    """The largest JPEG reduction (8, 4, 2, 1) that leaves at least image_size pixels across side."""
    return next(k for k in (8, 4, 2, 1) if side / k >= image_size or k == 1)


def crop_galaxy(source, cfg):
    """(RGB crop of image_size x image_size, box) for one image; box is in the image's full-size pixels.

    source is a path, a file object or the bytes of a JPEG (any image Pillow opens works: grayscale,
    RGBA, 16-bit and float ones are converted by to_rgb, EXIF-rotated ones turned upright first), or
    an image already decoded (a PIL image, e.g. galaxy/fits.fits_image's), cropped as it stands.
    Raises BadImage with a short reason for an empty, unreadable, truncated, too small or too large image.
    """
    if isinstance(source, Image.Image):
        decoded = to_rgb(source)
        width, height = decoded.size

        def decode(reduction):
            return decoded
    else:
        data = _read_source(source)
        if not data:
            raise BadImage("empty file")
        header = _open(data)
        orientation = _orientation(header)
        width, height = header.size[::-1] if orientation in (5, 6, 7, 8) else header.size   # as it will stand upright

        unused = [header]   # the first decode takes the image whose header was read, a second opens it again

        def decode(reduction):
            return _decode(unused.pop() if unused else _open(data), reduction, orientation)
    if min(width, height) < cfg.image_size:
        raise BadImage(f"image too small: {width}x{height} < image_size {cfg.image_size}")

    if width == height == cfg.image_size:
        # already the network's input, e.g. one of preprocess.py's PNGs: cropping it again would zoom in
        box = (0, 0, width, height)
        image = decode(1)
    elif cfg.crop == "center":
        box = center_box(width, height, cfg)
        image = decode(_reduction_for(box[2] - box[0], cfg.image_size))
    else:
        # one decode at half size serves both the ROI search and, for most galaxies, the crop
        image = decode(2 if min(width, height) >= 4 * ROI_WORK_SIDE else 1)
        gray = image.convert("L").reduce(max(1, min(image.size) // ROI_WORK_SIDE))
        scale = width / gray.width
        left, top, right, bottom = roi_box(np.asarray(gray), cfg, scale)
        box = _square_box((left + right) / 2 * scale, (top + bottom) / 2 * scale,
                          (right - left) * scale, width, height)
        if width / image.width > _reduction_for(box[2] - box[0], cfg.image_size):
            image = decode(_reduction_for(box[2] - box[0], cfg.image_size))   # small galaxy: a finer decode
    scale_x, scale_y = width / image.width, height / image.height
    scaled_box = (box[0] / scale_x, box[1] / scale_y, box[2] / scale_x, box[3] / scale_y)
    size = (cfg.image_size, cfg.image_size)
    return image.resize(size, Image.Resampling.BOX, box=scaled_box), box


# --- the crop settings a folder of PNGs was made with -------------------------------------

SETTINGS_FILE = "preprocess.json"   # the crop settings the PNGs in processed_dir were made with


def crop_settings(processed_dir):
    """The crop settings processed_dir's PNGs were made with ({} if it has no record)."""
    path = os.path.join(processed_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def crop_settings_mismatch(processed_dir, model_cfg):
    """'' when processed_dir's PNGs were cropped as the model was trained, else what differs.

    PNGs made with another crop would feed the model galaxies at a different scale from the
    ones it learnt.
    """
    made_with = crop_settings(processed_dir)
    if not made_with:
        return ""  # older output without the record: read_png still checks the size
    return ", ".join(f"{key} {made_with.get(key)} there, {getattr(model_cfg, key)} in the checkpoint"
                     for key in CROP_KEYS if made_with.get(key) != getattr(model_cfg, key))
