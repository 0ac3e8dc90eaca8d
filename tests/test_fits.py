"""Tests of galaxy/fits.py: every FITS layout read the same, the asinh stretch and its inverse, blank
pixels filled, the images skipped with their reason, and a FITS file through crop_galaxy."""
import io

from astropy.io import fits
from PIL import Image
import numpy as np
import pytest

from config import build_config
from conftest import SHARED_SAMPLE, needs_real_sample
from galaxy import fits as gf
from galaxy.crop import BadImage, crop_galaxy
from helpers import blob, jpeg_bytes, sky_with_galaxies

SIDE = 96


def galaxy_cube(seed=0):
    """g, r, i planes in nanomaggies: a red central galaxy, a blue neighbour, sky noise."""
    rng = np.random.default_rng(seed)
    planes = [rng.normal(0, 0.01, (SIDE, SIDE)) + blob(SIDE, 48, 48, 6, peak) + blob(SIDE, 20, 70, 3, other)
              for peak, other in ((1.0, 2.0), (2.0, 1.0), (3.0, 0.5))]
    return np.asarray(planes, np.float32)


def write_hdus(path, *hdus):
    fits.HDUList(list(hdus)).writeto(path, overwrite=True)


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# --- layouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cube.fits", "cube.fit", "cube.fits.gz"])
def test_cube_files_read_as_written(tmp_path, name):
    cube = galaxy_cube()
    gf.write_fits(tmp_path / name, cube)
    assert gf.is_fits(tmp_path / name)
    np.testing.assert_array_equal(gf.read_bands(str(tmp_path / name)), cube)
    np.testing.assert_array_equal(np.asarray(gf.fits_image(str(tmp_path / name))), gf.bands_to_rgb(cube))


def test_tile_compressed_fz_reads_its_compimagehdu(tmp_path):
    cube = galaxy_cube()
    gf.write_fits(tmp_path / "cube.fz", cube)
    with fits.open(tmp_path / "cube.fz") as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU) and hdul[0].data is None
    planes = gf.read_bands(str(tmp_path / "cube.fz"))
    assert planes.shape == cube.shape and np.abs(planes - cube).max() < 0.01   # RICE quantises floats: lossy
    assert rms(gf.fits_image(str(tmp_path / "cube.fz")), gf.bands_to_rgb(cube)) < 1


def test_bands_last_cube_and_bytes_and_gzip_bytes(tmp_path):
    cube = galaxy_cube()
    write_hdus(tmp_path / "last.fits", fits.PrimaryHDU(np.moveaxis(cube, 0, -1)))
    np.testing.assert_array_equal(gf.read_bands(str(tmp_path / "last.fits")), cube)
    gf.write_fits(tmp_path / "cube.fits.gz", cube)
    for path in (tmp_path / "last.fits", tmp_path / "cube.fits.gz"):
        np.testing.assert_array_equal(gf.read_bands(path.read_bytes()), cube)


def test_three_band_files_in_band_order(tmp_path):
    cube = galaxy_cube()
    paths = []
    for band, plane in zip("gri", cube):
        paths.append(str(tmp_path / f"{band}.fits"))
        gf.write_fits(paths[-1], plane)
    np.testing.assert_array_equal(gf.read_bands(paths), cube)
    swapped = gf.FitsStretch(bands=("i", "r", "g"), scales=(1.0, 1.5, 2.5))   # the same files named backwards
    np.testing.assert_array_equal(gf.fits_image(paths[::-1], swapped), gf.fits_image(paths))


def test_single_band_is_grey_and_leading_axis_of_one_dropped(tmp_path):
    plane = galaxy_cube()[1]
    write_hdus(tmp_path / "r.fits", fits.PrimaryHDU(plane[None]))
    rgb = np.asarray(gf.fits_image(str(tmp_path / "r.fits")))
    assert rgb.shape == (SIDE, SIDE, 3) and rgb.max() > 200
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_image_in_an_extension_after_an_empty_primary(tmp_path):
    cube = galaxy_cube()
    write_hdus(tmp_path / "ext.fits", fits.PrimaryHDU(), fits.ImageHDU(cube))
    np.testing.assert_array_equal(gf.read_bands(str(tmp_path / "ext.fits")), cube)


def test_integer_image_blank_value_is_blank(tmp_path):
    data = np.full((SIDE, SIDE), 100, np.int16)
    data[:3] = -32768
    hdu = fits.PrimaryHDU(data)
    hdu.header["BLANK"] = -32768
    write_hdus(tmp_path / "int.fits", hdu)
    planes = gf.read_bands(str(tmp_path / "int.fits"))
    assert (planes == 100).all()   # the 3 blank rows are filled with the median


