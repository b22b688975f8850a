"""Sampling: the generation engine, loading for sampling, `cxrdist sample` runs, exports (merge, zip, kohya)."""
