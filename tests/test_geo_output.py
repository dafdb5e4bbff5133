"""Georeferenced outputs and previews: a scene with a CRS gives a class-map GeoTIFF in that CRS, detections at the
right longitude/latitude (GeoJSON, RFC 7946) and in the scene's CRS (GeoParquet); no-data pixels never get a class
or a detection; a scene without a CRS says that its outputs are pixels; every command draws a preview in memory
bounded by the picture.

The scene: two float32 bands of SAR backscatter in dB in UTM zone 33N (10 m pixels), with a no-data border. Tests
need the geo extra (rasterio, pyproj, geopandas) and skip without it.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_backbone_config, tiny_config

from xt_hf import XTForObjectDetection, XTForSemanticSegmentation, XTImageProcessor
from xt_hf.engine import detect_streaming, segment_streaming
from xt_hf_cli import main

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")

HEIGHT, WIDTH = 3 * REGION + 5, 4 * REGION  # 101 × 128 px: the last row of regions partly outside
NODATA = -9999.0
BORDER = 12  # no-data columns on the left, rows at the top
MEAN, STD = (-15.0, -12.0), (4.0, 3.0)
ORIGIN, PIXEL = (500_000.0, 4_650_000.0), 10.0  # top-left corner in UTM 33N metres, about 15° E, 42° N
THRESHOLD = 0.08  # an untrained head scores about 0.1 everywhere: detections all over the scene
LABELS = {0: "vessel", 1: "fixed infrastructure"}


def write_scene(path, pixels, *, nodata=NODATA):
    with rasterio.open(path, "w", driver="GTiff", height=pixels.shape[0], width=pixels.shape[1], count=2,
                       dtype="float32", crs="EPSG:32633", nodata=nodata, tiled=True, blockxsize=32, blockysize=32,
                       transform=rasterio.Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1])) as dataset:
        dataset.write(np.moveaxis(pixels, -1, 0))
    return path


@pytest.fixture(scope="module")
def pixels():
    image = np.random.default_rng(0).normal(MEAN, STD, (HEIGHT, WIDTH, 2)).astype(np.float32)
    image[:BORDER], image[:, :BORDER] = NODATA, NODATA
    return image


@pytest.fixture(scope="module")
def scene(pixels, tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("geo") / "scene.tif", pixels)


SEGMENTER_REGION = 2 * REGION  # a tiled TIFF's tiles are multiples of 16 px: 64 px regions at stride 4


def sar_processor(region_size=REGION):
    return XTImageProcessor(region_size=region_size, image_mean=list(MEAN), image_std=list(STD))


@pytest.fixture(scope="module")
def processor():
    return sar_processor()


def two_band_config(**overrides):
    settings = dict(backbone_config=tiny_backbone_config(num_channels=2), classifier="pool", num_labels=2,
                    id2label=LABELS, decoder_output_stride=4)
    return tiny_config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return XTForObjectDetection(two_band_config(detection_threshold=THRESHOLD)).eval()


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return XTForSemanticSegmentation(two_band_config(region_size=SEGMENTER_REGION)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, detector, segmenter):
    folder = tmp_path_factory.mktemp("models")
    for name, model in (("detector", detector), ("segmenter", segmenter)):
        model.save_pretrained(folder / name)
        sar_processor(model.config.region_size).save_pretrained(folder / name)
    return folder


def utm_of_lonlat(lons, lats):
    return pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True).transform(lons, lats)


class MarkerDetector(XTForObjectDetection):
    """A detector that finds exactly the objects drawn at `markers` (pixel centres `(x, y)`, 6 × 6 px boxes) and
    nothing else, each reported by the region holding it, as a trained head reports a peak: what it stands for
    here is the way from a region's box to longitude/latitude, not the network."""

    markers: list[tuple[float, float]] = []

    def region_detections(self, index, maps, threshold=None):
        region = self.config.region_size
        for image, _, (left, top) in super().region_detections(index, maps, threshold):
            inside = [(x - left, y - top) for x, y in self.markers if 0 <= x - left < region and 0 <= y - top < region]
            boxes = torch.tensor([[x - 3, y - 3, x + 3, y + 3] for x, y in inside]).reshape(-1, 4).float()
            yield image, {"scores": torch.full((len(inside),), 0.9), "labels": torch.ones(len(inside), dtype=torch.long),
                          "boxes": boxes}, (left, top)


