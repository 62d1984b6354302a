"""Tiny fixtures in the exact on-disk formats the readers of ``tttlab.core.data`` accept.

Every generator writes random (seeded) images into ``root`` and returns the path to hand to the reader.
Used by the test suites of every subpackage; also handy to try a pipeline without the real data.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_cifar10(root, n_train: int = 10, n_test: int = 10, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py`` with 5 train batches (``n_train`` images in all) and a test batch."""
    rng = _rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    splits = np.array_split(np.arange(n_train), 5)
    for i, part in enumerate(splits, start=1):
        _write_batch(folder / f"data_batch_{i}", rng, len(part), f"training batch {i} of 5")
    _write_batch(folder / "test_batch", rng, n_test, "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": 10000,
        b"label_names": [n.encode() for n in _cifar_classes()],
        b"num_vis": 3072,
    }
    atomic_write_bytes(folder / "batches.meta", pickle.dumps(meta))
    return Path(root)


def _cifar_classes():
    from .data.cifar import CIFAR10_CLASSES

    return CIFAR10_CLASSES


def _write_batch(path: Path, rng, n: int, label: str) -> None:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    d = {b"batch_label": label.encode(), b"labels": labels, b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}  # fmt: skip
    atomic_write_bytes(path, pickle.dumps(d, protocol=2))


def make_cifar10_c(
    root, corruptions: Sequence[str] = ("gaussian_noise",), n_per_severity: int = 4, seed: int = 0
) -> Path:
    """``<root>/CIFAR-10-C/{<corruption>.npy, labels.npy}``: 5 x ``n_per_severity`` images per file."""
    rng = _rng(seed)
    folder = Path(root) / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, size=n_per_severity).astype(np.uint8), 5)
    np.save(folder / "labels.npy", labels)
    for name in corruptions:
        np.save(
            folder / f"{name}.npy", rng.integers(0, 256, size=(5 * n_per_severity, 32, 32, 3), dtype=np.uint8)
        )
    return folder


def _write_jpeg_tree(folder: Path, classes: Sequence[str], n_per_class: int, size, rng, suffix=".JPEG"):
    from PIL import Image

    for c in classes:
        d = folder / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = size if isinstance(size, tuple) else (size, size)
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{c}_{i}{suffix}", quality=95)


def default_wnids(k: int = 3) -> list[str]:
    from .data import imagenet_wnids

    w = imagenet_wnids()
    return [w[0], w[500], w[999]][:k]


def make_imagenet(
    root, wnids=None, n_per_class: int = 2, split: str = "val", size=(40, 48), seed: int = 0
) -> Path:
    """``<root>/<split>/<wnid>/*.JPEG``; returns ``root``."""
    _write_jpeg_tree(Path(root) / split, wnids or default_wnids(), n_per_class, size, _rng(seed))
    return Path(root)


def make_imagenet_c(root, corruptions=("fog",), severities=(1, 2, 3, 4, 5), wnids=None, n_per_class: int = 1,
                    size: int = 224, seed: int = 0) -> Path:  # fmt: skip
    """``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (224 px)."""
    rng = _rng(seed)
    for c in corruptions:
        for s in severities:
            _write_jpeg_tree(Path(root) / c / str(s), wnids or default_wnids(), n_per_class, size, rng)
    return Path(root)


def _make_subset(root, which: str, wnids, k: int, n_per_class: int, seed: int) -> Path:
    from .data import imagenet_a_wnids, imagenet_r_wnids

    wn = imagenet_a_wnids() if which == "a" else imagenet_r_wnids()
    chosen = list(wnids) if wnids is not None else [wn[0], wn[100], wn[199]][:k]
    _write_jpeg_tree(Path(root), chosen, n_per_class, (30, 36), _rng(seed), ".jpg")
    # the released imagenet-a/ and imagenet-r/ folders hold a README.txt next to the class folders
    (Path(root) / "README.txt").write_text(f"ImageNet-{which.upper()} fixture: <wnid>/*.jpg\n")
    return Path(root)


