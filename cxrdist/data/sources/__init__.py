"""Data sources by name. Imports are lazy: a source's heavy or optional dependencies load only when used."""
from __future__ import annotations

import importlib

from cxrdist.errors import DataError

# name -> "module:Class"; every class implements cxrdist.data.sources.base.Source.
SOURCES: dict[str, str] = {
    "iu-xray": "cxrdist.data.sources.iu_xray:IUXraySource",
    "manifest": "cxrdist.data.sources.manifest:ManifestSource",
    "mimic-cxr": "cxrdist.data.sources.mimic_cxr:MimicCXRSource",
    "chexpert-plus": "cxrdist.data.sources.chexpert_plus:CheXpertPlusSource",
    "phantom": "cxrdist.data.sources.phantom:PhantomSource",
}


def source_class(name: str) -> type:
    """The class registered under `name`; DataError with the known names (or the missing module) otherwise."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}: choose one of {', '.join(sorted(SOURCES))}")
    module_name, _, attr = SOURCES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise DataError(f"data source {name!r} is not available in this version "
                            f"({module_name} is missing)") from None
        raise
    return getattr(module, attr)
