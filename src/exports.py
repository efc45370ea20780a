"""--export FILE (repeatable): the model as ONNX (FILE.onnx, onnx_export.py) or as a PyTorch state_dict of its
twin (FILE.pt, torch_twin.py), after training or, with --load-model, as it was saved.

The optional packages (onnx, torch) are looked for before any work, and a missing one is one line naming the
command that installs it (exit code 2). A leaf module: it never imports main.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from errors import ConfigError
from plumbing import check_distinct_files, check_writable, write_atomic
from torch_twin import INSTALL_TORCH

log = logging.getLogger("numpy_cnn")

# suffix -> (what it is, the package it needs, the command that installs that package)
FORMATS = {
    ".onnx": ("ONNX", "onnx", "pip install onnx onnxruntime"),
    ".pt": ("PyTorch", "torch", INSTALL_TORCH),
}


def check_exports(paths: list[str], load_model: str | None = None) -> None:
    """Before any work: ConfigError (one line) for an --export FILE that is not .onnx or .pt, whose package is not
    installed, that cannot be written, or that names the same file as another --export or as --load-model."""
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix not in FORMATS:
            raise ConfigError(f"--export {path}: expected a file ending in .onnx (ONNX) or .pt (PyTorch state_dict), "
                              f"got {suffix or 'no suffix'}")
        what, package, install = FORMATS[suffix]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--export {path}: the {what} export needs the {package} package, which is not "
                              f"installed: {install}")
        check_writable(path, "--export")
    check_distinct_files({"--load-model": load_model,
                          **{f"--export ({number})": path for number, path in enumerate(paths, 1)}})


def export_model(path: str, model: Any, meta: dict) -> None:
    """Write one export (the suffix says which), whole or not at all. meta: what a model file records
    (modelfile.model_meta; its example images stay in model files). OSError when the file cannot be written;
    ConfigError for a layer ONNX cannot express."""
    meta = {key: value for key, value in meta.items() if key != "examples"}
    if Path(path).suffix.lower() == ".onnx":
        from onnx_export import export_onnx

        export_onnx(Path(path), model, meta, write_atomic)
    else:
        from torch_twin import save_pt

        save_pt(Path(path), model, meta, write_atomic)
    log.info("exported the model to %s", path)


def write_exports(paths: list[str], model: Any, meta: dict) -> list[str]:
    """Each export of --export, as far as possible: a file that cannot be written is named in one line (logged)
    and the others are still written. Returns the problems (empty when every file was written)."""
    problems = []
    for path in paths:
        try:
            export_model(path, model, meta)
        except OSError as error:
            problems.append(f"the export {path}: {error.strerror or error}")
            log.error("could not write the export %s (%s)", path, error.strerror or error)
    return problems