def make_imagenet_a(root, wnids=None, n_per_class: int = 2, k: int = 3, seed: int = 0) -> Path:
    """ImageNet-A layout ``<root>/<wnid>/*.jpg`` for ``wnids`` (default: 3 of its 200); returns ``root``."""
    return _make_subset(root, "a", wnids, k, n_per_class, seed)


def make_imagenet_r(root, wnids=None, n_per_class: int = 2, k: int = 3, seed: int = 0) -> Path:
    """ImageNet-R layout ``<root>/<wnid>/*.jpg`` for ``wnids`` (default: 3 of its 200); returns ``root``."""
    return _make_subset(root, "r", wnids, k, n_per_class, seed)


def make_imagenet_v2(root, classes=(0, 2, 9, 10, 100), n_per_class: int = 1, seed: int = 0) -> Path:
    """``<root>/imagenetv2-matched-frequency-format-val/<class index>/*.jpeg``; returns that folder."""
    folder = Path(root) / "imagenetv2-matched-frequency-format-val"
    _write_jpeg_tree(folder, [str(c) for c in classes], n_per_class, (30, 30), _rng(seed), ".jpeg")
    return folder


def make_tfds(root, name: str = "tttlab_fixture", n=5, image_shape=(8, 8, 3), num_classes: int = 3,
              seed: int = 0) -> Path:  # fmt: skip
    """A prepared TFDS dataset ``<root>/<name>/1.0.0/`` in array_record format, written without TensorFlow.

    ``n`` is the number of examples per split: an int (splits ``train`` and ``test``) or a dict
    ``{split: count}``.  Features: ``image`` (``image_shape`` uint8, PNG-encoded with Pillow here, since
    TFDS' own encoder would need TensorFlow) and ``label`` (``ClassLabel(num_classes)``).  The files are
    written by TFDS' own builder/writer (``GeneratorBasedBuilder.download_and_prepare``), which runs on
    NumPy alone for pre-encoded images: ``dataset_info.json``, ``features.json`` and
    ``<name>-<split>.array_record-00000-of-00001``.  TFDS orders records by a hash of their keys, so the
    file order differs from the generation order; :func:`expected_tfds_arrays` returns what was written.
    Returns the ``data_dir`` (``root``).
    """
    import io

    from .errors import require

    tfds_mod = require("tensorflow_datasets", "tfds")
    from PIL import Image

    splits = _tfds_splits(n)
    arrays = expected_tfds_arrays(n, image_shape, num_classes, seed)

    class _Fixture(tfds_mod.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds_mod.core.Version("1.0.0")

        def _info(self):
            return tfds_mod.core.DatasetInfo(
                builder=self,
                features=tfds_mod.features.FeaturesDict({
                    "image": tfds_mod.features.Image(shape=tuple(image_shape)),
                    "label": tfds_mod.features.ClassLabel(num_classes=num_classes),
                }),
            )  # fmt: skip

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            images, labels = arrays[split]
            for i, (img, lab) in enumerate(zip(images, labels)):
                buf = io.BytesIO()
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": int(lab)}

    _Fixture.name = name
    builder = _Fixture(data_dir=str(root), file_format="array_record")
    with _quiet_tfds(tfds_mod):
        builder.download_and_prepare(download_config=tfds_mod.download.DownloadConfig(verify_ssl=False))
    return Path(root)


def _tfds_splits(n) -> dict:
    return dict(n) if isinstance(n, dict) else {"train": int(n), "test": int(n)}


@contextlib.contextmanager
def _quiet_tfds(tfds_mod):
    """Hide TFDS' progress bars while the fixture is written, then restore the previous setting."""
    try:
        from tensorflow_datasets.core.utils import tqdm_utils

        was = bool(getattr(tqdm_utils, "_active", True))
    except ImportError:  # pragma: no cover - layout of other TFDS versions
        was = True
    tfds_mod.display_progress_bar(False)
    try:
        yield
    finally:
        tfds_mod.display_progress_bar(was)


def expected_tfds_arrays(n=5, image_shape=(8, 8, 3), num_classes: int = 3, seed: int = 0) -> dict:
    """``{split: (images uint8, labels int64)}`` that :func:`make_tfds` writes with the same arguments."""
    rng = _rng(seed)
    out = {}
    for s, count in _tfds_splits(n).items():
        out[s] = (rng.integers(0, 256, size=(count, *image_shape), dtype=np.uint8),
                  rng.integers(0, num_classes, size=count).astype(np.int64))  # fmt: skip
    return out


class CompileRecorder(list):
    """A stand-in for ``torch.compile`` in tests: each call appends the ``mode`` it was given (``None`` when
    absent) and returns the function unchanged but counted (``calls``: how often a "compiled" function
    ran).  Install it with :func:`record_torch_compile`."""

    __hash__ = object.__hash__  # code that keys tables by torch functions may meet it as torch.compile

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, fn, **kwargs):
        self.append(kwargs.get("mode"))

        def run(*args, **kw):
            self.calls += 1
            return fn(*args, **kw)

        return run

    def reset(self) -> None:
        self.clear()
        self.calls = 0


