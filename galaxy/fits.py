"""FITS images as the RGB the network sees: survey cutouts read with astropy, blank pixels filled,
and the bands mapped to colour with the asinh stretch SDSS colour images are made with.

Layouts: a 3-band cube (bands on the first or the last axis), three single-band files (one per band,
in FitsStretch.bands order), or one band (shown grey). .fits, .fit, .fts, gzipped (.fits.gz) and
tile-compressed (.fz: astropy reads its CompImageHDU) files all read the same way.

The stretch follows Lupton et al. (2004, PASP 116, 133): each band b is scaled, x = max(scale_b *
b - minimum, 0); I = mean of the three x; f(I) = asinh(alpha * Q * I) / Q; each colour is
x * f(I) / I; a pixel whose brightest colour exceeds 1 is divided by it (the colour is kept, not
clipped to white). Band i is red, r green, g blue, as SDSS does. rgb_to_bands inverts this exactly
up to the 8-bit rounding.

crop_galaxy takes an image's bytes or a decoded PIL image: fits_image gives the RGB image, which it
crops as any other, so a FITS file goes through the same crop as a JPEG. crop_planes gives the same
crop, stretching only the pixels a center crop reads.
"""
from dataclasses import dataclass
import gzip
import io
import math
import os
import warnings

from PIL import Image
import numpy as np

from galaxy.crop import BadImage, center_box, crop_galaxy

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz")
GZIP_MAGIC = b"\x1f\x8b"


def is_fits(path):
    """Whether the file name says FITS (.fits, .fit, .fts, their .gz, and tile-compressed .fz)."""
    return os.fsdecode(path).lower().endswith(FITS_SUFFIXES)


@dataclass(frozen=True)
class FitsStretch:
    """How survey bands become RGB. The defaults are the widely used SDSS colour recipe for images in
    nanomaggies (D. Lang's sdss_rgb: g x 2.5, r x 1.5, i x 1.0, asinh(20 I) / sqrt(20), offset 0.02),
    which in Lupton's form f(I) = asinh(alpha Q I) / Q is Q = alpha = sqrt(20), minimum = -0.02."""
    bands: tuple = ("g", "r", "i")     # the planes in file order: a cube's planes, or the three files
    rgb: tuple = ("i", "r", "g")       # which band is red, green and blue
    scales: tuple = (2.5, 1.5, 1.0)    # each band (in bands order) is multiplied by its scale first
    Q: float = math.sqrt(20)           # softening: how soon the stretch turns from linear to logarithmic
    alpha: float = math.sqrt(20)       # linear gain for faint pixels (astropy's stretch is 1 / alpha)
    minimum: float = -0.02             # subtracted after scaling: the scaled value shown black
    max_blank: float = 0.2             # an image with more blank (NaN) pixels than this is skipped

    def __post_init__(self):
        if len(self.bands) != 3 or len(set(self.bands)) != 3 or sorted(self.rgb) != sorted(self.bands):
            raise ValueError(f"FitsStretch: bands {self.bands} must be three names and rgb {self.rgb} an order of them")
        if len(self.scales) != 3 or not all(s > 0 for s in self.scales):
            raise ValueError(f"FitsStretch: scales {self.scales} must be three positive numbers")
        if not (self.Q > 0 and self.alpha > 0 and 0 <= self.max_blank < 1):
            raise ValueError("FitsStretch: Q and alpha must be positive, max_blank in [0, 1)")

    def plane_order(self):
        """For R, G and B, the index of the file plane that feeds it."""
        return [self.bands.index(band) for band in self.rgb]


# --- reading ---------------------------------------------------------------------------------------

def _open(source):
    """astropy's HDUList for a path, bytes or a file object (gzip is found from the bytes themselves)."""
    from astropy.io import fits   # imported here: a JPEG-only run never pays for astropy's import
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
        if source.getbuffer()[:2] == GZIP_MAGIC:   # astropy finds gzip from a file's name, not from bytes
            source = gzip.GzipFile(fileobj=source, mode="rb")
    return fits.open(source, memmap=False, lazy_load_hdus=True)


def _image_hdu(hdul):
    """The first HDU that holds an image (a .fz file's primary HDU is empty: its image is the next)."""
    for hdu in hdul:
        if getattr(hdu, "is_image", False) and len(hdu.shape) > 0 and all(hdu.shape):
            return hdu
    raise BadImage("empty FITS: no HDU holds image data")