# --- the stretch ------------------------------------------------------------------------------------

def test_band_order_i_red_r_green_g_blue():
    zero = np.zeros((SIDE, SIDE), np.float32)
    for index, colour in ((0, 2), (1, 1), (2, 0)):   # g -> blue, r -> green, i -> red
        planes = np.stack([zero] * 3)
        planes[index] = 1.0
        rgb = gf.bands_to_rgb(planes, gf.FitsStretch(minimum=0))   # the default offset lifts black a little
        assert rgb[..., colour].min() > 100 and np.delete(rgb, colour, axis=2).max() == 0


def test_saturated_pixels_keep_their_colour_and_rows_turn_over():
    planes = np.zeros((3, 4, 4), np.float32)
    planes[:, 0, 0] = (100.0, 200.0, 400.0)   # far past saturation, redder in i
    rgb = gf.bands_to_rgb(planes, gf.FitsStretch(minimum=0))
    pixel = rgb[-1, 0].astype(float)          # FITS row 0 is the bottom row of the picture
    assert pixel.max() == 255 and pixel[0] > pixel[1] > pixel[2] > 0
    assert rgb[:-1].max() == 0


def test_stretch_settings_are_checked():
    for bad in ({"bands": ("g", "r")}, {"rgb": ("i", "r", "z")}, {"scales": (1, 0, 1)}, {"Q": 0},
                {"max_blank": 1.0}):
        with pytest.raises(ValueError, match="FitsStretch"):
            gf.FitsStretch(**bad)


def test_rgb_to_bands_round_trip_of_a_jpeg():
    stretch = gf.FitsStretch(Q=8, alpha=0.5, minimum=0.01, scales=(2.0, 1.0, 0.5))
    for values in (sky_with_galaxies(SIDE * 2), np.random.default_rng(0).uniform(0, 255, (SIDE * 2, SIDE * 2))):
        colour = np.stack([values * 0.8, values, np.clip(values * 1.3, 0, 255)], axis=-1)
        rgb = np.asarray(Image.open(io.BytesIO(jpeg_bytes(colour, quality=90))).convert("RGB"))
        for settings in (gf.FitsStretch(), stretch):
            planes = gf.rgb_to_bands(rgb, settings)
            assert planes.dtype == np.float32 and planes.shape == (3, SIDE * 2, SIDE * 2)
            assert rms(gf.bands_to_rgb(planes, settings), rgb) < 0.05


