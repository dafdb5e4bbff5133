"""Synthetic tasks whose answers need context across regions, generated on the fly (nothing downloaded).

- `relations`: where red markers lie relative to blue ones, several regions apart (classification; the demo
  model's task). `python -m xt_hf.synthetic.relations --help`.
- `coastline`: SAR-like scenes where a vessel's class depends on the distance to a coast that may lie in
  another region (segmentation). `python -m xt_hf.synthetic.coastline --help`.
- `detection`: scenes with small vessels whose class is the nearer of two beacons, each in another region
  (detection; COCO-style boxes). `python -m xt_hf.synthetic.detection --help`.
- `splits`: the shared machinery: a deterministic random stream per (seed, split, sample), and splits saved
  as `datasets` folders.
"""
