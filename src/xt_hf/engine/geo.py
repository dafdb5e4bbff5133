"""Where a scene's pixels lie on the Earth: the georeference of a GeoTIFF (or any GDAL raster) kept beside its pixels.

rasterio and pyproj are the optional `geo` extra; nothing here imports them until a georeferenced file is
opened or a coordinate is converted, so the base install reads the same files as plain pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

GEO_EXTRA = "pip install 'xt-hf[geo]' (rasterio, pyproj, geopandas)"


def require_geo(feature: str):
    """The `rasterio` module, or an `ImportError` of one line saying that `feature` needs the geo extra."""
    try:
        import pyproj  # noqa: F401  (coordinates: GeoReference.to_lonlat)
        import rasterio
    except ImportError:
        raise ImportError(f"{feature} needs the geo extra: {GEO_EXTRA}") from None
    return rasterio


@dataclass(frozen=True)
class GeoReference:
    """The coordinate reference system and pixel grid of a scene.

    `transform` is rasterio's affine `(a, b, c, d, e, f)` from pixel *corner* coordinates to the CRS:
    `x = a·col + b·row + c`, `y = d·col + e·row + f` (a north-up grid has `b = d = 0` and `e < 0`).
    `nodata` is the file's no-data value (None when it declares none); `width`, `height` its size in pixels.
    """

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    width: int
    height: int

    @classmethod
    def of_dataset(cls, dataset) -> GeoReference | None:
        """The georeference of an open rasterio dataset, or None when it has no CRS."""
        if dataset.crs is None:
            return None
        affine = dataset.transform
        transform = tuple(float(value) for value in (affine.a, affine.b, affine.c, affine.d, affine.e, affine.f))
        nodata = None if dataset.nodata is None else float(dataset.nodata)
        return cls(dataset.crs.to_wkt(), transform, nodata, int(dataset.width), int(dataset.height))

    @property
    def crs(self):
        """The CRS as a `rasterio.crs.CRS`."""
        return require_geo("A scene's CRS").crs.CRS.from_wkt(self.crs_wkt)

    def pixel_to_crs(self, cols, rows) -> tuple[np.ndarray, np.ndarray]:
        """CRS coordinates `(xs, ys)` of pixel coordinates `(cols, rows)` (arrays or numbers, float64). Integer
        coordinates are pixel corners; pass `col + 0.5, row + 0.5` for pixel centres."""
        a, b, c, d, e, f = self.transform
        cols, rows = np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)
        return a * cols + b * rows + c, d * cols + e * rows + f

    def to_lonlat(self, xs, ys) -> tuple[np.ndarray, np.ndarray]:
        """Longitudes and latitudes (WGS 84, EPSG:4326, degrees) of CRS coordinates `(xs, ys)`."""
        require_geo("Converting coordinates to longitude and latitude")
        lons, lats = _to_wgs84(self.crs_wkt).transform(np.asarray(xs, dtype=np.float64),
                                                        np.asarray(ys, dtype=np.float64))
        return np.asarray(lons), np.asarray(lats)

    def resampled(self, width: int, height: int) -> GeoReference:
        """The same ground extent on a grid of `width` × `height` pixels (a preview, or an output map at a coarser
        resolution): each new pixel covers `self.width / width` × `self.height / height` of the scene's."""
        a, b, c, d, e, f = self.transform
        sx, sy = self.width / width, self.height / height
        return GeoReference(self.crs_wkt, (a * sx, b * sy, c, d * sx, e * sy, f), self.nodata, int(width), int(height))


@functools.lru_cache(maxsize=8)
def _to_wgs84(crs_wkt: str):
    """One pyproj transformer per CRS: building one parses the CRS database (milliseconds), converting is cheap."""
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)
