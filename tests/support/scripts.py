"""Load a script of the repository (benchmarks/, scripts/) as a module, to test its functions directly."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from support.training import REPO


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """The script at REPO/relative_path, imported as `module_name` (registered in sys.modules first: dataclasses look
    their module up while a class is built)."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