def fast_xla_compiles_for_tests() -> None:
    """Set, before JAX makes its backend, what JAX tests share (mttt_jax's conftest and the mttt_jax case of
    ``tests/test_resumable_keys.py``): one persistent XLA compilation cache in the temporary folder for every
    program, however small or quick to compile, and XLA:CPU's backend optimisation level 0 unless
    ``XLA_FLAGS`` already sets a level (the tests' models are tiny, so compiling dominates their time; see
    mttt_jax's ``tests/conftest.py`` for the measured gain and the last-bit differences it brings).  Only
    environment variables (subprocesses inherit them): no JAX import here."""
    import os
    import tempfile

    cache = os.path.join(tempfile.gettempdir(), "tttlab_mttt_jax_test_xla_cache")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
        )


def record_torch_compile(monkeypatch) -> CompileRecorder:
    """Replace ``torch.compile`` (pytest's ``monkeypatch``) by a :class:`CompileRecorder` and return it:
    what a config's ``compile`` value reaches, without compiling anything."""
    import torch
    import torch._dynamo  # noqa: F401  # its tables of torch functions are built from the real torch.compile

    recorder = CompileRecorder()
    monkeypatch.setattr(torch, "compile", recorder)
    return recorder


@contextlib.contextmanager
def hydra_state_kept():
    """Put back on exit the process-wide state that a Hydra command run in this process leaves behind, so
    that the next command (or test) in the process starts as in a fresh one.  Every package's tests use it
    around each test (an autouse fixture in their conftest).  What Hydra leaves:

    - its ``HydraConfig``: the ``--help``/``--cfg``/``--info`` pages set one without a run directory and
      keep it, and a run sets the job's before it resolves ``hydra.run.dir`` and puts the previous one back
      only once that has resolved (an unresolvable ``hydra.run.dir=${oc.env:UNSET}`` keeps the job's).
      :func:`tttlab.core.cli.user_errors` and :func:`tttlab.core.cli.apply_log_level` read it, as if inside
      a Hydra task;
    - ``GlobalHydra`` initialised, where an exception ends a composition between its set-up and clean-up;
    - logging: Hydra's ``hydra_logging``/``job_logging`` replace the root logger's handlers (a console one on
      the standard output of that moment) and its level, and ``hydra.verbose`` and
      :func:`tttlab.core.cli.apply_log_level` set the levels of the root and of named loggers.

    The loggers that exist on entry (``tttlab`` is made first) get their level, handlers, ``propagate`` and
    ``disabled`` back, and logging's cached answers of which levels each logger passes are emptied; a logger
    made inside keeps what it was given (libraries set up theirs on import).

    And absl's handler (:func:`_absl_handler_off_captured_streams`), on entry and on exit: made when
    ``absl.logging`` is first imported (tensorflow-datasets, orbax), it writes to the ``sys.stderr`` of that
    moment, which inside a test is pytest's capture file, and closes that stream when any later
    ``logging.config.dictConfig`` (Hydra's logging set-up, in every Hydra run) shuts down all handlers, unless
    it is the ``sys.stderr`` of *that* moment: in a later test with ``capsys`` it is not, and pytest's capture
    of the whole worker was closed (CI: every later test of the worker "ValueError: I/O operation on closed
    file", 763 errors).

    And, on exit, what the commands themselves change for the rest of the process (the leak hunt of session
    21, shuffled test orders):

    - torch's number of intra-op threads: a command's ``threads``/``num_threads`` key sets it
      (``torch.set_num_threads``) for the process.  Latent so far: ttt_mae's ``num_threads=2`` case is put back
      to one only by the same test's next run (smoke_pretrain says ``num_threads: 1``), so a failure between
      the two, or a test ending on such a run, would leave the rest of its worker on two threads: slower on the
      2-core machine (the conftests chose one) and other float sums than the references module fixtures
      computed on one;
    - ``sys.excepthook`` (:func:`tttlab.core.cli.quiet_closed_stdout`, which every command installs) and a
      ``sys.stdout`` that :func:`tttlab.core.cli.quiet_hydra_output` wrapped (pytest puts its own capture back
      by itself; under ``-s`` the guard stayed);
    - a library's log handler made inside a test on that test's ``sys.stderr`` (huggingface_hub's, on its first
      logger, when open_clip loads; any ``logging.StreamHandler()``): with ``capsys`` that stream is closed when
      the test ends, and every later line of that library printed "--- Logging error --- ValueError: I/O
      operation on closed file" into the stderr a later test checks, instead of the line
      (:func:`_log_handlers_off_closed_streams`)."""
    import logging
    import sys

    try:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # a core dependency, but removable: no Hydra state to keep
        GlobalHydra = HydraConfig = None  # noqa: N806
    logging.getLogger("tttlab")  # apply_log_level and hydra.verbose=tttlab set its level
    loggers = {"": logging.getLogger()}
    loggers.update(
        (name, lg)
        for name, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger)
    )
    saved = {name: (lg.level, lg.handlers[:], lg.propagate, lg.disabled) for name, lg in loggers.items()}
    hydra_config = HydraConfig.instance().cfg if HydraConfig is not None else None
    hydra_initialized = GlobalHydra is not None and GlobalHydra.instance().is_initialized()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    excepthook, stdout = sys.excepthook, sys.stdout
    _absl_handler_off_captured_streams()
    try:
        yield
    finally:
        _absl_handler_off_captured_streams()
        _log_handlers_off_closed_streams()
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        sys.excepthook = excepthook
        if sys.stdout is not stdout and type(sys.stdout).__name__ == "_ClosedStdoutGuard":
            sys.stdout = stdout
        if HydraConfig is not None:
            HydraConfig.instance().cfg = hydra_config
            if not hydra_initialized:
                GlobalHydra.instance().clear()
        for name, lg in loggers.items():
            level, handlers, lg.propagate, lg.disabled = saved[name]
            lg.level = level
            if lg.handlers != handlers:
                lg.handlers[:] = handlers
        # setLevel empties every logger's cache of isEnabledFor answers, which a level put back by assignment
        # (monkeypatch.setattr(root, "level", ...)) leaves stale: Hydra's logger, asked while --info had the
        # root at DEBUG, went on answering DEBUG, and every later Hydra run in the process printed its debug
        # pages, which set a HydraConfig without a run directory and keep it
        loggers[""].setLevel(saved[""][0])


