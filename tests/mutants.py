"""Hand-made mutants of the core: does the fast test suite notice when a formula in src/ is wrong?

Each mutant is one deliberate bug, written as textual replacements in src/main.py. The script copies the project
to a temporary folder (the real files are never edited), applies one mutant at a time to the copy, and runs the
test files chosen for that mutant against it. The mutant is CAUGHT when they fail and MISSED when they pass.

    python tests/mutants.py                   every mutant; exit 1 if any is missed (or times out)
    python tests/mutants.py --only NAME ...   only these mutants
    python tests/mutants.py --list            the mutants, their bugs and test files

Before the mutants, the chosen test files run once against the unmutated copy: if they fail there, no verdict
means anything, and the script stops with exit 2. So does a mutant whose original text is no longer in the
source (exactly once), so that the list cannot silently rot as the code changes; tests/test_suite.py checks
this in the default suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Test files, by what they check: picked per mutant so that the whole run takes minutes, not the suite's time.
LAYERS = ("test_layers.py", "test_loss_and_model.py", "test_optimisers.py")
TORCH = ("test_torch.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the mistake, in words
    edits: tuple[tuple[str, str], ...]  # (original, replacement); each original occurs exactly once in `path`
    tests: tuple[str, ...]  # test files under tests/ (or FILE::TEST for one test) that should catch it
    path: str = "src/main.py"


MUTANTS = [
    Mutant("softmax_without_max_shift", "log_softmax does not subtract each row's maximum, so exp() overflows",
           (("shifted = logits - logits.max(axis=1, keepdims=True)", "shifted = logits"),),
           (*LAYERS,)),
    Mutant("maxpool_gradient_to_every_tie", "max pooling sends a window's gradient to every input equal to its "
           "maximum, not to the first one",
           (("is_max &= unclaimed\n", "\n"),
            ("self.winner[-1] = unclaimed", "self.winner[-1] = x[:, offsets[-1][1], offsets[-1][2], :] == y")),
           (*LAYERS, *TORCH)),
    Mutant("maxpool_assigns_overlapping_gradients", "max pooling's backward assigns instead of adding where "
           "overlapping windows share an input",
           (("grad_in[:, row_slice, col_slice, :] += grad_out * self.winner[offset]",
             "grad_in[:, row_slice, col_slice, :] = grad_out * self.winner[offset]"),),
           LAYERS),
    Mutant("avgpool_divides_by_pool_size", "average pooling's backward divides by pool instead of pool^2",
           (("share = grad_out / self.pool_size ** 2", "share = grad_out / self.pool_size"),),
           (*LAYERS, *TORCH)),
    Mutant("im2col_ignores_stride", "im2col keeps every window, whatever the stride",
           (("[:, ::stride, ::stride]", "[:, ::1, ::1]"),),
           LAYERS),
    Mutant("col2im_assigns", "col2im assigns each window's gradient instead of adding where windows overlap",
           (("grad_x[:, row_slice, col_slice, :] += grad_cols", "grad_x[:, row_slice, col_slice, :] = grad_cols"),),
           LAYERS),
    Mutant("conv_dW_transposed", "Conv2D's dW is grad_rows^T @ cols (the transpose) reshaped to W's shape",
           (("(cols.T @ grad_rows).reshape(self.params[\"W\"].shape)",
             "(grad_rows.T @ cols).reshape(self.params[\"W\"].shape)"),),
           LAYERS),
    Mutant("conv_crops_padding_wrongly", "Conv2D's backward keeps the top-left corner of the padded gradient "
           "instead of dropping the padding on every side",
           (("return grad_padded[:, p:p + height, p:p + width, :]", "return grad_padded[:, :height, :width, :]"),),
           LAYERS),
    Mutant("dense_bias_gradient_is_mean", "Dense's bias gradient is the mean over the batch instead of the sum",
           (("self.grads[\"b\"][...] = grad_out.sum(axis=0)",
             "self.grads[\"b\"][...] = grad_out.mean(axis=0)"),),
           LAYERS),
    Mutant("relu_passes_negative_gradient", "ReLU's backward passes the gradient where x < 0 too",
           (("return grad_out * self.positive", "return grad_out"),),
           LAYERS),
    Mutant("tanh_derivative_not_squared", "Tanh's backward uses 1 - y instead of 1 - y^2",
           (("return grad_out * (1 - self.y * self.y)", "return grad_out * (1 - self.y)"),),
           (*LAYERS, *TORCH)),
    Mutant("flatten_order_differs_from_backward", "Flatten's forward orders values channel-first, its backward "
           "reshapes the gradient back in the (H, W, C) order",
           (("return x.reshape(x.shape[0], -1)", "return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)"),),
           LAYERS),
    Mutant("batchnorm_backward_without_mean_term", "BatchNorm's dx leaves out the mean(grad_out) term",
           (("grad_rows - self.batch_mean(grad_rows) - self.xhat", "grad_rows - self.xhat"),),
           (*LAYERS, *TORCH)),
    Mutant("batchnorm_running_variance_biased", "BatchNorm's running variance takes the biased batch variance",
           (("momentum * var * m / (m - 1)", "momentum * var"),),
           (*TORCH, *LAYERS)),
    Mutant("batchnorm_momentum_swapped", "BatchNorm's running mean keeps 0.1 of the old value and takes 0.9 of "
           "the batch's",
           (("(1 - momentum) * running[\"running_mean\"] + momentum * mu",
             "momentum * running[\"running_mean\"] + (1 - momentum) * mu"),),
           (*TORCH, *LAYERS)),
    Mutant("batchnorm_evaluation_without_eps", "BatchNorm's evaluation divides by sqrt(running_var), without eps",
           (("np.sqrt(self.buffers[\"running_var\"] + self.eps)", "np.sqrt(self.buffers[\"running_var\"])"),),
           (*TORCH, *LAYERS)),
    Mutant("dropout_does_not_scale", "Dropout keeps values with probability 1 - rate but does not scale them by "
           "1 / (1 - rate)",
           (("return np.divide(keep, 1 - self.rate, dtype=dtype)", "return keep.astype(dtype)"),),
           LAYERS),
    Mutant("dropout_backward_without_mask", "Dropout's backward passes the gradient of dropped values",
           (("return grad_out * self.mask", "return grad_out"),),
           LAYERS),
    Mutant("cross_entropy_sum_not_mean", "the loss is the sum over the batch, not the mean",
           (("float(-log_probs[np.arange(len(labels)), labels].mean())",
             "float(-log_probs[np.arange(len(labels)), labels].sum())"),),
           (*LAYERS, *TORCH)),
    Mutant("cross_entropy_gradient_not_divided_by_n", "the loss gradient is softmax - onehot, not divided by N",
           (("return grad / len(self.labels)", "return grad"),),
           (*LAYERS, *TORCH)),
    Mutant("sgd_momentum_sign", "SGD's velocity is -momentum * v + g",
           (("velocity *= self.momentum", "velocity *= -self.momentum"),),
           TORCH),
    Mutant("adam_without_bias_correction", "Adam uses m and v without dividing by 1 - b1^t and 1 - b2^t",
           (("step_size = self.learning_rate / (1 - b1 ** self.t)", "step_size = self.learning_rate"),
            ("correction2_sqrt = math.sqrt(1 - b2 ** self.t)", "correction2_sqrt = 1.0")),
           TORCH),
    Mutant("weight_decay_on_every_weight", "decoupled weight decay shrinks biases and BatchNorm's scale too",
           (("if key.endswith(\".W\"):", "if key:"),),
           TORCH),
    Mutant("step_schedule_off_by_one_epoch", "the step schedule counts epochs from 1, decaying an epoch early",
           (("(step // steps_per_epoch // schedule[\"step_size\"])",
             "((step + steps_per_epoch) // steps_per_epoch // schedule[\"step_size\"])"),),
           TORCH),
    Mutant("one_cycle_peak_one_step_late", "the one-cycle schedule peaks one step after PyTorch's OneCycleLR",
           (("peak_step = schedule[\"pct_start\"] * total_steps - 1",
             "peak_step = schedule[\"pct_start\"] * total_steps"),),
           TORCH),
    Mutant("training_never_shuffles", "every epoch visits the training images in the same order",
           (("Position(epoch, 0, n_batches, rng.permutation(n_train))",
             "Position(epoch, 0, n_batches, np.arange(n_train))"),),
           ("test_training.py::test_each_epoch_visits_every_training_image_once_in_a_new_order",)),
]


class OutdatedMutantError(Exception):
    """A mutant's original text is not in the source exactly once: the code changed under the list."""


