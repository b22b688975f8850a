"""Sampling: the generation engine, model loading for sampling, `cxrdist sample` runs, merge and zip."""
