"""A georeferenced scene reads as its pixels, keeps where they lie, and its no-data pixels never count as data.

The scene is what SAR gives: two float32 bands of backscatter in dB (negative values) in a projected CRS
(UTM zone 33N), with a no-data border and one whole region of no-data. Tests that write or read GeoTIFFs need
rasterio (the `geo` extra) and skip without it; the rest run on the base install.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REGION, REPO_ROOT, tiny_backbone_config, tiny_config

from xt_hf import XTForImageClassification, XTImageProcessor
from xt_hf.engine import RegionReader, open_region_source, predict_streaming
from xt_hf.engine.geo import require_geo
from xt_hf.engine.sources import ImageError
from xt_hf_cli import main

HEIGHT, WIDTH = 3 * REGION + 5, 2 * REGION + 17  # non-square, not a multiple of the region
NODATA = -9999.0
MEAN, STD = (-15.0, -12.0), (4.0, 3.0)  # per band, dB
ORIGIN = (500_000.0, 4_650_000.0)  # UTM 33N easting, northing of the top-left corner: about 15° E, 42° N
PIXEL = 10.0  # metres


@pytest.fixture(scope="module")
def pixels():
    """`(height, width, 2)` float32 dB, NODATA on the top 3 rows, the right 5 columns and the region at (row 1,
    column 0)."""
    rng = np.random.default_rng(0)
    image = (rng.normal(MEAN, STD, (HEIGHT, WIDTH, 2))).astype(np.float32)
    image[:3], image[:, -5:], image[REGION : 2 * REGION, :REGION] = NODATA, NODATA, NODATA
    return image


@pytest.fixture(scope="module")
def scene(pixels, tmp_path_factory):
    """`pixels` as a tiled GeoTIFF in EPSG:32633 with a no-data value."""
    rasterio = pytest.importorskip("rasterio")

    path = tmp_path_factory.mktemp("geo") / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", height=HEIGHT, width=WIDTH, count=2, dtype="float32",
                       crs="EPSG:32633", transform=rasterio.Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1]),
                       nodata=NODATA, tiled=True, blockxsize=32, blockysize=32) as dataset:
        dataset.write(np.moveaxis(pixels, -1, 0))
    return path


def valid_pixels(pixels):
    return (pixels != NODATA).all(axis=-1)


def test_geotiff_windows_read_the_array_and_its_bands(scene, pixels):
    source = open_region_source(scene)
    assert type(source).__name__ == "RasterioSource"
    assert (source.height, source.width, source.channels, source.dtype) == (HEIGHT, WIDTH, 2, np.float32)
    for top, left, size in [(0, 0, 32), (40, 30, 25), (HEIGHT - 10, WIDTH - 7, 32)]:  # the last one is clipped
        np.testing.assert_array_equal(source.read(top, left, size, size), pixels[top : top + size, left : left + size])
    second_then_first = open_region_source(scene, bands=[2, 1])
    assert second_then_first.channels == 2
    np.testing.assert_array_equal(second_then_first.read(5, 6, 20, 20), pixels[5:25, 6:26, ::-1])
    with pytest.raises(ImageError, match=r"scene.tif has 2 bands .*band 3 does not exist"):
        open_region_source(scene, bands=[3])


def test_any_raster_gdal_reads_opens_through_rasterio(scene, tmp_path):
    import rasterio

    bands = np.arange(2 * 40 * 50, dtype=np.int16).reshape(2, 40, 50)
    with rasterio.open(tmp_path / "scene.img", "w", driver="HFA", height=40, width=50, count=2, dtype="int16",
                       crs="EPSG:4326", transform=rasterio.Affine(0.01, 0, 10, 0, -0.01, 50)) as dataset:
        dataset.write(bands)
    source = open_region_source(tmp_path / "scene.img", bands=[2])
    assert (source.channels, source.dtype, source.georeference.crs.to_epsg()) == (1, np.int16, 4326)
    np.testing.assert_array_equal(source.read(0, 0, 40, 50)[..., 0], bands[1])
    assert source.valid(0, 0, 40, 50) is None  # no no-data value, mask or alpha band


def test_band_selection_of_plain_sources_picks_channels():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    source = open_region_source(image, bands=(3, 1))
    assert (source.channels, source.georeference, source.valid(0, 0, 4, 5)) == (2, None, None)
    np.testing.assert_array_equal(source.read(1, 1, 2, 3), image[1:3, 1:4][..., [2, 0]])
    with pytest.raises(ValueError, match="has 3 bands"):
        open_region_source(image, bands=(4,))


def test_valid_marks_every_band_with_data(scene, pixels):
    source = open_region_source(scene)
    np.testing.assert_array_equal(source.valid(0, 0, HEIGHT, WIDTH), valid_pixels(pixels))
    np.testing.assert_array_equal(source.valid(20, 50, 40, 40), valid_pixels(pixels)[20:60, 50:90])


def test_overview_is_the_scene_downsampled(scene, pixels):
    source = open_region_source(scene)
    full, scale = source.overview(max(HEIGHT, WIDTH))
    assert scale == 1.0
    np.testing.assert_array_equal(full, pixels)
    preview, scale = source.overview(25)  # the longer side is the height
    assert preview.shape == (25, round(WIDTH * 25 / HEIGHT), 2) and scale == 25 / HEIGHT
    valid = source.overview_valid(25)
    assert valid.shape == preview.shape[:2] and not valid[0].any() and valid[-1, :-2].all()
    assert abs(preview[valid].mean(axis=0) - MEAN).max() < 0.5  # no-data never enters an average
    georeference = source.georeference.resampled(preview.shape[1], preview.shape[0])
    right_edge = source.georeference.pixel_to_crs(WIDTH, 0)[0]
    assert georeference.pixel_to_crs(preview.shape[1], 0)[0] == pytest.approx(right_edge)


def test_georeference_places_pixels_as_pyproj_does(scene):
    from pyproj import Transformer

    georeference = open_region_source(scene).georeference
    assert georeference.crs.to_epsg() == 32633
    assert (georeference.width, georeference.height, georeference.nodata) == (WIDTH, HEIGHT, NODATA)
    col, row = 10, 20
    xs, ys = georeference.pixel_to_crs(col + 0.5, row + 0.5)  # the pixel's centre
    assert (float(xs), float(ys)) == (ORIGIN[0] + 10.5 * PIXEL, ORIGIN[1] - 20.5 * PIXEL)
    lons, lats = georeference.to_lonlat(xs, ys)
    expected = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(float(xs), float(ys))
    np.testing.assert_allclose((float(lons), float(lats)), expected, rtol=0, atol=1e-12)
    assert 15.0 < float(lons) < 15.1 and 41.9 < float(lats) < 42.1


def test_nodata_reads_as_padding_and_db_values_pass_unchanged(scene, pixels):
    reader = RegionReader(open_region_source(scene), REGION, image_mean=MEAN, image_std=STD)
    regions = {(row, col): region for region, row, col in (reader[index] for index in range(len(reader)))}
    # A region of nothing but no-data is the model's zero padding, as the part of a region beyond the border.
    assert torch.equal(regions[1, 0], torch.zeros(2, REGION, REGION))
    assert torch.equal(regions[3, 1][:, 5:], torch.zeros(2, REGION - 5, REGION))
    # Elsewhere negative float pixels are not rescaled or clipped: (x − mean) / std, per band, in float32.
    region, window = regions[0, 0], pixels[:REGION, :REGION]
    expected = (window - np.float32(MEAN)) / np.float32(STD)
    expected[~valid_pixels(window)] = 0
    np.testing.assert_array_equal(region.numpy(), np.moveaxis(expected, -1, 0))
    assert (region[:, :3] == 0).all() and (region[:, 3:] != 0).any()


def test_negative_floats_normalise_alike_with_or_without_rescaling(scene, pixels):
    """The processor and the reader take float dB as they are, or multiplied by a chosen factor, never clipped."""
    window = pixels[REGION : 2 * REGION, REGION : 2 * REGION]  # region (row 1, column 1): all data
    for settings in ({}, {"do_rescale": False}, {"rescale_factor": 0.5}):
        processor = XTImageProcessor(region_size=REGION, image_mean=list(MEAN), image_std=list(STD), **settings)
        expected = processor(window, return_tensors="pt").pixel_values[0]
        reader = RegionReader(open_region_source(scene), REGION, **{name: getattr(processor, name) for name in (
            "image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize")})
        region, row, col = reader[reader.cols + 1]
        assert (row, col) == (1, 1)
        torch.testing.assert_close(region, expected, rtol=0, atol=0)
        factor = np.float32(settings.get("rescale_factor", 1.0))  # nothing clipped to [0, 1]
        by_hand = (window * factor - np.float32(MEAN)) / np.float32(STD)
        np.testing.assert_allclose(expected.numpy(), np.moveaxis(by_hand, -1, 0), rtol=0, atol=1e-6)


def test_streaming_a_geotiff_gives_the_logits_of_the_array_in_memory(scene, pixels):
    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(backbone_config=tiny_backbone_config(num_channels=2))).eval()
    processor = XTImageProcessor(region_size=REGION, image_mean=list(MEAN), image_std=list(STD))
    # In memory, a no-data pixel set to its band's mean normalises to exactly 0: the padding the reader gives it.
    in_memory = np.where(valid_pixels(pixels)[..., None], pixels, np.float32(MEAN))
    with torch.no_grad():
        expected = model(**processor(in_memory, return_tensors="pt")).logits
    streamed = predict_streaming(model, scene, processor=processor, region_batch_size=2)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


def stats_of(capsys, argv: list[str]) -> dict:
    main(["stats", *argv])
    lines = capsys.readouterr().out.splitlines()
    return json.loads(next(line for line in lines if line.startswith("{")))


def test_stats_measure_the_valid_pixels(scene, pixels, capsys):
    valid = pixels[valid_pixels(pixels)].astype(np.float64)  # (n, 2)
    # A window larger than the scene covers it: every sample counts each valid pixel once.
    printed = stats_of(capsys, [str(scene), "--window", "512", "--samples", "3"])
    assert printed["do_rescale"] is False  # floats are normalised as they are
    np.testing.assert_allclose(printed["image_mean"], valid.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(printed["image_std"], valid.std(axis=0), rtol=1e-6)
    printed = stats_of(capsys, [str(scene), "--window", "512", "--samples", "1", "--bands", "2"])
    np.testing.assert_allclose(printed["image_mean"], valid[:, 1:].mean(axis=0), rtol=1e-6)
    # Random small windows estimate the same values.
    printed = stats_of(capsys, [str(scene), "--window", "16", "--samples", "200", "--seed", "1"])
    np.testing.assert_allclose(printed["image_mean"], valid.mean(axis=0), rtol=0.02)
    np.testing.assert_allclose(printed["image_std"], valid.std(axis=0), rtol=0.05)


def test_stats_of_uint8_scenes_are_in_the_processors_rescaled_units(tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "scene.npy", image)
    printed = stats_of(capsys, [str(tmp_path / "scene.npy"), "--window", "64", "--samples", "1"])
    pixels = image.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(printed["image_mean"], pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(printed["image_std"], pixels.std(axis=0), rtol=1e-6)


@pytest.mark.parametrize("bands", ["0", "1,x"])
def test_bands_are_numbered_from_one(bands, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["stats", "scene.tif", "--bands", bands])
    assert exited.value.code == 2 and "--bands" in capsys.readouterr().err


def test_bands_are_refused_rather_than_ignored_with_a_results_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["embed", str(tmp_path / "scene.npy"), "--model", str(tmp_path), "--output", str(tmp_path / "t.parquet"),
              "--bands", "1"])
    assert exited.value.code == 2 and "--bands works on one input" in capsys.readouterr().err


def test_missing_geo_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(ImportError) as raised:
        require_geo("Reading scene.tif with its georeference")
    assert str(raised.value) == ("Reading scene.tif with its georeference needs the geo extra: "
                                 "pip install 'xt-hf[geo]' (rasterio, pyproj, geopandas)")


def test_a_geotiff_without_the_geo_extra_reads_as_pixels(scene, pixels, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with caplog.at_level(logging.WARNING, logger="xt_hf.engine.sources"):
        source = open_region_source(scene)
    assert source.georeference is None and source.valid(0, 0, 8, 8) is None
    np.testing.assert_array_equal(source.read(0, 0, HEIGHT, WIDTH), pixels)
    (warning,) = caplog.messages
    assert "scene.tif is a GeoTIFF" in warning and "xt-hf[geo]" in warning and "\n" not in warning


def test_stats_help_does_not_import_torch():
    code = ("import sys\nfrom xt_hf_cli import main\ntry:\n    main(['stats', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert "--samples" in result.stdout and result.stdout.strip().endswith("False"), result.stdout + result.stderr