def read_planes(source):
    """The image planes of one FITS file as float32 (planes, H, W), NaN where blank; BadImage if unusable.

    A 2-D image is one plane; a 3-D cube of 3 planes has them on its first axis (as FITS stores a cube)
    or its last (as some tools write H x W x 3); a leading axis of 1 is dropped.
    """
    limit = Image.MAX_IMAGE_PIXELS or 0   # the same bound Pillow puts on an image's pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # astropy's header-fixing notes: the data decide
            with _open(source) as hdul:
                hdu = _image_hdu(hdul)
                shape = tuple(hdu.shape)
                if limit and math.prod(shape[-2:]) > limit:
                    raise BadImage(f"too many pixels: {shape[-1]}x{shape[-2]} is above the limit of {limit} "
                                   f"(PIL.Image.MAX_IMAGE_PIXELS); not read")
                data = np.asarray(hdu.data, np.float32)
                blank = hdu.header.get("BLANK") if hdu.header.get("BITPIX", -32) > 0 else None
                if blank is not None and not (hdu.header.get("BSCALE", 1) != 1 or hdu.header.get("BZERO", 0)):
                    data[np.asarray(hdu.data) == blank] = np.nan   # unscaled integers keep their BLANK value
    except BadImage:
        raise
    except Exception as err:   # astropy's ways of saying corrupt, truncated or not FITS are many
        raise BadImage(f"unreadable FITS: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
            from None
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        return data[None]
    if data.ndim == 3 and data.shape[0] == 3:
        return data
    if data.ndim == 3 and data.shape[-1] == 3:
        return np.ascontiguousarray(np.moveaxis(data, -1, 0))
    planes = data.shape[0] if data.ndim == 3 else data.ndim
    raise BadImage(f"wrong number of bands: shape {'x'.join(map(str, data.shape))} "
                   f"({planes} {'planes' if data.ndim == 3 else 'axes'}); expected one band or a cube of 3")


def read_bands(sources, stretch=None):
    """float32 (3, H, W) in stretch.bands order, or (1, H, W) for one band, blanks filled (fill_blank).

    sources is one file (a path or its bytes: a cube or a single band) or a sequence of three, one
    single-band file per band in stretch.bands order. BadImage says why an image cannot be used.
    """
    stretch = stretch or FitsStretch()
    if isinstance(sources, (list, tuple)):
        if len(sources) != 3:
            raise BadImage(f"wrong number of band files: {len(sources)}; give one file or three ({stretch.bands})")
        for band, source in zip(stretch.bands, sources):
            if isinstance(source, str) and not source:
                raise BadImage(f"no file for band {band}: its column is empty in the catalog")
        planes = [read_planes(source) for source in sources]
        for band, plane in zip(stretch.bands, planes):
            if len(plane) != 1:
                raise BadImage(f"band file {band} holds {len(plane)} planes; each of three band files holds one")
        if len({plane.shape for plane in planes}) > 1:
            sizes = ", ".join(f"{band} {p.shape[2]}x{p.shape[1]}" for band, p in zip(stretch.bands, planes))
            raise BadImage(f"band files differ in size: {sizes}")
        planes = np.concatenate(planes)
    elif isinstance(sources, str) and not sources:
        raise BadImage("no file: the file column is empty in the catalog")
    else:
        planes = read_planes(sources)
    return fill_blank(planes, stretch.max_blank)


def fill_blank(planes, max_blank=0.2):
    """Blank (NaN) pixels, e.g. beyond a survey's edge, set to their band's median of finite pixels:
    the sky level, whether or not the sky was subtracted. BadImage for any inf (broken data, not a
    blank), or when more than max_blank of the pixels are blank (in one band or more: the cutout is
    mostly off the survey)."""
    if np.isinf(planes).any():
        raise BadImage(f"infinite pixel values: {int(np.isinf(planes).sum())} pixels are +-inf")
    blank = np.isnan(planes)
    if not blank.any():
        return planes
    fraction = float(blank.any(axis=0).mean())
    if fraction > max_blank:
        raise BadImage(f"mostly blank: {fraction:.0%} of the pixels are NaN (the limit is {max_blank:.0%}); "
                       f"the cutout lies off the survey's edge")
    planes = planes.copy()
    for plane, holes in zip(planes, blank):
        plane[holes] = np.median(plane[~holes])
    return planes


# --- the stretch and its inverse -------------------------------------------------------------------

def bands_to_rgb(planes, stretch=None):
    """uint8 (H, W, 3) RGB of float (3, H, W) bands in stretch.bands order, or of one band (grey).

    FITS rows count up from the bottom (ds9 shows row 0 at the bottom): the rows are turned over so
    the image looks as it does there, north up for a survey cutout.
    """
    stretch = stretch or FitsStretch()
    planes = np.asarray(planes, np.float32)
    if len(planes) == 1:   # one band: the same in R, G and B, unscaled, so it stays grey
        x = np.repeat(np.maximum(planes - np.float32(stretch.minimum), 0), 3, axis=0)
    else:
        scales = np.asarray(stretch.scales, np.float32)[:, None, None]
        x = np.maximum(planes * scales - np.float32(stretch.minimum), 0)[stretch.plane_order()]
    intensity = x.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(intensity > 0, np.arcsinh(stretch.alpha * stretch.Q * intensity) / stretch.Q / intensity, 0)
    rgb = x * gain
    brightest = rgb.max(axis=0)
    rgb /= np.maximum(brightest, 1)   # saturated pixels keep their colour (Lupton et al.), not turned white
    return np.ascontiguousarray(np.rint(rgb * 255).astype(np.uint8).transpose(1, 2, 0)[::-1])


def rgb_to_bands(rgb, stretch=None):
    """float32 (3, H, W) bands, in stretch.bands order, that bands_to_rgb maps back to rgb (uint8 H x W x 3).

    The mean of the three colours is f(I) itself (x * f(I) / I averages to f(I)), so I = sinh(Q m) /
    (alpha Q) and each x = colour * I / m; black pixels get x = 0. Used to make FITS cubes of JPEGs
    and to check the stretch.
    """
    stretch = stretch or FitsStretch()
    colours = np.asarray(rgb, np.float64)[::-1].transpose(2, 0, 1) / 255
    m = colours.mean(axis=0)
    intensity = np.sinh(stretch.Q * m) / (stretch.alpha * stretch.Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(m > 0, colours * intensity / m, 0)
    planes = np.empty_like(x)
    planes[stretch.plane_order()] = x   # colours back to file order
    scales = np.asarray(stretch.scales, np.float64)[:, None, None]
    # a black pixel's band is anything that scales to minimum or below; it gets the value that scales to minimum
    return ((planes + stretch.minimum) / scales).astype(np.float32)


# --- for crop_galaxy ---------------------------------------------------------------------------------

def fits_image(sources, stretch=None):
    """The RGB PIL image of a FITS cube, three band files or one band (see read_bands); BadImage if unusable."""
    return Image.fromarray(bands_to_rgb(read_bands(sources, stretch), stretch), "RGB")


def crop_planes(planes, cfg, stretch=None):
    """crop_galaxy's (crop, box) of the RGB image of planes (read_bands' output), for cfg's crop.

    The stretch is per pixel, so a center crop stretches only the pixels its resize reads (the box and
    one pixel around it: about a tenth of the image at the default center_crop_size of 128 px) and gives
    the crop that stretching the whole image would. An ROI crop needs the whole image to find the galaxy.
    """
    height, width = planes.shape[1:]
    if cfg.crop != "center" or min(width, height) < cfg.image_size or width == height == cfg.image_size:
        return crop_galaxy(Image.fromarray(bands_to_rgb(planes, stretch), "RGB"), cfg)
    left, top, right, bottom = center_box(width, height, cfg)
    x0, x1 = max(math.floor(left) - 1, 0), min(math.ceil(right) + 1, width)
    y0, y1 = max(math.floor(top) - 1, 0), min(math.ceil(bottom) + 1, height)
    # bands_to_rgb turns the rows over (FITS counts them from the bottom): image rows y0..y1 are planes' H-y1..H-y0
    region = Image.fromarray(bands_to_rgb(planes[:, height - y1:height - y0, x0:x1], stretch), "RGB")
    crop = region.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX,
                         box=(left - x0, top - y0, right - x0, bottom - y0))
    return crop, (left, top, right, bottom)


def write_fits(path, planes, compress=None):
    """Write float32 planes ((3, H, W) cube or (H, W) band) as FITS at path; a .gz name is gzipped
    and a .fz name, or compress ("RICE_1", "GZIP_2", ...), tile-compresses it into a CompImageHDU."""
    from astropy.io import fits
    data = np.asarray(planes, np.float32)
    if compress or os.fspath(path).endswith(".fz"):
        hdus = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type=compress or "RICE_1")])
    else:
        hdus = fits.HDUList([fits.PrimaryHDU(data)])
    hdus.writeto(path, overwrite=True)


