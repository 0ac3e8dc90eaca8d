"""Tests of crop.py: the region-of-interest box, the fixed central box, decoding and bad images."""
import io

from PIL import Image
import numpy as np
import pytest
from scipy import ndimage

from config import build_config
from conftest import SHARED_SAMPLE, needs_real_sample
from galaxy import crop, kaggle_raw
from helpers import blob, jpeg_bytes, sky_with_galaxies


def test_roi_box_takes_the_central_galaxy_not_the_brighter_neighbour():
    cfg = build_config({"crop": "roi"})
    left, top, right, bottom = crop.roi_box(sky_with_galaxies(), cfg)
    # above 10% of the peak the blob reaches 15 * sqrt(2 ln 10) = 32 px from its centre: side 64, padded 77
    assert abs((left + right) / 2 - 212) <= 3 and abs((top + bottom) / 2 - 212) <= 3
    assert 65 <= right - left <= 90 and right - left == pytest.approx(bottom - top)
    assert not (left <= 90 <= right and top <= 330 <= bottom)


def test_roi_box_on_a_reduced_frame_keeps_raw_pixel_units():
    cfg = build_config({"crop": "roi", "roi_min_size": 200})
    gray = sky_with_galaxies()[::4, ::4]
    left, top, right, bottom = crop.roi_box(gray, cfg, scale=4)
    assert right - left == pytest.approx(50)   # 200 raw px = 50 px of the 1/4 frame


def test_roi_box_with_a_dark_centre_takes_the_nearest_blob():
    cfg = build_config({"crop": "roi"})
    image = 10 + blob(424, 212 + 18, 212, 4, 120) + blob(424, 60, 60, 6, 250)
    left, top, right, bottom = crop.roi_box(image, cfg)
    assert abs((left + right) / 2 - 230) <= 3 and right - left == pytest.approx(48)   # roi_min_size