def mutated(source: str, mutant: Mutant) -> str:
    """The source with the mutant's edits applied; OutdatedMutantError unless each original occurs exactly once."""
    for original, replacement in mutant.edits:
        count = source.count(original)
        if count != 1:
            raise OutdatedMutantError(f"mutant {mutant.name}: {original!r} occurs {count} times in "
                                      f"{mutant.path}, expected once (update the mutant to the current code)")
        source = source.replace(original, replacement)
    compile(source, mutant.path, "exec")  # a mutant must be wrong Python, not broken Python
    return source


def copy_project(destination: Path) -> Path:
    """The project's source, tests, configs and docs copied under destination (no .git, caches, virtual
    environments, logs, data or run outputs)."""
    copy = destination / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".*_cache", "venv",
                                                              ".venv", "htmlcov", "logs", "data", "plots"))
    return copy


def run_tests(project: Path, files: list[str], timeout: float) -> tuple[str, float, str]:
    """Run pytest on the copy's test files, stopping at the first failure: (verdict, seconds, first failure),
    verdict "pass", "fail", "timeout" or "error" (pytest could not run them)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONPATH", "COV_CORE"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never a stale .pyc of a mutated file
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(project),
               *(f"tests/{name}" for name in files)]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    first = next((line.split(" - ")[0] for line in run.stdout.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))), "")
    verdict = {0: "pass", 1: "fail"}.get(run.returncode, "error")
    if verdict == "error" and not first:
        first = ((run.stdout + run.stderr).strip().splitlines() or [f"exit code {run.returncode}"])[-1]
    return verdict, seconds, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)

    by_name = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        print(f"error: no mutant named {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [by_name[name] for name in args.only] if args.only else MUTANTS
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}: {mutant.bug}\n    tests: {', '.join(mutant.tests)}")
        return 0
    try:
        for mutant in chosen:
            mutated((ROOT / mutant.path).read_text(), mutant)
    except (OutdatedMutantError, SyntaxError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mutants-") as temporary:
        project = copy_project(Path(temporary))
        all_files = sorted({name for mutant in chosen for name in mutant.tests})
        verdict, seconds, first = run_tests(project, all_files, args.timeout)
        if verdict != "pass":
            print(f"error: the unmutated project does not pass {' '.join(all_files)} ({verdict}: {first})",
                  file=sys.stderr)
            return 2
        print(f"unmutated project: {', '.join(all_files)} pass ({seconds:.0f} s)\n")
        width = max(len(mutant.name) for mutant in chosen)
        print(f"{'mutant':<{width}}  result  seconds  caught by")
        missed = []
        for mutant in chosen:
            target = project / mutant.path
            original = target.read_text()
            target.write_text(mutated(original, mutant))
            try:
                verdict, seconds, first = run_tests(project, list(mutant.tests), args.timeout)
            finally:
                target.write_text(original)
            result = {"fail": "CAUGHT", "pass": "MISSED"}.get(verdict, verdict.upper())
            if result != "CAUGHT":
                missed.append(mutant.name)
            print(f"{mutant.name:<{width}}  {result:<6}  {seconds:7.1f}  {first}", flush=True)
    print(f"\n{len(chosen) - len(missed)} of {len(chosen)} mutants caught"
          + (f"; not caught: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