def test_a_detection_drawn_at_a_known_pixel_comes_back_at_its_longitude_latitude(scene, processor, tmp_path):
    from xt_hf.engine.writers import write_detections

    torch.manual_seed(0)
    model = MarkerDetector(two_band_config()).eval()
    model.markers = [(70.5, 45.5), (REGION + 0.5, 2 * REGION - 0.5), (5.5, 60.5)]  # the last in the no-data border
    found = detect_streaming(model, scene, processor=processor)
    assert len(found["scores"]) == 2, "the marker in the no-data border must not be reported"
    from xt_hf.engine import open_region_source

    georeference = open_region_source(scene).georeference
    write_detections(tmp_path / "boxes.geojson", found["boxes"].numpy(), found["scores"].numpy(),
                     found["labels"].numpy(), LABELS, georeference=georeference)
    features = json.loads((tmp_path / "boxes.geojson").read_text())["features"]
    for feature, (x, y) in zip(sorted(features, key=lambda f: f["properties"]["pixel_box"][0]),
                               sorted(model.markers[:2])):
        ring = np.array(feature["geometry"]["coordinates"][0][:4])
        easting, northing = utm_of_lonlat(ring[:, 0].mean(), ring[:, 1].mean())
        # Within half a pixel of the marker's centre, in metres on the ground.
        assert abs(easting - (ORIGIN[0] + x * PIXEL)) < PIXEL / 2
        assert abs(northing - (ORIGIN[1] - y * PIXEL)) < PIXEL / 2
        assert feature["properties"]["label"] == "fixed infrastructure"


def test_no_data_never_gets_a_detection(scene, detector, processor):
    found = detect_streaming(detector, scene, processor=processor)
    assert len(found["scores"]) > 10, "the check needs detections"
    centres = (found["boxes"][:, :2] + found["boxes"][:, 2:]) / 2
    assert bool((centres >= BORDER).all()), "a detection centred in the no-data border"


def test_geojson_is_valid_rfc_7946_in_longitude_latitude(scene, saved, tmp_path):
    FeatureCollection = pytest.importorskip("geojson_pydantic").FeatureCollection  # an RFC 7946 model (dev extra)
    shapely = pytest.importorskip("shapely")

    main(["detect", str(scene), "--model", str(saved / "detector"), "--output", str(tmp_path / "boxes.geojson"),
          "--threshold", str(THRESHOLD)])
    document = json.loads((tmp_path / "boxes.geojson").read_text())
    FeatureCollection.model_validate(document)  # raises on anything RFC 7946 does not allow
    assert "crs" not in document and "longitude" in document["xt_hf"]["coordinates"]
    assert len(document["features"]) > 10
    for feature in document["features"]:
        ring = feature["geometry"]["coordinates"][0]
        if shapely.Polygon(ring).area > 0:  # an untrained head also gives boxes of zero width, which have no turn
            assert shapely.LinearRing(ring).is_ccw, "RFC 7946: exterior rings are counter-clockwise"
        assert all(14.9 < lon < 15.1 and 41.9 < lat < 42.1 for lon, lat in ring)
        x1, y1, x2, y2 = feature["properties"]["pixel_box"]
        assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT and 0 < feature["properties"]["score"] <= 1


def test_geoparquet_is_in_the_scenes_crs_with_the_pixel_box(scene, saved, detector, processor, tmp_path):
    geopandas = pytest.importorskip("geopandas")

    main(["detect", str(scene), "--model", str(saved / "detector"), "--output", str(tmp_path / "boxes.parquet"),
          "--threshold", str(THRESHOLD)])
    frame = geopandas.read_parquet(tmp_path / "boxes.parquet")
    assert frame.crs.to_epsg() == 32633
    expected = detect_streaming(detector, scene, processor=processor)
    np.testing.assert_allclose(frame[["x1", "y1", "x2", "y2"]].to_numpy(), expected["boxes"].numpy(), rtol=1e-6)
    assert list(frame["label"]) == [LABELS[int(i)] for i in expected["labels"]]
    x1, y1, x2, y2 = expected["boxes"][0].tolist()
    np.testing.assert_allclose(frame.geometry.iloc[0].bounds, (ORIGIN[0] + x1 * PIXEL, ORIGIN[1] - y2 * PIXEL,
                                                               ORIGIN[0] + x2 * PIXEL, ORIGIN[1] - y1 * PIXEL))


def test_a_scene_without_a_crs_says_its_outputs_are_pixels(pixels, saved, tmp_path):
    geopandas = pytest.importorskip("geopandas")

    np.save(tmp_path / "scene.npy", np.where(pixels == NODATA, np.float32(-15.0), pixels))
    for name in ("boxes.geojson", "boxes.parquet"):
        main(["detect", str(tmp_path / "scene.npy"), "--model", str(saved / "detector"), "--output",
              str(tmp_path / name), "--threshold", str(THRESHOLD)])
    document = json.loads((tmp_path / "boxes.geojson").read_text())
    assert document["xt_hf"]["coordinates"].startswith("pixels") and "not longitude/latitude" in (
        document["xt_hf"]["coordinates"])
    ring = document["features"][0]["geometry"]["coordinates"][0]
    assert ring[:4] == [[x, y] for x, y in ring[:4]] and max(x for x, _ in ring) <= WIDTH
    assert geopandas.read_parquet(tmp_path / "boxes.parquet").crs is None  # GeoParquet: an undefined CRS