@needs_real_sample
def test_real_jpeg_round_trip_through_a_fits_file(tmp_path):
    path = sorted((SHARED_SAMPLE / "images_test_rev1").glob("*.jpg"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    gf.write_fits(tmp_path / "galaxy.fits.gz", gf.rgb_to_bands(rgb))
    assert rms(gf.fits_image(str(tmp_path / "galaxy.fits.gz")), rgb) < 0.05


# --- blanks and skips ---------------------------------------------------------------------------------

def test_a_few_blank_pixels_get_the_band_median(tmp_path):
    cube = galaxy_cube()
    cube[:, :5, :] = np.nan                    # a survey edge: 5 of 96 rows
    gf.write_fits(tmp_path / "edge.fits", cube)
    planes = gf.read_bands(str(tmp_path / "edge.fits"))
    assert np.isfinite(planes).all()
    for plane, original in zip(planes, cube):
        assert (plane[:5] == np.nanmedian(original)).all()


@pytest.mark.parametrize("make, reason", [
    (lambda cube: cube.__setitem__((slice(None), slice(0, 30)), np.nan), "mostly blank: 31% "),
    (lambda cube: cube.__setitem__((1, 5, 5), np.inf), "infinite pixel values: 1 pixels"),
])
def test_mostly_blank_or_inf_is_skipped(tmp_path, make, reason):
    cube = galaxy_cube()
    make(cube)
    gf.write_fits(tmp_path / "bad.fits", cube)
    with pytest.raises(BadImage, match=reason):
        gf.read_bands(str(tmp_path / "bad.fits"))


def test_blank_limit_is_a_setting(tmp_path):
    cube = galaxy_cube()
    cube[:, :30] = np.nan
    gf.write_fits(tmp_path / "half.fits", cube)
    assert np.isfinite(gf.read_bands(str(tmp_path / "half.fits"), gf.FitsStretch(max_blank=0.5))).all()


@pytest.mark.parametrize("planes", [2, 4])
def test_wrong_number_of_bands(tmp_path, planes):
    gf.write_fits(tmp_path / "cube.fits", np.zeros((planes, SIDE, SIDE), np.float32))
    with pytest.raises(BadImage, match=f"wrong number of bands: shape {planes}x{SIDE}x{SIDE}"):
        gf.read_bands(str(tmp_path / "cube.fits"))


def test_empty_unreadable_and_mismatched_files(tmp_path):
    write_hdus(tmp_path / "empty.fits", fits.PrimaryHDU(), fits.ImageHDU())
    gf.write_fits(tmp_path / "good.fits", galaxy_cube())
    (tmp_path / "cut.fits").write_bytes((tmp_path / "good.fits").read_bytes()[:4000])
    (tmp_path / "text.fits").write_text("not a FITS file at all\n" * 200)
    cases = {str(tmp_path / "empty.fits"): "empty FITS: no HDU holds image data",
             str(tmp_path / "cut.fits"): "unreadable FITS",
             str(tmp_path / "text.fits"): "unreadable FITS",
             str(tmp_path / "none.fits"): "unreadable FITS: FileNotFoundError"}
    for source, reason in cases.items():
        with pytest.raises(BadImage, match=reason):
            gf.read_bands(source)
    gf.write_fits(tmp_path / "g.fits", np.zeros((SIDE, SIDE)))
    gf.write_fits(tmp_path / "r.fits", np.zeros((SIDE, SIDE + 1)))
    with pytest.raises(BadImage, match=f"band files differ in size: g {SIDE}x{SIDE}, r {SIDE + 1}x{SIDE}"):
        gf.read_bands([str(tmp_path / n) for n in ("g.fits", "r.fits", "g.fits")])
    with pytest.raises(BadImage, match="band file g holds 3 planes"):
        gf.read_bands([str(tmp_path / n) for n in ("good.fits", "r.fits", "g.fits")])
    with pytest.raises(BadImage, match="no file for band r: its column is empty"):
        gf.read_bands([str(tmp_path / "g.fits"), "", str(tmp_path / "g.fits")])
    with pytest.raises(BadImage, match="wrong number of band files: 2"):
        gf.read_bands([str(tmp_path / "g.fits")] * 2)


def test_too_many_pixels_is_refused_from_the_header(tmp_path, monkeypatch):
    gf.write_fits(tmp_path / "big.fits", galaxy_cube())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIDE * SIDE - 1)
    with pytest.raises(BadImage, match=f"too many pixels: {SIDE}x{SIDE} is above the limit of {SIDE * SIDE - 1}"):
        gf.read_bands(str(tmp_path / "big.fits"))


# --- into crop_galaxy -------------------------------------------------------------------------------

def test_fits_image_goes_through_crop_galaxy(tmp_path):
    gf.write_fits(tmp_path / "cube.fits", galaxy_cube())
    data = gf.fits_image(str(tmp_path / "cube.fits"))
    assert data.mode == "RGB" and data.size == (SIDE, SIDE)
    cfg = build_config({"crop": "roi", "image_size": 32, "roi_min_size": 8})
    crop, box = crop_galaxy(data, cfg)
    expected, expected_box = crop_galaxy(_png(gf.bands_to_rgb(galaxy_cube())), cfg)   # a compressed PNG
    assert crop.size == (32, 32) and box == expected_box
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))


def _png(rgb):
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def test_check_agreement_finds_the_fits_step_exact(tmp_path):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.jpg")
        paths[-1].write_bytes(jpeg_bytes(np.stack([sky_with_galaxies(seed=seed)] * 3, axis=-1) * [0.8, 1, 1.2]))
    result = gf.check_agreement([str(p) for p in paths], str(tmp_path / "fits"), formats=(".fits", ".fz"))
    assert set(result) == {"png", ".fits", ".fz"}
    for source in (".fits", ".fz"):
        assert result[source]["pixels"] < 0.05 and result[source]["crops_vs_png"] < 0.05
        assert result[source]["crops_vs_jpeg"] == pytest.approx(result["png"]["crops_vs_jpeg"], abs=0.05)


@pytest.mark.parametrize("settings", [{}, {"image_size": 32}, {"center_crop_size": 101}, {"crop": "roi", "image_size": 32}])
def test_crop_planes_gives_the_whole_image_s_crop(settings):
    # a center crop stretches only its own pixels (and the rows turned over as bands_to_rgb turns them)
    planes = gf.rgb_to_bands(np.random.default_rng(3).integers(0, 256, (SIDE + 7, SIDE, 3), dtype=np.uint8))
    cfg = build_config(settings)
    crop, box = gf.crop_planes(planes, cfg)
    expected, expected_box = crop_galaxy(Image.fromarray(gf.bands_to_rgb(planes)), cfg)
    assert box == pytest.approx(expected_box)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