def _absl_handler_off_captured_streams() -> None:
    """Point absl's Python log handler, where ``absl.logging`` is imported, at the interpreter's own standard
    error (``sys.__stderr__``), which its ``close`` never closes (see :func:`hydra_state_kept`).  Not on the
    root logger unless ``absl.app`` installed it, so no log line changes place; assigned, not ``setStream``,
    which would flush a stream already closed."""
    import sys

    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is None or sys.__stderr__ is None:
        return
    handler = absl_logging.get_absl_handler().python_handler
    if handler.stream is not sys.__stderr__:
        handler.stream = sys.__stderr__


def _log_handlers_off_closed_streams() -> None:
    """Point every stream handler (``logging.StreamHandler``, log files aside) whose stream is closed at the
    interpreter's standard error, ``sys.__stderr__`` (under pytest, its capture of file descriptor 2): a
    library's handler made inside a test writes to that test's ``sys.stderr``, closed when ``capsys`` ends,
    and would turn every later line of the library into a "Logging error" report (see
    :func:`hydra_state_kept`).  A closed stream takes no line, so nothing that worked changes place."""
    import logging
    import sys

    if sys.__stderr__ is None:
        return
    for ref in logging._handlerList[:]:  # weak references to every handler alive
        handler = ref()
        stream = getattr(handler, "stream", None)
        if (
            getattr(stream, "closed", False) is True
            and isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
        ):
            handler.stream = sys.__stderr__