def test_class_map_is_a_cog_in_the_scenes_crs_without_classes_on_no_data(scene, segmenter, pixels, tmp_path):
    processor = sar_processor(SEGMENTER_REGION)
    output = tmp_path / "mask.tif"
    shape = segment_streaming(segmenter, scene, output, processor=processor, region_batch_size=3)
    stride = segmenter.config.decoder_output_stride
    with rasterio.open(scene) as source, rasterio.open(output) as written:
        assert written.crs == source.crs
        assert written.transform == source.transform @ rasterio.Affine.scale(stride)
        assert (written.height, written.width) == shape == (-(-HEIGHT // stride), WIDTH // stride)
        assert written.nodata == 255 and written.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert json.loads(written.tags()["CLASS_NAMES"]) == list(LABELS.values())
        assert written.colormap(1)[1][:3] != written.colormap(1)[0][:3] and written.colormap(1)[255][3] == 0
        classes = written.read(1)
    border = BORDER // stride
    assert (classes[:border] == 255).all() and (classes[:, :border] == 255).all()
    inside = classes[border:, border:]
    assert inside.max() < 2 and len(np.unique(inside)) == 2, "the data must be classified (both classes here)"
    # The same scene without no-data gives the in-memory argmax everywhere (the reader's padding is the mean).
    filled = np.where(pixels == NODATA, np.float32(MEAN), pixels)
    write_scene(tmp_path / "filled.tif", filled, nodata=None)
    segment_streaming(segmenter, tmp_path / "filled.tif", tmp_path / "filled_mask.tif", processor=processor)
    with torch.no_grad():
        logits = segmenter(**processor(filled, return_tensors="pt")).logits
    expected = logits.argmax(dim=1)[0].numpy()[: shape[0], : shape[1]]
    with rasterio.open(tmp_path / "filled_mask.tif") as written:
        np.testing.assert_array_equal(written.read(1), expected)
    np.testing.assert_array_equal(inside, expected[border:, border:])


def test_a_zarr_class_map_records_the_georeference(scene, segmenter, tmp_path):
    zarr = pytest.importorskip("zarr")

    segment_streaming(segmenter, scene, tmp_path / "mask.zarr", processor=sar_processor(SEGMENTER_REGION))
    attributes = zarr.open(str(tmp_path / "mask.zarr"), mode="r").attrs
    assert attributes["class_names"] == list(LABELS.values()) and attributes["nodata"] == 255
    assert rasterio.crs.CRS.from_wkt(attributes["crs_wkt"]).to_epsg() == 32633
    assert attributes["transform"][:3] == [PIXEL * 4, 0, ORIGIN[0]]


def test_every_command_draws_a_preview(scene, saved, tmp_path):
    from PIL import Image

    from xt_hf import XTForImageClassification

    XTForImageClassification(two_band_config()).save_pretrained(tmp_path / "classifier")
    sar_processor().save_pretrained(tmp_path / "classifier")
    runs = {"detect": ["--model", str(saved / "detector"), "--output", str(tmp_path / "boxes.geojson")],
            "segment": ["--model", str(saved / "segmenter"), "--output", str(tmp_path / "mask.tif")],
            "predict": ["--model", str(tmp_path / "classifier"), "--json"]}
    for command, arguments in runs.items():
        main([command, str(scene), *arguments, "--preview", str(tmp_path / f"{command}.png"), "--preview-size", "64"])
        with Image.open(tmp_path / f"{command}.png") as picture:
            # The scene at 64 px on its longer side, beside a legend at least as tall.
            assert picture.width == 64 + 280 and picture.height >= 50
            scene_part = np.asarray(picture.convert("RGB"))[:50, :64]
        assert np.abs(scene_part[1, 1].astype(int) - 40).max() <= 6, f"{command}: the no-data corner is not no data"
    with pytest.raises(SystemExit):  # an existing preview is never replaced without --overwrite
        main(["detect", str(scene), *runs["detect"][:2], "--output", str(tmp_path / "other.json"), "--preview",
              str(tmp_path / "detect.png")])


def test_a_preview_of_a_huge_lazy_scene_holds_the_picture_not_the_scene(tmp_path):
    from xt_hf.engine import open_region_source
    from xt_hf.engine.preview import preview_detections

    side = 8192  # 201 MB of uint8 RGB, never written: a sparse file reads as zeros
    np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype=np.uint8, shape=(side, side, 3)).flush()
    source = open_region_source(tmp_path / "huge.npy")
    boxes = np.array([[100.0, 200.0, 140.0, 230.0], [8000.0, 8000.0, 8100.0, 8150.0]])
    tracemalloc.start()
    try:
        preview_detections(source, boxes, np.array([0, 1]), np.array([0.9, 0.8]), class_names=list(LABELS.values()),
                           output=tmp_path / "huge.png", max_side=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The scene is 201 MB; one window of 1,024² px and the 1,024² picture are about 3 MB each.
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB"
