"""Command-line helpers shared by every subpackage's entry points.

:func:`user_errors` turns the user's bad input (a :class:`~tttlab.core.errors.TTTLabError`: a missing path,
a bad value, a checkpoint of another architecture) into one ``<prog>: error: <Type>: <message>`` line on
stderr and exit status 2, the convention of ``argparse``, instead of a traceback through our internals
(Hydra prints one for every exception).  Any other exception is a bug and keeps its traceback.

Under ``torchrun`` the same line also goes into the worker's error file (``TORCHELASTIC_ERROR_FILE``), so
torchrun's failure summary names the error under "Root Cause" instead of "To enable traceback see ...".

Output into a pipe whose reader has gone (``tttlab-torch-ttt-train --help | head -3``) ends the command
quietly with exit status 141 (128 + SIGPIPE, what a shell reports for a command a closed pipe ended), not a
``BrokenPipeError`` traceback: inside :func:`user_errors`, and at the top of the program after
:func:`quiet_closed_stdout` (which :func:`check_hydra_command` calls, so Hydra's ``--help`` page is covered).
A Hydra task's output belongs inside its :func:`user_errors` block: Hydra reports an exception in the task
itself (exit status 1, a traceback).  Hydra's own ``--cfg job``/``--cfg hydra``/``--cfg all`` print (whose
exception Hydra reports the same way) and ``--info`` pages (written by logging, which reports the exception
and goes on) are covered by :func:`quiet_hydra_output`, which :func:`check_hydra_command` also calls: on a
command line that only asks Hydra to print, a write into the closed pipe ends the command at once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from .errors import TTTLabError


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run the body; a :class:`TTTLabError` ends the command with its message and exit status 2, Ctrl-C
    (``KeyboardInterrupt``) with ``<prog>: interrupted`` and exit status 130.

    Inside a Hydra task, a run directory that holds only what Hydra put there before the task ran (its
    ``.hydra`` folder and the job's ``<name>.log``) is removed first, with the empty folders above it up to
    the working directory: the commands check the user's paths and values before they write anything, so
    a typo leaves no half-made run behind.  A directory with anything else in it (an earlier run's files,
    the user's own) is left exactly as it is."""
    quiet_closed_stdout()
    try:
        yield
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a child's, a socket): a bug, with its traceback
            raise
        _leave_closed_stdout()
        raise SystemExit(CLOSED_STDOUT_STATUS) from None
    except TTTLabError as exc:
        _remove_hydra_only_run_dir()
        line = f"{prog}: error: {type(exc).__name__}: {exc}"
        print(line, file=sys.stderr)
        _tell_torchrun(line)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status 130, not a traceback through torch's kernels (the files a
        # run wrote are complete, writes being atomic; the READMEs say what running it again does)
        _remove_hydra_only_run_dir()
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