def run_into_a_closed_pipe(*args: str, timeout: float = 300):
    """Run ``python *args`` (this interpreter, ``HF_HUB_OFFLINE=1``) with its standard output a pipe whose
    reader is gone before the first write, what ``... | head -3`` becomes once head has its lines; returns the
    finished :class:`subprocess.CompletedProcess` (stderr captured as text).  The commands' tests check that
    such a run ends quietly with exit status 141 (128 + SIGPIPE)."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [sys.executable, *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        os.close(w)


def run_faked_command_into_a_closed_pipe(
    prog: str, module: str, fake: str, returns: str, call: str, *overrides: str, timeout: float = 300
):
    """:func:`run_into_a_closed_pipe` of the console command ``prog`` without its work: ``module.<fake>`` (the
    function that computes) is replaced by one returning the Python expression ``returns``, then
    ``module.<call>`` runs the entry point (e.g. ``"main()"``) with ``sys.argv = [prog, *overrides]``.  What
    is left is the command's own printing of its result, which must end quietly when ``| head`` has gone."""
    code = (
        "import sys\n"
        f"import {module} as M\n"
        f"M.{fake} = lambda *a, **k: {returns}\n"
        "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
        f"M.{call}\n"
    )
    return run_into_a_closed_pipe("-c", code, prog, *overrides, timeout=timeout)


#: record fields that differ between two runs of the same config (the time, the code's commit, the hash)
VOLATILE_RECORD_FIELDS = ("wall_time_s", "git_sha", "config_hash")


def check_display_keys_rerun_the_same_run(
    run_dir, run_quietly, run_shown, *, timing_metrics=("s_per_image",), record_hash=None
):
    """The contract of :data:`tttlab.core.records.DISPLAY_KEYS` for one command: ``run_quietly()`` then
    ``run_shown()`` (the same command and ``run_dir``, only display keys changed: ``logging.progress``,
    ``progress``, ``logging.level``) are one run.  The second neither refuses the folder nor warns that it
    holds another config, the folder keeps one copy of each record (an evaluate replaces them, a finished
    training run writes nothing new) with the same values (``timing_metrics`` and the
    :data:`VOLATILE_RECORD_FIELDS` aside), and every record names the ``config_hash`` of the folder's
    ``config.yaml`` (the second run's config; ``record_hash(config)``: another hash of it, for a command
    whose records name the hash of a part of its config).  Returns the records after the second run."""
    return _check_rerun_is_the_same_run(
        run_dir,
        run_quietly,
        run_shown,
        "a display key",
        timing_metrics=timing_metrics,
        record_hash=record_hash,
    )


def check_resumable_keys_rerun_the_same_run(
    run_dir, run_first, run_changed, *, reference=None, timing_metrics=("s_per_image",), record_hash=None
):
    """The contract of a command's resumable keys (``RunDir(resumable_keys=...)``: how often it checkpoints,
    how many checkpoints it keeps, where it stops, ...): ``run_first()`` (which may stop part-way, leaving a
    checkpoint) then ``run_changed()`` (the same command and ``run_dir``, only resumable keys changed; it
    resumes and finishes) are one run.  The second neither refuses the folder nor warns that it holds another
    config; the first run's records are kept once, in front, with their values; no (method, metric,
    corruption, severity, step) is recorded twice; every record names the ``config_hash`` of the folder's
    ``config.yaml`` (the changed config; ``record_hash`` as in :func:`check_display_keys_rerun_the_same_run`);
    and, given ``reference`` (the records of an uninterrupted run of the first config, e.g. ``read_jsonl`` of
    its folder), the records equal its records (``timing_metrics`` and :data:`VOLATILE_RECORD_FIELDS`
    aside): the same numbers.  Returns the records after the second run."""
    return _check_rerun_is_the_same_run(
        run_dir, run_first, run_changed, "a resumable key", timing_metrics=timing_metrics,
        record_hash=record_hash, reference=reference, first_may_be_partial=True,
    )  # fmt: skip


