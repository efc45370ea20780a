"""What a training run writes: the model file, the exports, the pictures and the results file (--save-model,
--export, --plot-dir, --output), each whole or not at all, and what happens when one of them cannot be written.

Called by main.run_training once training is over. A leaf module: it never imports main; the run's model,
data and result come in as arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from errors import OutputError
from exports import check_exports, export_model
from modelfile import model_meta, save_model
from plumbing import StopRequest, check_distinct_files, check_writable, log_to_file, versions, write_json

log = logging.getLogger("numpy_cnn")


def check_outputs(args: Any, cfg: dict, config_file: str | None) -> None:
    """Before any training: CNNError (one line) when an output could not be written later, or when two roles
    (config, results, model, log, a picture, the model being loaded) name the same file."""
    plot_dir = cfg["output"]["plot_dir"]
    pictures = {}
    if plot_dir:
        from plots import FIGURE_SIZES

        pictures = {f"the picture {name}.png": str(Path(plot_dir) / f"{name}.png") for name in FIGURE_SIZES}
    exports = {f"--export ({number})": path for number, path in enumerate(args.export or [], 1)}
    check_distinct_files({"the config": config_file, "--output": args.output, "--save-model": args.save_model,
                          "logging.file": cfg["logging"]["file"], **pictures, **exports})
    check_exports(args.export or [], args.load_model)
    if args.load_model and args.load_model != args.save_model:  # continuing a model into its own file is fine
        check_distinct_files({"--load-model": args.load_model, "--output": args.output, **pictures})
    check_writable(args.output, "--output")
    check_writable(args.save_model, "--save-model")
    check_writable(plot_dir, "--plot-dir" if args.plot_dir else "output.plot_dir", folder=True)
    if cfg["training"]["epochs"] and not isinstance(args.resume, str):  # --resume DIR: checked when it is read
        check_writable(cfg["output"]["checkpoint_dir"],
                       "--checkpoint-dir" if args.checkpoint_dir else "output.checkpoint_dir", folder=True)


def results_document(args: Any, cfg: dict, model_cfg: dict, data: Any, model: Any,
                     result: Any, summary: dict, train_seconds: float, files: dict,
                     problems: list[str]) -> dict:
    """Everything --output records about a training run (the README's 'Results file' table)."""
    return {
        "status": result.status, "stopped_at": result.stopped_at, "started_at": summary["saved_at"],
        "config": dict(cfg, model=model_cfg),
        "data": {"dataset": data.name, "source": data.source, "n_train": len(data.x_train), "n_test": len(data.x_test),
                 "input_shape": list(data.input_shape), "note": data.note, "class_names": data.class_names,
                 **({"skipped_files": data.skipped} if data.name == "folder" else {})},
        "model": {"summary": model.summary_rows(), "parameters": model.parameter_count(),
                  "loaded_from": args.load_model},
        "history": result.history, "epochs_completed": summary["epochs_completed"],
        "test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"], "workers": summary["workers"],
        "resumed_from": summary.get("resumed_from"), "train_seconds": round(train_seconds, 3), "files": files,
        "problems": problems, "versions": versions(),
    }


def write_outputs(args: Any, cfg: dict, model_cfg: dict, data: Any, model: Any, optimizer: Any, result: Any,
                  summary: dict, train_seconds: float, stop: StopRequest) -> tuple[list[str], bool]:
    """The model file, the pictures and the results file, each written whole or not at all. A file that cannot
    be written (a full disk, say) is named in one line, and the others are still written; a signal skips the
    pictures. Returns the problems, and whether a file could not be written."""
    files: dict[str, Any] = {}
    problems: list[str] = []
    failed_writes = False

    def write(what: str, path: str, action: Callable[[], None]) -> bool:
        nonlocal failed_writes
        try:
            action()
            return True
        except (OSError, OutputError) as error:
            failed_writes = True
            cause = error.__cause__ if isinstance(error, OutputError) else error
            reason = getattr(cause, "strerror", None) or cause
            problems.append(f"{what} {path}: {reason}")
            log.error("could not write %s %s (%s)", what, path, reason)
            return False

    if args.save_model and result.status == "diverged":
        log.warning("not saving the model: its weights are not finite")
    elif args.save_model and write("the model", args.save_model, lambda: save_model(
            Path(args.save_model), model, model_cfg, data, summary, optimizer)):
        files["model"] = args.save_model
        log.info("saved the model to %s", args.save_model)
    for path in args.export or []:
        if result.status == "diverged":
            log.warning("not exporting the model to %s: its weights are not finite", path)
        elif write("the export", path, lambda: export_model(path, model, model_meta(model, model_cfg, data, summary))):
            files.setdefault("exports", []).append(path)
    plot_dir = cfg["output"]["plot_dir"]
    if plot_dir and result.status != "diverged" and stop.signum is None:
        try:  # a picture that fails must not cost the results of the run
            from plots import write_plots

            pictures: dict = {}
            if write("the pictures in", plot_dir, lambda: pictures.update(
                    write_plots(Path(plot_dir), model, data, result.history))):
                files["plots"] = pictures
                log.info("pictures written to %s: %s", plot_dir, ", ".join(Path(p).name for p in pictures.values()))
        except Exception as error:
            log_to_file(logging.ERROR, "drawing the pictures failed", with_traceback=True)
            problems.append(f"pictures: {type(error).__name__}: {error}")
            log.error("could not draw the pictures (%s: %s)", type(error).__name__, error)
    if cfg["logging"]["file"]:
        files["log"] = cfg["logging"]["file"]
    if args.output:
        if stop.signum is not None and result.status == "completed":  # the status says what the exit code says
            result.status, result.stopped_at = "interrupted", {"after": "training, while writing the outputs"}
        files["results"] = args.output
        document = results_document(args, cfg, model_cfg, data, model, result, summary, train_seconds, files,
                                    problems)
        if write("the results", args.output, lambda: write_json(args.output, document)):
            log.info("results written to %s", args.output)
    return problems, failed_writes