def test_central_blob_is_the_same_as_labelling_the_whole_frame():
    """_central_blob labels a central window first; blobs that reach its edge, dark centres and
    blobs nearest to a dark centre from outside the window must give what the whole frame gives."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        size = int(rng.integers(20, 120))
        smooth = ndimage.uniform_filter(rng.random((size, size)), int(rng.integers(1, 9)))
        level = np.quantile(smooth, rng.uniform(0.3, 0.97))
        cy, cx = size // 2, size // 2
        blobs, _ = ndimage.label(smooth > level)
        galaxy = blobs[cy, cx]
        if galaxy == 0:
            ys, xs = np.nonzero(blobs)
            if not len(ys):
                continue
            nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
            galaxy = blobs[ys[nearest], xs[nearest]]
        expected = ndimage.find_objects((blobs == galaxy).astype(int))[0]
        assert crop._central_blob(smooth, level, cy, cx) == expected, trial


def test_roi_box_is_shifted_inside_the_frame():
    cfg = build_config({"crop": "roi"})
    image = 10 + blob(424, 212, 212, 150, 200)   # larger than the frame
    assert crop.roi_box(image, cfg) == (0, 0, 424, 424)


def test_crop_galaxy_roi_and_center():
    data = jpeg_bytes(sky_with_galaxies())
    cropped, box = crop.crop_galaxy(data, build_config({"crop": "roi"}))
    assert cropped.size == (64, 64) and cropped.mode == "RGB"
    assert abs((box[0] + box[2]) / 2 - 212) <= 3 and 65 <= box[2] - box[0] <= 90
    pixels = np.asarray(cropped.convert("L"), dtype=float)
    peak = np.unravel_index(np.argmax(ndimage.uniform_filter(pixels, 5)), pixels.shape)
    assert abs(peak[0] - 32) <= 3 and abs(peak[1] - 32) <= 3
    cropped, box = crop.crop_galaxy(io.BytesIO(data), build_config({"crop": "center", "center_crop_size": 212}))
    assert box == (106, 106, 318, 318) and cropped.size == (64, 64)


def test_center_box_takes_the_same_fraction_of_any_frame():
    cfg = build_config({"center_crop_size": 212})
    assert crop.center_box(424, 424, cfg) == (106, 106, 318, 318)
    assert crop.center_box(212, 212, cfg) == (53, 53, 159, 159)
    assert crop.center_box(600, 300, cfg) == (225, 75, 375, 225)      # half the shorter side
    assert crop.center_box(424, 424, build_config({"center_crop_size": 424})) == (0, 0, 424, 424)
    assert crop.center_box(200, 100, build_config({"center_crop_size": 424})) == (50, 0, 150, 100)


def test_a_cutout_at_another_size_gives_the_kaggle_frame_s_crop():
    cfg = build_config({"crop": "center"})
    image = sky_with_galaxies()
    frame = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    kaggle_crop = np.asarray(crop.crop_galaxy(jpeg_bytes(image, quality=100), cfg)[0], float)
    for side in (212, 848):
        cutout = np.asarray(frame.resize((side, side), Image.BOX))
        cutout_crop = np.asarray(crop.crop_galaxy(jpeg_bytes(cutout, quality=100), cfg)[0], float)
        assert np.abs(cutout_crop - kaggle_crop).mean() < 2   # grey levels of 0-255: the same view


@pytest.mark.parametrize("crop_kind", ["center", "roi"])
def test_an_image_of_the_network_s_input_size_is_used_whole(crop_kind):
    cfg = build_config({"crop": crop_kind})
    made, _ = crop.crop_galaxy(jpeg_bytes(sky_with_galaxies(), quality=100), cfg)
    png = io.BytesIO()
    made.save(png, format="PNG")
    again, box = crop.crop_galaxy(png.getvalue(), cfg)
    assert box == (0, 0, 64, 64) and np.array_equal(np.asarray(again), np.asarray(made))


def test_crop_galaxy_accepts_grayscale_and_rejects_junk(tmp_path):
    cfg = build_config({"crop": "roi"})
    cropped, _ = crop.crop_galaxy(jpeg_bytes(sky_with_galaxies(), mode="L"), cfg)
    assert cropped.mode == "RGB"
    path = tmp_path / "galaxy.jpg"
    path.write_bytes(jpeg_bytes(sky_with_galaxies()))
    assert crop.crop_galaxy(path, cfg)[0].size == (64, 64)
    for junk, reason in [(b"", "empty file"), (b"not a jpeg at all", "not an image"),
                         (jpeg_bytes(sky_with_galaxies())[:3000], "corrupt or truncated"),
                         (jpeg_bytes(np.zeros((40, 40))), "image too small")]:
        with pytest.raises(crop.BadImage, match=reason):
            crop.crop_galaxy(junk, cfg)


@needs_real_sample
def test_roi_boxes_on_the_real_sample():
    cfg = build_config({"crop": "roi"})
    # the box is centred on the thresholded galaxy's extent, which arms, halos and touching
    # neighbours make lopsided: measured on this sample, the median offset is 6 px and 87% are
    # within 15 px of the frame centre; the brightest spot of 95% of the crops is near their centre
    references = sorted(kaggle_raw.raw_images(SHARED_SAMPLE, "train").values())[::10]
    offsets, bright_offsets = [], []
    for reference in references:
        cropped, (left, top, right, bottom) = crop.crop_galaxy(kaggle_raw.read_raw(SHARED_SAMPLE, reference), cfg)
        offsets.append(max(abs((left + right) / 2 - 212), abs((top + bottom) / 2 - 212)))
        gray = ndimage.uniform_filter(np.asarray(cropped.convert("L"), dtype=float), 5)
        y, x = np.unravel_index(np.argmax(gray), gray.shape)
        bright_offsets.append(max(abs(y - 32), abs(x - 32)))
    assert np.median(offsets) <= 8 and np.mean(np.array(offsets) <= 15) >= 0.8
    assert np.mean(np.array(bright_offsets) <= 8) >= 0.9


@pytest.mark.parametrize("crop_kind", ["center", "roi"])
def test_a_decoded_image_is_cropped_as_its_lossless_file(crop_kind):
    # FITS images reach crop_galaxy decoded (a PIL image): the crop must be the one its PNG would give
    rgb = np.repeat(sky_with_galaxies()[:, :, None], 3, axis=2).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    cfg = build_config({"crop": crop_kind, "image_size": 32})
    from_image, box = crop.crop_galaxy(Image.fromarray(rgb), cfg)
    from_png, png_box = crop.crop_galaxy(png.getvalue(), cfg)
    assert box == png_box
    np.testing.assert_array_equal(np.asarray(from_image), np.asarray(from_png))
    with pytest.raises(crop.BadImage, match="image too small"):
        crop.crop_galaxy(Image.fromarray(rgb[:20, :20]), cfg)
