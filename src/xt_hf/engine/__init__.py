"""The inference engine: runs an unchanged xT model on images far larger than memory.

The model files (one level up) say *what* xT computes and ship to the Hub; this package says *when and
where*: it reads regions lazily from disk (`sources`), feeds them through the model's own region loop,
schedules the context encoder's blocks a chunk of tokens at a time in place (`context`; attention a head and a
chunk of rows at a time, `attention`), can keep token buffers in files on disk (`spill`), drives every
whole-scene task through one driver (`heads`, `scene`), writes whole-scene outputs region by region (`writers`)
and runs many scenes into one results table (`batch`). It is chosen explicitly, by calling it or by the `xt-hf`
commands, never by a grad mode.
"""

from .batch import expand_inputs, run_batch
from .context import encode_grid, encode_in_place, new_token_buffer
from .heads import ContextHead, RegionHead
from .scene import (
    decode_streaming,
    detect_streaming,
    encode_context_streaming,
    encode_regions_streaming,
    predict_streaming,
    region_feed,
    region_reader_for,
    run_scene,
    segment_streaming,
)
from .sources import RegionReader, RegionSource, open_region_source

__all__ = [
    "ContextHead",
    "RegionHead",
    "RegionReader",
    "RegionSource",
    "decode_streaming",
    "detect_streaming",
    "encode_context_streaming",
    "encode_grid",
    "encode_in_place",
    "encode_regions_streaming",
    "expand_inputs",
    "new_token_buffer",
    "open_region_source",
    "predict_streaming",
    "region_feed",
    "region_reader_for",
    "run_batch",
    "run_scene",
    "segment_streaming",
]