# --- how far a FITS file of a JPEG is from the JPEG ---------------------------------------------------

def _rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _png(rgb):
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def check_agreement(jpegs, out_dir, checkpoint=None, formats=(".fits", ".fits.gz", ".fz")):
    """Make a FITS cube of each JPEG with rgb_to_bands, read it back, and measure RMS differences (0-255
    units for pixels and crops, vote fractions for votes). Returns {source: {measure: value}} for each
    FITS format and for "png", the JPEG's own pixels as a PNG: crop_galaxy decodes a JPEG at a reduced
    scale (draft) but any other image at full size, so crops of a decoded image differ from the JPEG's
    own by that much whatever the FITS step does; "_vs_png" measures the FITS step alone. "seconds" is
    the mean time of reading and cropping the file (read_bands, crop_planes); with a checkpoint, "spread"
    is the RMS of the JPEG votes about their mean."""
    import time
    from config import build_config
    from galaxy.crop import read_image
    model, cfg = None, build_config({})
    if checkpoint:
        import torch
        from galaxy.checkpoints import load_model
        from galaxy.inference import predict
        model, cfg = load_model(checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    sources = ("jpeg", "png") + tuple(formats)
    crops = {source: [] for source in sources}
    squares = {source: {"pixels": [], "seconds": []} for source in sources[1:]}
    for path in jpegs:
        data = open(path, "rb").read()
        rgb = np.asarray(read_image(data))
        crops["jpeg"].append(np.asarray(crop_galaxy(data, cfg)[0]))
        crops["png"].append(np.asarray(crop_galaxy(_png(rgb), cfg)[0]))
        squares["png"]["pixels"].append(0.0)
        cube = rgb_to_bands(rgb)
        for ext in formats:
            name = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ext)
            write_fits(name, cube)
            started = time.perf_counter()
            planes = read_bands(name)
            crop = crop_planes(planes, cfg)[0]   # as predict.py's workers read and crop it
            squares[ext]["seconds"].append(time.perf_counter() - started)
            squares[ext]["pixels"].append(_rms(bands_to_rgb(planes), rgb) ** 2)
            crops[ext].append(np.asarray(crop))
    result = {}
    for source in sources[1:]:
        result[source] = {"pixels": float(np.sqrt(np.mean(squares[source]["pixels"]))),
                          "crops_vs_jpeg": _rms(crops[source], crops["jpeg"]),
                          "crops_vs_png": _rms(crops[source], crops["png"])}
        if squares[source]["seconds"]:
            result[source]["seconds"] = float(np.mean(squares[source]["seconds"]))
    if model is not None:
        votes = {source: predict(model, torch.from_numpy(np.stack(c)).permute(0, 3, 1, 2).contiguous()).numpy()
                 for source, c in crops.items()}
        for source in sources[1:]:
            result[source]["votes_vs_jpeg"] = _rms(votes[source], votes["jpeg"])
            result[source]["votes_vs_png"] = _rms(votes[source], votes["png"])
        result["spread"] = _rms(votes["jpeg"], votes["jpeg"].mean(0, keepdims=True))
    return result


def main():
    """python -m galaxy.fits IMAGE_FOLDER [N] [CHECKPOINT]: check_agreement on the first N JPEGs (50)."""
    import glob
    import sys
    import tempfile
    folder, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50
    jpegs = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:count]
    if not jpegs:
        sys.exit(f"error: no *.jpg in {folder}; pass a folder of JPEGs, e.g. Kaggle's images_test_rev1")
    out_dir = tempfile.mkdtemp(prefix="fits-check-")
    result = check_agreement(jpegs, out_dir, sys.argv[3] if len(sys.argv) > 3 else None)
    print(f"{len(jpegs)} JPEGs of {folder} -> FITS (in {out_dir}) -> RGB, RMS against the JPEG (pixels and crops "
          f"in 0-255 units):")
    for source, values in result.items():
        if isinstance(values, dict):
            print(f"  {source}: " + ", ".join(f"{key} {value:.5f}" for key, value in values.items()))
        else:
            print(f"  {source}: {values:.5f} (RMS of the JPEG votes about their mean)")


if __name__ == "__main__":
    main()