#: Exit status of a command whose standard output was closed under it (``... --help | head -1``): 128 +
#: SIGPIPE, the status a shell shows for a program that a closed pipe ended.
CLOSED_STDOUT_STATUS = 141


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``poll`` reports an error on it)."""
    try:
        import select

        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real stdout: assume it was stdout
        return True


def _leave_closed_stdout() -> None:
    """Point the standard output's file descriptor at the null device, so that nothing written or flushed
    after the reader left (Python's own flush at exit included) raises again."""
    import os

    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (AttributeError, OSError, ValueError):
        pass


def quiet_closed_stdout() -> None:
    """From now on, a ``BrokenPipeError`` that reaches the top of the program because standard output was
    closed (``... --help | head -3``, Hydra printing its help) ends it quietly with exit status
    :data:`CLOSED_STDOUT_STATUS` instead of a traceback (a ``sys.excepthook`` that hands every other
    exception to the hook it replaces).  Idempotent; :func:`check_hydra_command` and :func:`user_errors`
    call it."""
    previous = sys.excepthook
    if getattr(previous, "_tttlab_closed_stdout", False):
        return

    def hook(kind, value, tb):
        if issubclass(kind, BrokenPipeError) and _stdout_closed():
            _end_quietly()  # an excepthook cannot choose the status: it would be 1
        previous(kind, value, tb)

    hook._tttlab_closed_stdout = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _end_quietly() -> None:
    """End the program now with :data:`CLOSED_STDOUT_STATUS`, its standard output pointed at the null device
    first (nothing flushed later raises again) and the log handlers flushed (``os._exit`` runs no exit
    handlers)."""
    import logging
    import os

    _leave_closed_stdout()
    logging.shutdown()  # the log files' last lines
    sys.stderr.flush()
    os._exit(CLOSED_STDOUT_STATUS)


class _ClosedStdoutGuard:
    """Standard output whose ``write``/``writelines``/``flush`` end the program quietly (:func:`_end_quietly`)
    when the closed standard output refuses them, wherever the ``BrokenPipeError`` would have gone: Hydra
    catches the one of its ``--cfg`` print (a traceback and exit status 1), and logging the one of its
    ``--info`` pages (a "Logging error" report and exit status 0).  Everything else goes to the stream it
    wraps."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _guarded(self, name: str, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            if _stdout_closed():
                _end_quietly()
            raise

    def write(self, text):
        return self._guarded("write", text)

    def writelines(self, lines):
        return self._guarded("writelines", lines)

    def flush(self):
        return self._guarded("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


#: Options of Hydra's command line that run the task, and those that only modify what the others do (which
#: config, which package of it); every other option makes Hydra print something of its own (the composed
#: config, a help or info page, its version) and stop
HYDRA_RUN_OPTIONS = ("-m", "--multirun", "-r", "--run", "--experimental-rerun")
HYDRA_MODIFIER_OPTIONS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package",
                          "--resolve")  # fmt: skip


#: Hydra's long options: its argparse also takes an unambiguous abbreviation (``--multi`` is ``--multirun``)
HYDRA_LONG_OPTIONS = ("--help", "--hydra-help", "--version", "--cfg", "--resolve", "--package", "--run",
                      "--multirun", "--shell-completion", "--config-path", "--config-name", "--config-dir",
                      "--experimental-rerun", "--info")  # fmt: skip


def _hydra_option(option: str) -> str:
    """``option`` with an abbreviated long option spelt out, as Hydra's argparse reads it (unchanged when it is
    no unique prefix of one)."""
    if not option.startswith("--") or option in HYDRA_LONG_OPTIONS:
        return option
    full = [o for o in HYDRA_LONG_OPTIONS if o.startswith(option)]
    return full[0] if len(full) == 1 else option


def _hydra_prints_only(argv: list[str]) -> bool:
    """Whether the command line asks Hydra to print something of its own instead of running the task: an
    option (``--cfg job``, ``-c hydra``, ``--info``, ``--help``, ...) that is no modifier, and no run mode."""
    options = [_hydra_option(a.partition("=")[0]) for a in argv if a.startswith("-") and a not in ("-", "--")]
    return any(o not in HYDRA_RUN_OPTIONS + HYDRA_MODIFIER_OPTIONS for o in options) and not any(
        o in HYDRA_RUN_OPTIONS for o in options
    )


def quiet_hydra_output(argv: list[str] | None = None) -> None:
    """When the command line only asks Hydra to print (``--cfg job``, ``--cfg hydra``, ``--cfg all``,
    ``--info ...``, ``--help``; ``argv``: default ``sys.argv[1:]``), make standard output a
    :class:`_ClosedStdoutGuard`: a closed pipe (``... --cfg job | head -1``) then ends the command quietly with
    exit status :data:`CLOSED_STDOUT_STATUS`, as everywhere else, although Hydra catches the exception of its
    print (or logging that of its ``--info`` page) before :func:`quiet_closed_stdout`'s hook could see it.  A
    command line that runs the task keeps its standard output as it is (the task's own output into a closed
    pipe is :func:`user_errors`' to end).  Idempotent; :func:`check_hydra_command` calls it."""
    if isinstance(sys.stdout, _ClosedStdoutGuard) or sys.stdout is None:
        return
    if _hydra_prints_only(sys.argv[1:] if argv is None else argv):
        sys.stdout = _ClosedStdoutGuard(sys.stdout)


def hydra_pages_log_once(argv: list[str] | None = None) -> None:
    """When the command line only asks Hydra to print (``--info ...``, ``--cfg``, ``--help``; ``argv``: default
    ``sys.argv[1:]``), take the console handlers off the root logger: Hydra's ``--info`` pages are log lines,
    for which Hydra *adds* a handler on stdout, so the one ``logging.basicConfig`` put there (the commands call
    it before Hydra starts) printed every line a second time, on stderr with a timestamp.  A command line that
    runs the task keeps them (Hydra replaces the root's handlers by its job logging's anyway)."""
    import logging

    if not _hydra_prints_only(sys.argv[1:] if argv is None else argv):
        return
    root = logging.getLogger()
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for handler in root.handlers[:]:
        stream = getattr(handler, "stream", None)
        if type(handler) is logging.StreamHandler and any(stream is c for c in consoles if c is not None):
            root.removeHandler(handler)


def _tell_torchrun(line: str) -> None:
    """Write ``line`` to torchrun's per-worker error file when there is one (torch elastic's JSON form with a
    plain-string message, which its summary prints as the worker's traceback)."""
    import os

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    from ._io import atomic_write_json

    try:
        atomic_write_json(path, {"message": line, "timestamp": int(time.time())}, indent=None)
    except OSError:  # the summary is a courtesy; the line on stderr is the message
        return


def _remove_hydra_only_run_dir() -> None:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # no Hydra (a core dependency, but removable): no Hydra run directory
        return
    if not HydraConfig.initialized():
        return
    import shutil
    from pathlib import Path

    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    if OmegaConf.is_missing(hc.runtime, "output_dir"):  # Hydra's --cfg/--info/--help: no run directory
        return
    out = Path(hc.runtime.output_dir)
    hydra_made = {name for name in (hc.output_subdir, f"{hc.job.name}.log") if name}
    try:
        entries = list(out.iterdir())
        if not entries or any(e.name not in hydra_made for e in entries):
            return
        for e in entries:
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
        out.rmdir()
        # the empty folders Hydra made above it (runs/<pkg>/...), up to the working directory, and, for a
        # directory given outside it (out_dir=/elsewhere/new/run), the ones check_dir_overrides found
        # missing before the command: a folder that was there stays, even empty
        cwd = Path.cwd().resolve()
        for parent in out.resolve().parents:
            made_here = cwd in parent.parents or parent in _NEW_DIRS
            if parent == cwd or not made_here or any(parent.iterdir()):
                break
            parent.rmdir()
    except OSError:  # gone already, or not ours to remove: the error message matters more
        return


#: Overrides whose value Hydra turns into its run directory (``hydra.run.dir: ${out_dir}``) and creates
#: before any of our code runs.
DIR_KEYS = ("out_dir", "run_dir", "hydra.run.dir")

#: The folders of this command's directory overrides that did not exist before it (noted by
#: :func:`check_dir_overrides`): Hydra makes them, and a user error's clean-up may remove them when empty.
_NEW_DIRS: set = set()


def check_dir_overrides(prog: str, argv: list[str] | None = None, keys: tuple[str, ...] = DIR_KEYS) -> None:
    """Stop a Hydra command whose ``out_dir=`` (or ``run_dir=``) override is, or lies below, an existing file,
    or would be made in (or is) a folder the user cannot write.

    Hydra creates the run directory before the task function runs, so that mistake would otherwise end in
    a ``FileExistsError`` / ``NotADirectoryError`` / ``PermissionError`` traceback from Hydra.  Call it just before the
    ``@hydra.main`` function; it prints the usual one-line error and exits with status 2.  It also notes the
    folders of each such path that do not exist yet, so that :func:`user_errors` removes those Hydra made
    (when empty) for a run directory outside the working directory, and none that was there before.
    """
    import os
    from pathlib import Path

    _NEW_DIRS.clear()  # this command's paths only
    args = sys.argv[1:] if argv is None else argv
    runs = not _hydra_prints_only(args)  # --cfg job, --help, ...: Hydra makes no run directory
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in keys or value.strip() in ("", "null", "None") or "${" in value:
            continue
        path = Path(value.strip().strip("'\"")).expanduser()
        top_missing = None  # the first folder Hydra would make
        for p in (path, *path.absolute().parents):
            if not p.exists():
                _NEW_DIRS.add(p.resolve())  # Hydra will make it
                top_missing = p
            else:
                if not p.is_dir():
                    where = "is a file" if p == path else f"lies below the file {p}"
                    print(
                        f"{prog}: error: InvalidInputError: {key}={value}: the path {where}; expected a "
                        "directory (or a path that does not exist yet)",
                        file=sys.stderr,
                    )
                    raise SystemExit(2)
                # a folder that cannot be made or written (no permission, a read-only file system) ended
                # in a PermissionError / OSError traceback from Hydra's mkdir or its log file.  Asked of the
                # folder that exists, without writing anything: torchrun's ranks check the same path at once
                problem = None
                if runs and not os.access(p, os.W_OK | os.X_OK):
                    problem = f"{p} is not writable" + (
                        f", so {top_missing} cannot be made" if top_missing else ""
                    )
                if problem:
                    print(
                        f"{prog}: error: InvalidInputError: {key}={value}: {problem}; expected a directory "
                        "this command can write",
                        file=sys.stderr,
                    )
                    raise SystemExit(2)
                break


def check_compile_override(prog: str, argv: list[str] | None = None, key: str = "compile") -> None:
    """Stop a Hydra command whose ``compile=`` override is not a value
    :func:`tttlab.core.torch.compile_kwargs` accepts (``false``, ``true`` or a ``torch.compile`` mode), with
    the usual one-line ``ConfigError`` and exit status 2, before Hydra creates the run directory (the
    schemas type ``compile`` as ``Any``, so Hydra itself no longer refuses ``compile=fast``).  The value is
    read with Hydra's own override parser; a malformed override is left to Hydra.  Call it just before the
    ``@hydra.main`` function, next to :func:`check_dir_overrides`."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a.lstrip("+~").partition("=")[0] == key]
    if not args:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .errors import ConfigError
    from .torch import compile_kwargs

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    for override in overrides:
        if override.is_delete():
            continue
        try:
            compile_kwargs(override.value(), key)
        except ConfigError as exc:
            print(f"{prog}: error: ConfigError: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def check_group_overrides(prog: str, conf: str, argv: list[str] | None = None) -> None:
    """Stop a Hydra command whose config-group override (``+experiment=...``, ``experiment=...``,
    ``engine=...``) names no YAML file of that group in the package's ``conf`` (``conf``: its import name,
    e.g. ``"tttlab.torch_ttt.conf"``), with the usual one-line ``ConfigError`` naming the key, the value
    and the choices (with a did-you-mean) and exit status 2, instead of Hydra's many-line "Could not find"
    report and exit status 1.  Keys that are not a folder of ``conf`` and values Hydra expands (lists,
    sweeps, interpolations, ``null``) are left to Hydra.  Call it just before the ``@hydra.main`` function,
    next to :func:`check_dir_overrides`."""
    import difflib
    import re
    from importlib.resources import files

    from .errors import ConfigError

    try:
        root = files(conf)
    except (ImportError, TypeError):  # no such package: nothing to check against
        return
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("~"):
            continue
        key, sep, value = arg.lstrip("+").partition("=")
        value = value.strip()
        if not sep or not key or key.startswith("hydra") or not re.fullmatch(r"[\w/]+", key):
            continue
        if value in ("", "null", "None") or not re.fullmatch(r"[\w./-]+", value):
            continue
        group = root.joinpath(*key.split("/"))
        if not group.is_dir():
            continue
        if group.joinpath(*f"{value.removesuffix('.yaml')}.yaml".split("/")).is_file():
            continue
        choices = sorted(e.name[: -len(".yaml")] for e in group.iterdir() if e.name.endswith(".yaml"))
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        exc = ConfigError(
            f"{key}={value!r}: no such {key} config{hint}; expected one of {', '.join(choices)}"
        )
        print(f"{prog}: error: ConfigError: {exc}", file=sys.stderr)
        raise SystemExit(2)


def check_config_overrides(prog: str, conf: str, config_name: str, argv: list[str] | None = None) -> None:
    """Compose the command's config (``config_name`` of the package ``conf``) with the command line's
    overrides, as its ``@hydra.main`` is about to: an override Hydra cannot apply (a misspelt key, a value
    of the wrong type for a typed key, a malformed value) stops the command with the usual one-line
    ``ConfigError`` naming the override and exit status 2, instead of Hydra's few-line report and exit
    status 1.  So is a run directory Hydra could not make from the composed config (a ``???`` value or a
    null that ``hydra.run.dir`` interpolates, a resolver's :class:`TTTLabError`: :func:`_check_run_dir_resolves`),
    which Hydra would report with a traceback, or make as a folder named ``None``.  Command lines with
    Hydra's own flags (``--multirun``, ``--cfg``, ``--help``, ...) are left to Hydra.  :func:`check_hydra_command` calls it after :func:`check_group_overrides`; the package's
    structured configs must be registered by then."""
    from .errors import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(conf, version_base=None):
            try:
                cfg = compose(config_name=config_name, overrides=args, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as exc:
                first = " ".join(str(exc).split())  # Hydra's lines (and its remedy: "use +key=...") as one
                cause = exc.__cause__
                why = " ".join(str(cause).split("\n")[0].split()) if cause is not None else ""
                hint = _closest_key(
                    first, args, lambda rest: compose(config_name=config_name, overrides=rest)
                ) or _plus_hint(first, args)
                exc = ConfigError(first + (f" ({why})" if why and why not in first else "") + hint)
                print(f"{prog}: error: ConfigError: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            _check_run_dir_resolves(prog, cfg)
    finally:
        GlobalHydra.instance().clear()


def _check_run_dir_resolves(prog: str, cfg) -> None:
    """Stop the command when the run directory Hydra is about to make (``hydra.run.dir`` of the composed
    ``cfg``) cannot be made from the config: a value it interpolates is missing (``run_dir: ???`` not given
    on the command line), a resolver of it refuses the config with a :class:`TTTLabError`, or a key it
    interpolates is null (``run_dir=null``: ``${run_dir}/eval`` would be the folder ``None/eval``).  Hydra
    resolves that directory before the task runs, so these would otherwise end in its traceback (or make a
    folder named ``None``).  Any other failure to resolve is left to Hydra."""
    import re

    from omegaconf import OmegaConf
    from omegaconf.errors import (
        InterpolationResolutionError,
        InterpolationToMissingValueError,
        MissingMandatoryValue,
    )

    from .errors import ConfigError

    if OmegaConf.select(cfg, "hydra.run", throw_on_missing=False) is None:
        return
    raw = OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir")
    where = f"the command's run directory (hydra.run.dir: {raw}) is made from it"
    null = [k for k in re.findall(r"\$\{([\w.]+)\}", str(raw))
            if OmegaConf.select(cfg, k, default=0, throw_on_missing=False) is None]  # fmt: skip
    exc: TTTLabError | None = None
    try:
        resolved = cfg.hydra.run.dir
    except (InterpolationToMissingValueError, MissingMandatoryValue) as err:
        found = re.search(r"Missing mandatory value: ?([\w.\[\]]*)", str(err))
        key = (found and found.group(1)) or "hydra.run.dir"
        exc = ConfigError(f"{key} is not set (the config has no default); {where}: give {key}=<value>")
    except InterpolationResolutionError as err:
        seen: BaseException | None = err
        while seen is not None and not isinstance(seen, TTTLabError):  # a resolver's own refusal
            seen = seen.__cause__ or seen.__context__
        if seen is not None:
            exc = seen
        elif null:  # Hydra types the directory as a string: ${out_dir} with out_dir=null fails to validate
            exc = ConfigError(f"{null[0]}=null, but {where}: give {null[0]}=<value>")
    else:
        if null and "None" in re.split(r"[/\\]", str(resolved)):  # the null became a folder
            exc = ConfigError(
                f"{null[0]}=null, but {where} and would be the folder {str(resolved)!r}: give {null[0]}=<value>"
            )
    if exc is not None:
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2)


def _closest_key(message: str, args: list[str], compose) -> str:
    """``"; did you mean 'a.b'?"`` for Hydra's "Could not override 'a.c'" when the config composed without
    that override has a key like it next to it; ``""`` otherwise."""
    import difflib
    import re

    from omegaconf import DictConfig, OmegaConf

    found = re.search(r"Could not override '([^']+)'", message)
    if not found or "No match in the defaults list" in message:  # a group to add: Hydra's remedy says it all
        return ""
    key = found.group(1)
    rest = [a for a in args if a.lstrip("+~").partition("=")[0] != key]
    try:
        cfg = compose(rest)
    except Exception:  # noqa: BLE001 - another bad override too: no hint
        return ""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""


def _plus_hint(message: str, args: list[str]) -> str:
    """Hydra's "Multiple values for experiment. To override a value use 'override experiment: x'" (or
    "experiment appears more than once in the final defaults list") for ``+experiment=x`` where the
    command's defaults list has an experiment already (mttt_jax's commands take ``experiment=x``, the
    others ``+experiment=x``): the remedy on the command line; ``""`` otherwise."""
    import re

    found = re.match(r"Multiple values for (\S+?)\.", message) or re.match(
        r"(\S+) appears more than once in the final defaults list", message
    )
    given = [a for a in args if found and a.startswith(f"+{found.group(1)}=")]
    if not given:
        return ""
    return f"; the command's defaults list has its {found.group(1)} already: give {given[0][1:]} (without the '+')"


def check_hydra_command(prog: str, conf: str, config_name: str, *, compile_key: bool = True) -> None:
    """Every check a Hydra command makes of its command line before its ``@hydra.main`` function runs,
    in order: a bad ``compile=`` value (``compile_key``: the config has that key), a config-group override
    naming no YAML, any other override Hydra cannot apply or a run directory it cannot make from the config
    (``run_dir: ???`` not given), an ``out_dir`` that is a file.  Each stops the
    command with one ``<prog>: error: ...`` line and exit status 2, before anything is written.  ``conf`` is
    the package's config package (``"tttlab.<pkg>.conf"``), ``config_name`` the ``@hydra.main`` one.  It
    also makes a closed standard output (Hydra's ``--help`` into ``| head``) end the command quietly
    (:func:`quiet_closed_stdout`), and so does Hydra's ``--cfg``/``--info`` output (:func:`quiet_hydra_output`);
    the ``--info`` pages print each line once (:func:`hydra_pages_log_once`)."""
    quiet_closed_stdout()
    quiet_hydra_output()
    hydra_pages_log_once()
    if compile_key:
        check_compile_override(prog)
    check_group_overrides(prog, conf)
    check_config_overrides(prog, conf, config_name)
    check_dir_overrides(prog)


__all__ = [
    "AGREEMENT_MEASURE",
    "CLOSED_STDOUT_STATUS",
    "DIR_KEYS",
    "check_compile_override",
    "check_config_overrides",
    "check_dir_overrides",
    "check_group_overrides",
    "check_hydra_command",
    "domain_table",
    "hydra_pages_log_once",
    "quiet_closed_stdout",
    "quiet_hydra_output",
    "user_errors",
]


#: The title's measure when a method's accuracy records say ``extra.labels == "agreement"``: a benchmark
#: without ground-truth labels (torch_ttt's photos stream) counts agreement with a reference prediction.
AGREEMENT_MEASURE = "top-1 agreement with the source model's clean prediction (no ground-truth labels) %"


def _last_config(records: list[dict]) -> list[dict]:
    """The trailing run of ``records`` with the last one's ``config_hash``: a run again with the same config
    replaces its records, one with another config (``TTTLAB_APPEND_TO_OTHER_CONFIG=1``) appends them."""
    k = len(records)
    while k > 0 and records[k - 1].get("config_hash") == records[-1].get("config_hash"):
        k -= 1
    return records[k:]


def _joined(values) -> str | None:
    """The distinct non-None values in order, joined by "/" (one config has one; None: none at all)."""
    seen = list(dict.fromkeys(str(v) for v in values if v is not None))
    return "/".join(seen) if seen else None


def domain_table(path, note: Callable[[dict], str | None] | None = None) -> list[str]:
    """What an evaluate command prints after its run: per method of the records file ``path``, a title line
    and one line per domain, accuracy in % and the adaptation + prediction cost in ms per image, the clean
    domain as ``clean`` (a test set of its own, e.g. ImageNet-A, by its dataset name when the method has
    several) and the mean over corruptions (``corruption="mean"``) last.

    Which records: per method, only those of its last config (the trailing run of records with the
    ``config_hash`` of the method's last record; a folder holds two configs only under
    ``TTTLAB_APPEND_TO_OTHER_CONFIG=1``), of those the latest per domain and metric (an evaluation run again
    in the same folder counts once); a torchrun rank's partial records (``extra.shard``) never.

    The title: method, the dataset(s) recorded, then in parentheses the setting (when recorded), ``reset X``
    when the accuracy records carry ``extra.reset`` and ``N step(s)`` when they carry ``step`` (the
    adaptation steps, as the evaluate records document them); the measure is "accuracy %", or
    :data:`AGREEMENT_MEASURE` when every accuracy record says ``extra.labels == "agreement"``.  ``note``:
    called with each row's accuracy record (the mean's too); a string it returns ends the row (torch_ttt:
    SAR's recoveries per domain)."""
    from .records import read_jsonl

    by_method: dict[str, list[dict]] = {}
    for r in read_jsonl(path):
        if (r.get("extra") or {}).get("shard") is not None:  # a torchrun rank's partial records
            continue
        by_method.setdefault(r["method"], []).append(r)
    lines: list[str] = []
    for method, records in by_method.items():
        recs = {(r["dataset"], r["corruption"], r["severity"], r["metric"]): r for r in _last_config(records)}
        acc = [r for r in recs.values() if r["metric"] == "accuracy"]
        if not acc:
            continue
        acc.sort(key=lambda r: r["corruption"] == "mean")  # the summary last, the domains in their order
        datasets = list(dict.fromkeys(str(r["dataset"]) for r in acc if r["dataset"] is not None))
        extras = [r.get("extra") or {} for r in acc]
        reset, steps = _joined(e.get("reset") for e in extras), _joined(r["step"] for r in acc)
        parts = [acc[0]["setting"], reset and f"reset {reset}", steps and f"{steps} step(s)"]
        how = ", ".join(h for h in parts if h)
        what = AGREEMENT_MEASURE if all(e.get("labels") == "agreement" for e in extras) else "accuracy %"
        on = f" on {', '.join(datasets)}" if datasets else ""
        lines.append(f"{method}{on}{f' ({how})' if how else ''}: {what}, ms/image")
        for r in acc:
            if r["corruption"] is None:
                name = str(r["dataset"]) if len(datasets) > 1 else "clean"
            elif r["severity"] is None or r["corruption"] == "mean":
                name = r["corruption"]
            else:
                name = f"{r['corruption']}-{r['severity']}"
            cost = recs.get((r["dataset"], r["corruption"], r["severity"], "s_per_image"))
            ms = f"  {1000 * cost['value']:8.3f}" if cost is not None else ""
            extra = note(r) if note is not None else None
            lines.append(f"  {name:24s} {100 * r['value']:5.1f}{ms}" + (f"  {extra}" if extra else ""))
    return lines or [f"no accuracy records in {path}"]