def _check_rerun_is_the_same_run(run_dir, run_first, run_again, what, *, timing_metrics, record_hash,
                                 reference=None, first_may_be_partial=False):  # fmt: skip
    import warnings

    from .records import _load_yaml_config, config_hash, read_jsonl

    path = Path(run_dir)

    def stable(records):
        return [
            {k: v for k, v in r.items() if k not in VOLATILE_RECORD_FIELDS}
            for r in records
            if r["metric"] not in timing_metrics
        ]

    run_first()
    first = read_jsonl(path / "records.jsonl")
    assert first or first_may_be_partial, f"{path}: the first run wrote no records"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*different config.*")
        run_again()
    again = read_jsonl(path / "records.jsonl")
    assert again, f"{path}: no records after the second run"
    if first_may_be_partial:
        assert stable(again)[: len(stable(first))] == stable(first), f"{what} changed the first run's records"
        keys = [(r["method"], r["metric"], r["corruption"], r["severity"], r["step"]) for r in again]
        assert len(keys) == len(set(keys)), f"{what}: a record written twice: {sorted(keys)}"
    else:
        assert stable(again) == stable(first), f"{what} changed the records (or appended a second copy)"
    if reference is not None:
        assert stable(again) == stable(reference), f"{what} changed the numbers of the run"
    shown_hash = (record_hash or config_hash)(_load_yaml_config(path / "config.yaml"))
    assert {r["config_hash"] for r in again} == {shown_hash}, "one folder, one config_hash: the config's"
    return again


@contextlib.contextmanager
def imported_afresh(packages: Sequence[str], blocked: Sequence[str] = ()):
    """Inside the block, ``packages`` (names; their submodules too) import anew, with the ``blocked`` modules
    unimportable (``import torch`` raises ImportError): a test that a command's module needs no torch or
    timm at import (its ``--help`` start-up) without a subprocess, in a process that imported them long ago.

    Afterwards the old modules of ``packages`` are back, and so are the attributes that the fresh imports set
    on the packages above them (a module of ``packages`` imported for the first time inside is dropped, and
    taken off its package).  A module outside ``packages`` imported for the first time inside stays when
    nothing is blocked: dropping it would have the next import run it a second time, which some cannot
    survive (torchvision's and ``torch._dynamo``'s operator registrations raise "Only a single
    TORCH_LIBRARY can be used to register the namespace"); with ``blocked`` modules it is dropped, as it may
    have seen them missing, so that ``sys.modules`` is what it was."""
    import sys

    def ours(name: str, roots: Sequence[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    saved = dict(sys.modules)
    parents = {}  # (parent module, attribute) -> the old value, for each dropped module with a kept parent
    for name in [m for m in sys.modules if ours(m, packages)]:
        parent, _, attr = name.rpartition(".")
        if parent in sys.modules and not ours(parent, packages):
            parents[(parent, attr)] = getattr(sys.modules[parent], attr, None)
    try:
        for name in [m for m in sys.modules if ours(m, packages) or ours(m, blocked)]:
            del sys.modules[name]
        for parent, attr in parents:  # else ``from . import x`` would find the old module on its package
            with contextlib.suppress(AttributeError):
                delattr(sys.modules[parent], attr)
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable"
        yield
    finally:
        dropped = {
            m: sys.modules[m] for m in list(sys.modules) if m not in saved and (blocked or ours(m, packages))
        }
        for name in dropped:
            del sys.modules[name]
        sys.modules.update(saved)
        for name, module in dropped.items():  # not left on a kept package (``import`` would not find it)
            parent, _, attr = name.rpartition(".")
            if saved.get(parent) is not None and getattr(saved[parent], attr, None) is module:
                with contextlib.suppress(AttributeError):
                    delattr(saved[parent], attr)
        for (parent, attr), value in parents.items():
            if value is None:
                with contextlib.suppress(AttributeError):
                    delattr(sys.modules[parent], attr)
            else:
                setattr(sys.modules[parent], attr, value)
