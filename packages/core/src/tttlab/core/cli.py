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
from collections.abc import Callable, Iterator, Mapping

from .errors import TTTLabError


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run the body; a :class:`TTTLabError` ends the command with its message and exit status 2, Ctrl-C
    (``KeyboardInterrupt``) with ``<prog>: interrupted`` and exit status 130.

    Inside a Hydra task, a run directory that holds only what Hydra put there before the task ran (its
    ``.hydra`` folder and the job's ``<name>.log``) is removed first, with the empty folders above it up to
    the working directory: the commands check the user's paths and values before they write anything, so
    a typo leaves no half-made run behind; in a ``--multirun`` sweep, the job's folder, and the sweep's folder
    when it holds nothing but Hydra's ``multirun.yaml`` (its first job failed).  A directory with anything
    else in it (an earlier run's files, the user's own, an earlier job's) is left exactly as it is."""
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
        refuse(prog, exc)
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's status 130, not a traceback through torch's kernels (the files a
        # run wrote are complete, writes being atomic; the READMEs say what running it again does)
        _remove_hydra_only_run_dir()
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def refuse(prog: str, exc: BaseException, prefix: str = ""):
    """End the command ``prog`` with the one line every tttlab command prints for a user's mistake,
    ``<prog>: error: <Type>: <prefix><message>`` on stderr (and in torchrun's worker error file), and exit
    status 2: for the checks that run before Hydra starts, outside :func:`user_errors`."""
    line = f"{prog}: error: {type(exc).__name__}: {prefix}{exc}"
    print(line, file=sys.stderr)
    _tell_torchrun(line)
    raise SystemExit(2) from None


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


class _HydraParserStopped(Exception):
    """Hydra's argparse parser stopped on the command line: an error it reports with its usage, or
    ``--version``, which it prints."""


def _hydra_args(argv: list[str]):
    """Hydra's own reading of the command line ``argv``: the ``argparse.Namespace`` its ``@hydra.main`` gets
    from the parser of the installed hydra-core (a private function of Hydra's, the one ``hydra.main`` calls),
    so that an abbreviation (``--multi``), a value attached to a short option (``-cjob``, ``-pfoo``, ``-cn=x``)
    and short flags run together (``-mr``) read as Hydra reads them, on every Python version.  ``None`` when
    that parser stops (an error, which Hydra reports with its usage and exit status 2, or ``--version``; here
    nothing is printed), or when Hydra is not installed."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None
    parser = get_args_parser()

    def stop(*args, **kwargs):
        raise _HydraParserStopped

    # argparse reports an error with parser.error and ends --version with parser.exit, after printing with
    # parser._print_message: the instance's own attributes, so this parser only, print nothing and raise
    parser.error = parser.exit = parser._print_message = stop  # type: ignore[method-assign]
    try:
        return parser.parse_args(list(argv))
    except _HydraParserStopped:
        return None


#: Hydra's modes: a command does one of them (two at once are Hydra's ``ValueError`` traceback)
_HYDRA_MODES = ("run", "multirun", "cfg", "info", "shell_completion")


def _mode_flag(args, mode: str) -> str:
    """The option of Hydra's mode ``mode`` as a command line spells it out (with its value; ``--info`` alone
    is ``--info all``)."""
    value = getattr(args, mode)
    flag = "--" + mode.replace("_", "-")
    return f"{flag} {value}" if isinstance(value, str) and (mode, value) != ("info", "all") else flag


def _mode_does(args, mode: str) -> str:
    """What Hydra does with the mode ``mode`` alone."""
    if mode == "cfg":
        return {"job": "prints the job's config", "hydra": "prints Hydra's config"}.get(
            args.cfg, "prints the job's and Hydra's config"
        )
    if mode == "info":
        return "prints Hydra's info pages" if args.info == "all" else f"prints Hydra's {args.info} info"
    does = {"run": "runs the task", "multirun": "runs the sweep", "shell_completion": "shell completion"}
    return does[mode]


def _hydra_prints_only(argv: list[str]) -> bool:
    """Whether the command line asks Hydra to print something of its own instead of running the task
    (``--cfg job``, ``-c hydra``, ``--info``, ``--help``, ``--hydra-help``, ``-sc``, ``--version``, an option its
    parser refuses with its usage), as Hydra's own parser reads it (:func:`_hydra_args`)."""
    import importlib.util

    if importlib.util.find_spec("hydra") is None:  # no Hydra: no page of Hydra's
        return False
    args = _hydra_args(argv)
    if args is None:  # Hydra's parser prints its usage and error, or its version, and stops
        return True
    if args.help or args.hydra_help:  # Hydra's first question: the page, whatever else was given
        return True
    prints = args.cfg or args.info or args.shell_completion
    return bool(prints) and not (args.run or args.multirun)


def _as_override(key: str, value: str, conf: str | None = None, config_name: str | None = None) -> str:
    """The override a user meant by ``--key=value``: ``key=value``, or ``+key=value`` when ``key`` is a config
    group of the package ``conf`` (a folder of YAMLs: ``experiment``) that the command's primary config
    ``config_name`` does not choose in its defaults list (torch_ttt's train, ttt_mae's and memo_tpt's
    commands: Hydra adds such a group only with '+'; mttt_jax's commands have an experiment by default, and
    take ``experiment=x``).  Without ``conf``, or when the config does not compose, ``key=value``."""
    plain = f"{key}={value}"
    if not conf or not config_name:
        return plain
    try:
        from importlib.resources import files

        if not files(conf).joinpath(*key.split("/")).is_dir():
            return plain  # a key, not a group: Hydra's own message says the rest
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(conf, version_base=None):
                cfg = compose(config_name=config_name, return_hydra_config=True)
        finally:
            GlobalHydra.instance().clear()
        chosen = key in cfg.hydra.runtime.choices
    except Exception:  # noqa: BLE001 - no such config, no Hydra: the plain form
        return plain
    return plain if chosen else f"+{plain}"


def _not_an_option_of_hydras(argv: list[str], conf: str | None = None, config_name: str | None = None) -> str:
    """The message for the first ``--name[=value]`` of ``argv`` that names no option of Hydra's, not even
    abbreviated (``--seed=1``, ``--seed 1``: Hydra's parser prints its usage and "unrecognized arguments"):
    the override to give instead (:func:`_as_override`: ``+engine=x`` where the command's config needs the
    '+'); ``""`` when there is none."""
    from hydra._internal.utils import get_args_parser

    options = [s for a in get_args_parser()._actions for s in a.option_strings]
    for i, arg in enumerate(argv):
        if arg == "--":
            return ""
        name, sep, value = arg.partition("=")
        if not name.startswith("--") or len(name) < 3 or any(o.startswith(name) for o in options):
            continue
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            value, arg = argv[i + 1], f"{arg} {argv[i + 1]}"
        return (
            f"{arg}: no option of Hydra's; the command takes overrides key=value (no '--'): give "
            f"{_as_override(name[2:], value or '<value>', conf, config_name)}"
        )
    return ""


#: Hydra's two-letter short options that take a value, and their long forms
_TWO_LETTER_OPTIONS = {"-cn": "--config-name", "-cp": "--config-path", "-cd": "--config-dir"}


def _two_letter_option_with_its_value(argv: list[str]) -> str:
    """The message for ``-cnother`` (``-cpDIR``, ``-cdDIR``), which argparse reads as ``-c nother`` (``--cfg``,
    whose choices Hydra's usage then lists): what to write instead; ``""`` for none."""
    for arg in argv:
        short, value = arg[:3], arg[3:]
        if short in _TWO_LETTER_OPTIONS and value and not value.startswith("="):
            return (
                f"{arg}: Hydra's parser reads it as -c {arg[2:]} (--cfg, one letter); give {short} {value} or "
                f"{_TWO_LETTER_OPTIONS[short]}={value}"
            )
    return ""


def _not_an_override(argv: list[str], overrides: list[str]) -> str:
    """The message for the first of Hydra's ``overrides`` (the command line's words that are no option) that
    is no override (``key=value``, ``~key``): ``seed= 1`` (a space after '=': Hydra's lexer error names only
    ``1``), ``+experiment smoke``, ``seeds=[0, 1]`` unquoted, an option after ``--`` (``-- --cfg job``: it was
    "give --cfg=job"); ``""`` when there is none."""
    for word in overrides:
        # out_dir=~/runs: Hydra's lexer refused it with "LexerNoViableAltException: out_dir=~/runs"
        if _unexpanded_home(word):
            return _unexpanded_home(word)
        if "=" in word or word.startswith("~"):
            continue
        if word.startswith("-"):  # an option after '--', which makes every later word an override
            return (
                f"'{word}' after '--': every word after '--' is an override (key=value); give Hydra's options "
                "before it, or drop '--'"
            )
        i = argv.index(word) if word in argv else -1
        before = argv[i - 1] if i > 0 else ""
        after = argv[i + 1] if 0 <= i < len(argv) - 1 else ""
        if before.endswith("=") and before.count("=") == 1 and not before.startswith("-"):
            return f"'{before} {word}': a space after '='; give {before}{word} (one word, or quoted)"
        if "=" in before and not before.startswith("-"):  # seeds=[0, 1]: the shell made two words
            given = f"{before} {word}"
            return f"'{given}': a space inside a value; quote the override (\"{given}\") or drop the space"
        if after and "=" not in after and not after.startswith("-"):
            return f"'{word} {after}': an override is key=value; give {word}={after}"
        return f"'{word}': an override is key=value (or ~key, to delete one)"
    return ""


def _unexpanded_home(word: str) -> str:
    """The message for ``key=~...`` (zsh and sh leave a '~' after '=' unexpanded; bash expands it), else ``""``."""
    key, _, value = word.partition("=")
    if not value.startswith("~") or key.startswith("~"):
        return ""
    rest = value[1:]
    instead = f"{key}=$HOME{rest} or the full path" if rest[:1] in ("", "/") else "the full path"
    return (
        f"'{word}': the shell left '~' unexpanded (zsh and sh expand it only at the start of a word); give "
        f"{instead}"
    )


def dotlist_hydra_prefix(args: list[str]) -> str:
    """The message for the first ``key=value`` word written with Hydra's ``+`` / ``++`` / ``~`` for a command
    that reads a plain dotlist (no Hydra app: pilimit's and memo_tpt's evaluate), else ``""``: such a command
    took ``+logging.level=DEBUG`` as the key ``+logging`` ("unknown config key '+logging'").  Also the line of
    the Hydra commands for a '~' the shell left after '=' (``out_dir=~/runs``: the command made a folder named
    '~', and ``train_run=~`` read as null); a quoted one is for :func:`expand_quoted_home`."""
    for word in args:
        if _unexpanded_home(word):
            return _unexpanded_home(word)
        if word[:1] == "+" and "=" in word:
            return f"{word}: this command is no Hydra app and takes no '+': give {word.lstrip('+')}"
        if word[:1] == "~":
            key = word[1:].split("=", 1)[0]
            return f"{word}: this command is no Hydra app and deletes no key: leave {key} out for its default"
    return ""


def dotlist_config(args: list[str], not_key_value: str) -> dict:
    """The plain config of a command that reads ``key=value`` words (no Hydra app: pilimit's and memo_tpt's
    evaluate), parsed as OmegaConf's dotlist with its interpolations resolved.  A ConfigError for a word written
    with Hydra's ``+`` / ``++`` / ``~`` or a '~' the shell left after '=' (:func:`dotlist_hydra_prefix`), then for
    words without '=' (``arguments [...]: <not_key_value>``); a folder's '~' quoted for Hydra is the home folder
    (:func:`expand_quoted_home`), as the Hydra commands take it (it made a folder named '~')."""
    from omegaconf import OmegaConf

    from .errors import ConfigError

    if dotlist_hydra_prefix(args):
        raise ConfigError(dotlist_hydra_prefix(args))
    words = [a for a in args if "=" not in a]
    if words:
        raise ConfigError(f"arguments {words}: {not_key_value}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(expand_quoted_home(args)), resolve=True)


def check_hydra_flags(
    prog: str, argv: list[str] | None = None, conf: str | None = None, config_name: str | None = None
) -> None:
    """Stop a command line whose Hydra options Hydra's parser takes but Hydra then refuses with a
    ``ValueError`` traceback (exit status 1): two of its modes at once (``--cfg job -m``, ``--info -r``, ``-mr``:
    it runs, runs a sweep, prints a config, prints its info or does shell completion, one per command),
    ``--resolve`` without ``--cfg`` (or ``--help``), the print it changes, or ``--experimental-rerun`` of no
    file (``--experiment=x`` abbreviates it).  Also the slips a user makes for an override, which Hydra
    reports with its usage, a lexer's message or (under ``--help``) a traceback: ``--seed=1``, ``--seed 1``
    (no option of Hydra's), ``seed= 1``, ``+experiment smoke``, and ``-cnother`` (argparse reads a value
    attached to ``-cn`` as ``-c nother``).  One ``<prog>: error: ConfigError:`` line
    saying what to give instead, exit status 2: for ``--experiment=x`` the form the command's config takes
    (``conf``, ``config_name``: its config package and primary config; :func:`_as_override`).  Read with Hydra's own parser (:func:`_hydra_args`), in
    Hydra's order (``--help`` first: it prints its page whatever else was given).
    :func:`check_hydra_command` calls it first."""
    from pathlib import Path

    from .errors import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _hydra_args(argv)
    message = ""
    if args is not None:
        message = _not_an_override(argv, list(args.overrides))
    elif _hydra_args([]) is not None:  # Hydra's parser refuses the command line (it prints its usage)
        message = _not_an_option_of_hydras(argv, conf, config_name) or _two_letter_option_with_its_value(argv)
    if not message and args is not None and not args.help:
        if args.resolve and not args.cfg:
            message = (
                "--resolve without --cfg: it resolves the interpolations of the config that --cfg prints; give "
                "--cfg job --resolve (or --cfg all/hydra), or drop --resolve"
            )
        elif args.experimental_rerun is not None and not Path(args.experimental_rerun).is_file():
            value = args.experimental_rerun
            typed = [
                a
                for a in argv
                if a.startswith("--") and "--experimental-rerun".startswith(a.partition("=")[0])
            ]
            message = (
                f"--experimental-rerun {value}: no such file; expected the config.pickle of an earlier job"
            )
            if typed and typed[0].partition("=")[0] != "--experimental-rerun":
                name = typed[0].partition("=")[0]
                message = (
                    f"{name} is Hydra's --experimental-rerun (its options may be abbreviated), and {value} is "
                    f"no file; an override has no '--': give "
                    f"{_as_override(name[2:], value, conf, args.config_name or config_name)}"
                )
        elif not args.hydra_help:
            modes = [m for m in _HYDRA_MODES if getattr(args, m)]
            if len(modes) > 1:
                given = [_mode_flag(args, m) for m in modes]
                alone = " or ".join(f"{f} alone ({_mode_does(args, m)})" for f, m in zip(given, modes))
                message = f"{' and '.join(given)} together: Hydra does one of them per command; give {alone}"
    if message:
        refuse(prog, ConfigError(message))


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


def apply_log_level(cfg_or_level) -> None:
    """Make a command's ``logging.level`` (a level name, or a config mapping holding ``logging.level``) take
    effect, whoever configured the handlers: inside a Hydra task the root logger already has Hydra's job
    handlers, so ``logging.basicConfig(level=...)`` did nothing and ``logging.level=WARNING`` still printed
    INFO lines.  Sets the level of the root logger, never below INFO, and for ``DEBUG`` that of the ``tttlab``
    logger (every package's loggers are below it): ``DEBUG`` shows tttlab's debug lines, not every library's.
    Adds a handler only when the root has none (no line printed twice).  A missing or unknown name changes
    nothing (:func:`tttlab.core.config.validate` names a bad value).  Inside a Hydra task, a logger that
    Hydra's ``hydra.verbose`` put at DEBUG (``hydra.verbose=true``: the root; ``hydra.verbose=tttlab``, a list
    of names) keeps DEBUG: the default ``logging.level=INFO`` reset the root to INFO, and no debug line showed
    (:func:`_hydra_verbose_loggers`)."""
    import logging

    from .config import LOG_LEVELS

    level = cfg_or_level
    if level is not None and not isinstance(level, str):
        node = level.get("logging")
        level = node.get("level") if node is not None else None
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        return
    value = logging.getLevelName(level.upper())
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    verbose = _hydra_verbose_loggers()
    if "" not in verbose:  # hydra.verbose=true asked for the root's DEBUG: it stays
        root.setLevel(max(value, logging.INFO))
    # below INFO only tttlab's loggers go further; otherwise they follow the root (no level left behind)
    if "tttlab" not in verbose:
        logging.getLogger("tttlab").setLevel(value if value < logging.INFO else logging.NOTSET)


def _hydra_verbose_loggers() -> set[str]:
    """The names of the loggers that Hydra's ``hydra.verbose`` set to DEBUG for the running Hydra task
    (``""``: the root, for ``hydra.verbose=true`` or the name ``root``); empty outside a Hydra task."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return set()
    if not HydraConfig.initialized():
        return set()
    verbose = HydraConfig.get().get("verbose", False)
    if isinstance(verbose, bool) or verbose is None:
        return {""} if verbose else set()
    names = [verbose] if isinstance(verbose, str) else list(verbose)
    return {"" if str(n) == "root" else str(n) for n in names}


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

    from hydra.types import RunMode
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
        sweep = Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else None
        for parent in out.resolve().parents:
            made_here = cwd in parent.parents or parent in _NEW_DIRS
            if parent == sweep and [e.name for e in parent.iterdir()] == ["multirun.yaml"]:
                # a sweep whose first job failed: the folder holds only Hydra's record of the sweep
                (parent / "multirun.yaml").unlink()
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


def check_dir_overrides(
    prog: str,
    argv: list[str] | None = None,
    keys: tuple[str, ...] = DIR_KEYS,
    inputs: Mapping[str, str] | None = None,
) -> None:
    """Stop a Hydra command whose ``out_dir=`` (or ``run_dir=``) override is, or lies below, an existing file,
    or would be made in (or is) a folder the user cannot write or make a folder in (no permission, a
    read-only file system; ``/proc/x`` as root: access() says writable, mkdir fails).

    Hydra creates the run directory before the task function runs, so that mistake would otherwise end in
    a ``FileExistsError`` / ``NotADirectoryError`` / ``PermissionError`` traceback from Hydra.  Call it just before the
    ``@hydra.main`` function; it prints the usual one-line error and exits with status 2.  It also notes the
    folders of each such path that do not exist yet, so that :func:`user_errors` removes those Hydra made
    (when empty) for a run directory outside the working directory, and none that was there before.

    ``inputs``: the keys among ``keys`` that name a folder the command reads, which must exist (mttt_jax
    evaluate's ``run_dir``), each with what it is (``"the out_dir of a tttlab-mttt-train run"``): a file
    there is refused with that, not with an output folder's "(or a path that does not exist yet)".
    """
    import os
    from pathlib import Path

    from .errors import InvalidInputError

    _NEW_DIRS.clear()  # this command's paths only
    args = sys.argv[1:] if argv is None else argv
    runs = not _hydra_prints_only(args)  # --cfg job, --help, ...: Hydra makes no run directory
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in keys or value.strip() in ("", "null", "None") or "${" in value:
            continue
        # os.path's: a '~user' of no user stays (Path.expanduser raised RuntimeError), as Hydra will make it
        path = Path(os.path.expanduser(value.strip().strip("'\"")))
        top_missing = None  # the first folder Hydra would make
        for p in (path, *path.absolute().parents):
            if not p.exists():
                _NEW_DIRS.add(p.resolve())  # Hydra will make it
                top_missing = p
            else:
                if not p.is_dir():
                    where = "is a file" if p == path else f"lies below the file {p}"
                    expected = (
                        f"expected an existing run folder ({inputs[key]})"
                        if inputs and key in inputs
                        else "expected a directory (or a path that does not exist yet)"
                    )
                    refuse(prog, InvalidInputError(f"{key}={value}: the path {where}; {expected}"))
                # a folder that cannot be made or written (no permission, a read-only file system) ended
                # in a PermissionError / OSError traceback from Hydra's mkdir or its log file.  Asked of the
                # folder that exists; torchrun's ranks check the same path at once
                problem = None
                if runs and not os.access(p, os.W_OK | os.X_OK):
                    problem = f"{p} is not writable" + (
                        f", so {top_missing} cannot be made" if top_missing else ""
                    )
                elif runs:
                    # a folder that access() calls writable where no folder can be made (/proc, /sys: root
                    # may write there, but mkdir fails): one folder of this process's own name made and
                    # removed at once (unique, so the ranks of torchrun asking at once never meet)
                    problem = _cannot_make_folder_in(p, top_missing)
                if problem:
                    refuse(
                        prog,
                        InvalidInputError(
                            f"{key}={value}: {problem}; expected a directory this command can write"
                        ),
                    )
                break


def _cannot_make_folder_in(folder, top_missing) -> str | None:
    """Why no folder can be made in the existing ``folder`` (the reason, naming ``top_missing``, the first
    folder Hydra would make there, when there is one), or ``None`` when one can: a hidden folder of a unique
    name is made there and removed at once (a folder made but not removable, as in an append-only folder
    where Hydra's mkdir works too, is no reason to stop)."""
    import contextlib
    import os
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".tttlab-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"no folder can be made in {folder} ({reason})" + (
            f", so {top_missing} cannot be made" if top_missing else ""
        )
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


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

    from .errors import ConfigError, MissingDependencyError

    try:
        from .torch import compile_kwargs
    except MissingDependencyError:  # no torch: the command itself says so when it needs it
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    for override in overrides:
        if override.is_delete():
            continue
        try:
            # of a sweep (-m compile=false,true), each value; one Hydra expands later (glob, interval) is Hydra's
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # noqa: BLE001 - Hydra reports a sweep it cannot expand itself
            continue
        try:
            for value in values:
                compile_kwargs(value, key)
        except ConfigError as exc:
            refuse(prog, exc)


def check_group_overrides(prog: str, conf: str, argv: list[str] | None = None) -> None:
    """Stop a Hydra command whose config-group override (``+experiment=...``, ``experiment=...``,
    ``engine=...``) names no YAML file of that group in the package's ``conf`` (``conf``: its import name,
    e.g. ``"tttlab.torch_ttt.conf"``), with the usual one-line ``ConfigError`` naming the key, the value
    and the choices (with a did-you-mean) and exit status 2, instead of Hydra's many-line "Could not find"
    report and exit status 1.  Of a sweep (``-m engine=tent,bnn``) each value is checked.  Keys that are not
    a folder of ``conf`` and values Hydra expands (lists, other sweeps, interpolations, ``null``) are left to
    Hydra.  Call it just before the ``@hydra.main`` function,
    next to :func:`check_dir_overrides`."""
    import difflib
    import re
    from importlib.resources import files
    from pathlib import Path

    from .errors import ConfigError

    try:
        root = files(conf)
    except (ImportError, TypeError):  # no such package: nothing to check against
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = _hydra_args(argv)
    if flags is not None and flags.config_path:  # another primary config folder: Hydra's to search
        return
    # --config-dir adds a folder to Hydra's search path: a group option may be a YAML there (engine/mine.yaml)
    roots = [root] + ([Path(flags.config_dir).expanduser()] if flags is not None and flags.config_dir else [])
    for arg in argv:
        if arg.startswith("~"):
            continue
        key, sep, value = arg.lstrip("+").partition("=")
        value = value.strip()
        if not sep or not key or key.startswith("hydra") or not re.fullmatch(r"[\w/]+", key):
            continue
        if value in ("", "null", "None") or not re.fullmatch(r"[\w./-]+(,[\w./-]+)*", value):
            continue
        group = root.joinpath(*key.split("/"))
        if not group.is_dir():
            continue
        missing = [
            v
            for v in value.split(",")
            if not any(
                r.joinpath(*f"{key}/{v.removesuffix('.yaml')}.yaml".split("/")).is_file() for r in roots
            )
        ]
        if not missing:
            continue
        value = missing[0]  # of a sweep (-m engine=tent,bnn), the value that names no file
        folders = [r.joinpath(*key.split("/")) for r in roots]
        choices = sorted({e.name[: -len(".yaml")] for f in folders if f.is_dir() for e in f.iterdir()
                          if e.name.endswith(".yaml")})  # fmt: skip
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        exc = ConfigError(
            f"{key}={value!r}: no such {key} config{hint}; expected one of {', '.join(choices)}"
        )
        refuse(prog, exc)


def check_config_overrides(
    prog: str, conf: str, config_name: str, argv: list[str] | None = None, free_keys=None
) -> None:
    """Compose the command's config (``config_name`` of the package ``conf``) with the command line's
    overrides, as its ``@hydra.main`` is about to: an override Hydra cannot apply (a misspelt key, a value
    of the wrong type for a typed key, a malformed value) stops the command with the usual one-line
    ``ConfigError`` naming the override and exit status 2, instead of Hydra's few-line report and exit
    status 1.  So is a run directory Hydra could not make from the composed config (a ``???`` value or a
    null that ``hydra.run.dir`` interpolates, a resolver's :class:`TTTLabError`: :func:`_check_run_dir_resolves`),
    which Hydra would report with a traceback, or make as a folder named ``None``.  The command line is read
    with Hydra's own parser (:func:`_hydra_args`): under ``--multirun`` each job of the sweep is composed
    (:func:`_sweep_jobs`; a bad one named in the message; the configs of each distinct set of group overrides
    merged once, :func:`_reuse_group_composition`) before Hydra makes its sweep folder or runs the first
    job, ``--config-name`` picks the config; for Hydra's pages (``--cfg``, ``--info``, ``--help``, which make no
    run directory) only the overrides are checked; another config folder (``--config-path``,
    ``--config-dir``), ``--shell-completion`` and a command line Hydra's parser refuses are left to Hydra.
    A key the config lacks is named as unknown, with a did-you-mean, where Hydra's remedy ("To append to
    your config use +key=value") would only lead to the command's own refusal (:func:`_unknown_key`; which
    keys are free: ``free_keys``, as :func:`check_hydra_command` says), a list key given a scalar as one line
    with the list to give (:func:`_list_expected`).
    :func:`check_hydra_command` calls it after :func:`check_group_overrides`; the package's structured configs
    must be registered by then."""
    from .errors import ConfigError

    flags = _hydra_args(list(sys.argv[1:] if argv is None else argv))
    if flags is None or flags.experimental_rerun is not None or flags.shell_completion:
        return  # Hydra's parser refuses it (its usage), or no job: Hydra's business
    # a page of Hydra's composes the config too (a bad override: Hydra's traceback under --help and --info,
    # its few-line report under --cfg), but makes no run directory
    page = bool(flags.help or flags.hydra_help or flags.cfg or flags.info)
    args, config_name = list(flags.overrides), flags.config_name or config_name
    if not page:  # whichever config folder: the job's config has no hydra node
        _check_no_hydra_node_interpolation(prog, args)
    if flags.config_path or flags.config_dir:
        return  # another config than the package's: Hydra's business
    # Hydra's mode is also an override (hydra.mode=MULTIRUN runs the sweep as -m does)
    multirun = flags.multirun or any(a.lstrip("+").replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)
    import os

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .records import _append_allowed

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(conf, version_base=None):
            job, jobs, sweep = args, [args], ""
            reuse = contextlib.nullcontext()
            try:
                if multirun:
                    jobs = _sweep_jobs(args, GlobalHydra.instance().config_loader())
                    if len(jobs) > 1:  # jobs that differ in values: their groups' configs merged once
                        reuse = _reuse_group_composition()
                dirs: dict[str, list[str]] = {}  # each job's run directory: the first job with it
                with reuse:
                    for num, job in enumerate(jobs):
                        sweep = f"the sweep's job {' '.join(job)}: " if job != args else ""
                        cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
                        if page:
                            continue
                        where = _check_run_dir_resolves(prog, cfg, sweep, num if multirun else None)
                        if where is not None and dirs.setdefault(os.path.normpath(where), job) != job:
                            # two configs in one folder are what TTTLAB_APPEND_TO_OTHER_CONFIG=1 asks for
                            if not _append_allowed():
                                _shared_run_dir(prog, where, dirs[os.path.normpath(where)], job, cfg)
            except (HydraException, OmegaConfBaseException) as exc:
                first = " ".join(str(exc).split())  # Hydra's lines (and its remedy: "use +key=...") as one
                cause = exc.__cause__
                why = " ".join(str(cause).split("\n")[0].split()) if cause is not None else ""

                def composes(rest):
                    return compose(config_name=config_name, overrides=rest)

                other = (
                    _other_commands_option(first, job, composes, conf)
                    or _unknown_key(first, why, job, composes, free_keys)
                    or _list_expected(first, why, job, composes)
                )
                hint = _closest_key(first, job, composes, free_keys) or _plus_hint(first, job)
                exc = ConfigError(
                    sweep + (other or first + (f" ({why})" if why and why not in first else "") + hint)
                )
                refuse(prog, exc)
            except Exception:  # noqa: BLE001 - not a config error this check knows: Hydra reports it itself
                return
    finally:
        GlobalHydra.instance().clear()


def _check_no_hydra_node_interpolation(prog: str, args: list[str]) -> None:
    """Stop the command when an override of the job's config interpolates Hydra's node plainly
    (``out_dir='runs/x-${hydra.job.num}'``, ``${hydra.job.name}``, ``${hydra.runtime.choices.engine}``).
    Composed with Hydra's config it resolves, so the run directory is made; but Hydra takes its ``hydra`` node
    out of the config it hands the job, where the value then ends in OmegaConf's ``InterpolationKeyError``
    traceback.  Hydra's values are read with its resolver, ``${hydra:job.num}``, which the message names.
    Overrides of Hydra's own keys (``hydra.run.dir=${hydra.job.name}``) keep their node, and an escaped
    ``\\${...}`` is no interpolation: both pass."""
    import re

    from .errors import ConfigError

    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        key = key.strip()
        if not sep or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        found = re.search(r"(?<!\\)\$\{\s*hydra\.([^${}]*)\}", value)
        if found:
            exc = ConfigError(
                f"{arg}: {found.group(0)} reads Hydra's node, which the job's config does not have (Hydra "
                f"removes it before the job runs); write ${{hydra:{found.group(1).strip()}}} (Hydra's resolver) "
                "instead"
            )
            refuse(prog, exc)


@contextlib.contextmanager
def _reuse_group_composition() -> Iterator[None]:
    """Inside: Hydra's ``compose`` builds the defaults list and merges its configs once per distinct set of
    config-group overrides, and reuses them for every later call with the same set (a deep copy of the merged
    config, before any value override is applied).  Everything else is Hydra's own, per call: the overrides
    are parsed, a sweep in a job refused, each value override applied to the config with the struct flag
    set (a misspelt key, a value of the wrong type), the ``hydra`` node filled (``hydra.overrides.task``, the
    choices, ``hydra.job.override_dirname``).  Both reused steps are functions of the config name, the group
    overrides (and a ``hydra.searchpath`` override, which Hydra also applies as a value) and the config files
    alone: Hydra applies the value overrides only after the merge.  Used for the jobs of a ``--multirun`` sweep (:func:`check_config_overrides`),
    which differ in a few values: 0.12 s per job was two thirds those two steps.  With another Hydra whose
    private functions are not these, nothing is reused."""
    import copy

    try:
        from hydra._internal import config_loader_impl as impl
        from hydra._internal.defaults_list import DefaultsList
    except ImportError:
        yield
        return
    loader = impl.ConfigLoaderImpl
    create = getattr(impl, "create_defaults_list", None)
    merge = loader.__dict__.get("_compose_config_from_defaults_list")
    if create is None or merge is None:
        yield
        return
    lists: dict = {}  # (config name, flags, group overrides) -> DefaultsList
    merged: dict = {}  # id of a reused defaults list -> (that list, the merged config as it was)

    def create_once(repo, config_name, overrides_list, prepend_hydra, skip_missing):
        groups, values = [], []
        for o in overrides_list:
            if o.is_sweep_override():  # Hydra's to refuse, as it does without the reuse
                return create(repo, config_name, overrides_list, prepend_hydra, skip_missing)
            group = not isinstance(o.value(), dict) and repo.group_exists(o.key_or_group)
            if group or "hydra.searchpath" in o.key_or_group:  # what the defaults list depends on (Hydra's
                groups.append(o.input_line)  # Overrides: a group's value, not a dict; the repo's search path)
            if not group:  # Hydra applies it to the merged config, hydra.searchpath too (it was left out)
                values.append(o)
        key = (config_name, prepend_hydra, skip_missing, tuple(groups))
        if key not in lists:
            lists[key] = create(repo, config_name, overrides_list, prepend_hydra, skip_missing)
            return lists[key]
        first = lists[key]
        overrides = copy.copy(first.overrides)
        overrides.config_overrides = values
        return DefaultsList(defaults=first.defaults, defaults_tree=first.defaults_tree, config_overrides=values,
                            overrides=overrides)  # fmt: skip

    def merge_once(self, defaults, repo):
        if id(defaults) in merged:
            return copy.deepcopy(merged[id(defaults)][1])
        cfg = merge(self, defaults, repo)
        if any(defaults is first.defaults for first in lists.values()):
            merged[id(defaults)] = (defaults, copy.deepcopy(cfg))  # Hydra changes the one it gets
        return cfg

    impl.create_defaults_list = create_once
    loader._compose_config_from_defaults_list = merge_once
    try:
        yield
    finally:
        impl.create_defaults_list = create
        loader._compose_config_from_defaults_list = merge


#: At most this many jobs of a ``--multirun`` sweep are composed before Hydra starts (Hydra composes them all
#: again before it launches the first); a bigger sweep is checked on its first jobs
MAX_SWEEP_JOBS = 64


def _sweep_jobs(args: list[str], config_loader=None) -> list[list[str]]:
    """The overrides of each job of the ``--multirun`` sweep ``args`` (``seed=1,2 lr=0.1,0.2``: 4 jobs), as
    Hydra's basic sweeper splits them (the first :data:`MAX_SWEEP_JOBS`; ``config_loader``: the one that lists
    a group's options for ``glob(...)``); a sweep it cannot split (an interval sweep) raises Hydra's exception,
    and one of another sweeper (``hydra/sweeper=...``) is no job."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # the config loader lists a group's options for glob(...), as Hydra's sweeper gives it
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(args)
    if any(o.get_key_element().lstrip("+~").startswith("hydra/sweeper") for o in overrides):
        return []  # another sweeper: its own way of splitting
    [jobs] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    # the sweeper writes a value again with Hydra's escapes (runs/x-${seed} as runs/x-$\{seed\}), which reads
    # back the same: the command line's own words where they were no sweep, for the messages
    own = {f"{o.get_key_element()}={o.get_value_element_as_str()}": a
           for o, a in zip(overrides, args) if not o.is_sweep_override()}  # fmt: skip
    return [[own.get(o, o) for o in job] for job in jobs[:MAX_SWEEP_JOBS]]


def _check_run_dir_resolves(prog: str, cfg, sweep: str = "", job_num: int | None = None) -> str | None:
    """Stop the command when the run directory Hydra is about to make (``hydra.run.dir`` of the composed
    ``cfg``) cannot be made from the config: a value it interpolates is missing (``run_dir: ???`` not given
    on the command line), a resolver of it refuses the config with a :class:`TTTLabError`, or a key it
    interpolates (``${key}``, ``${oc.select:key,...}``) is null (``run_dir=null``: ``${run_dir}/eval`` would be
    the folder ``None/eval``) or the string ``None`` (``run_dir=None``: Hydra's null is ``null``, ``None`` is
    a string; the error names the key given so, not a null key next to it).  Hydra resolves that directory
    before the task runs, so these would otherwise end in its traceback (or make a folder named ``None``).
    A resolver that fails otherwise (``${oc.env:NAME}`` with ``NAME`` unset) stops it too, with the resolver's
    message; a resolver not registered yet is left to Hydra.  ``sweep``: the message's start (which job of a
    ``--multirun`` sweep; ``job_num``: its number, which Hydra's launcher gives the job, ``${hydra:job.num}``).
    The directory is resolved with Hydra's config set, as Hydra does (``${hydra:...}`` reads it).  Returns the directory when the config makes it from its own keys (``${out_dir}``:
    where the job writes, in a sweep too), else ``None``."""
    import re

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import (
        InterpolationResolutionError,
        InterpolationToMissingValueError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        UnsupportedInterpolationType,
    )

    from .errors import ConfigError

    if OmegaConf.select(cfg, "hydra.run", throw_on_missing=False) is None:
        return None
    raw = str(OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir"))
    where = f"the command's run directory (hydra.run.dir: {raw}) is made from it"
    keys = dict.fromkeys(re.findall(r"\$\{([\w.]+)\}", raw) + re.findall(r"oc\.select:([\w.]+)", raw))
    exc: TTTLabError | None = None
    resolved = None
    # resolved as Hydra resolves it, with its config set: ${hydra:job.num} (a sweep's) in out_dir is Hydra's
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    if job_num is not None:  # what Hydra's launcher sets on a sweep's job before it resolves its folders
        with read_write(cfg.hydra.job), open_dict(cfg.hydra.job):
            cfg.hydra.job.num = cfg.hydra.job.id = job_num
    hydra_config.set_config(cfg)
    try:
        values = {}
        for k in keys:
            try:
                values[k] = OmegaConf.select(cfg, k, default=0, throw_on_missing=False)
            except OmegaConfBaseException:  # the next step names what is wrong with it, or leaves it to Hydra
                values[k] = 0
        null = [k for k, v in values.items() if v is None]
        none = [k for k, v in values.items() if isinstance(v, str) and v.strip() == "None"]
        resolved = cfg.hydra.run.dir
    except (InterpolationToMissingValueError, MissingMandatoryValue) as err:
        found = re.search(r"Missing mandatory value: ?([\w.\[\]]*)", str(err))
        key = (found and found.group(1)) or "hydra.run.dir"
        if not key.startswith("hydra."):  # Hydra's own (hydra.runtime.output_dir) are Hydra's to fill
            exc = ConfigError(f"{key} is not set (the config has no default); {where}: give {key}=<value>")
    except InterpolationResolutionError as err:
        seen: BaseException | None = err
        while seen is not None and not isinstance(seen, TTTLabError):  # a resolver's own refusal
            seen = seen.__cause__ or seen.__context__
        if seen is not None:
            exc = seen
        elif null:  # Hydra types the directory as a string: ${out_dir} with out_dir=null fails to validate
            exc = ConfigError(f"{null[0]}=null, but {where}: give {null[0]}=<value>")
        elif not isinstance(err, UnsupportedInterpolationType):  # (a resolver not registered yet: Hydra's)
            # a resolver's own failure, e.g. ${oc.env:NAME} with NAME unset: its message, not Hydra's traceback
            why = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            exc = ConfigError(
                f"the command's run directory (hydra.run.dir: {raw}) cannot be resolved: {why}; give values that resolve"
            )
    else:
        folder = f"would be the folder {str(resolved)!r}"
        if "None" in re.split(r"[/\\]", str(resolved)):
            if none:  # the string the user typed (a folder named None: ./None)
                exc = ConfigError(
                    f"{none[0]}=None, but {where} and {folder}: on Hydra's command line None is the string "
                    f"'None' (null is null); give {none[0]}=<value>"
                )
            elif null:  # the null became a folder
                exc = ConfigError(f"{null[0]}=null, but {where} and {folder}: give {null[0]}=<value>")
    finally:
        hydra_config.cfg = before
    if exc is not None:
        refuse(prog, exc, sweep)
    own = any(not k.startswith("hydra.") for k in keys)  # not Hydra's outputs/<date>/<time>: the job's folder
    return None if resolved is None or not own else str(resolved)


def _shared_run_dir(prog: str, where: str, first: list[str], job: list[str], cfg) -> None:
    """Stop a ``--multirun`` sweep two of whose jobs (overrides ``first`` and ``job``) have the one run
    directory ``where`` (``-m seed=0,1`` where the folder does not name the seed): each command writes its
    records and checkpoints there, so the later job would resume from the earlier's checkpoint, replace its
    records or be refused after it ran.  The message names both jobs and how to give each its own folder."""
    from omegaconf import OmegaConf

    from .errors import ConfigError

    def values(j):
        return {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in j}

    a, b = values(first), values(job)
    # the keys the two jobs differ in that the config has (${seed} names a key, +experiment=x none)
    differ = [k for k in b if a.get(k) != b[k] and OmegaConf.select(cfg, k, default=a) is not a]
    key = "out_dir" if "out_dir" in cfg else "hydra.run.dir"
    example = f", e.g. '{key}={where}-${{{differ[0]}}}'" if differ else ""
    exc = ConfigError(
        f"the sweep's jobs {' '.join(first)} and {' '.join(job)} would both write into {where} (their run "
        f"directory): the later would resume from, overwrite or be refused by the earlier's run; give each job its own "
        f"{key}{example}"
    )
    refuse(prog, exc)


def _closest_key(message: str, args: list[str], compose, free_keys=()) -> str:
    """``"; did you mean 'a.b'?"`` for Hydra's "Could not override 'a.c'" when the config composed without
    that override has a key like it next to it; ``""`` otherwise, and for a key ``free_keys`` names as one
    the command takes (memo_tpt's ensemble ``steps``: not a misspelt ``temps``)."""
    import difflib
    import re

    from omegaconf import DictConfig, OmegaConf

    found = re.search(r"Could not override '([^']+)'", message)
    if not found or "No match in the defaults list" in message:  # a group to add: Hydra's remedy says it all
        return ""
    key = found.group(1)
    if key in (free_keys or ()):
        return ""
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


def _other_commands_option(message: str, args: list[str], compose, conf: str) -> str:
    """For Hydra's "In 'experiment/smoke_pretrain': ConfigKeyError raised while composing config: Key 'epochs'
    not in 'TTTConfig'" where the command line gave that group option (``+experiment=smoke_pretrain`` to
    ttt_mae's ttt command, ``+experiment=smoke`` to torch_ttt's evaluate): the message that it is another
    command's, with the options of that group that compose with the rest of the command line (``compose``:
    the command's config from a list of overrides); ``""`` otherwise."""
    import re
    from importlib.resources import files

    found = re.match(r"In '([\w/]+)/([\w.-]+)': ConfigKeyError raised while composing config: Key '([^']+)' "
                     r"not in '(\w+)'", message)  # fmt: skip
    if not found:
        return ""
    group, name, key, schema = found.groups()
    given = [a for a in args if a.lstrip("+").partition("=")[0] == group]
    if not given:  # an option of the defaults list, not of the command line
        return ""
    try:
        folder = files(conf).joinpath(*group.split("/"))
        options = sorted(e.name[: -len(".yaml")] for e in folder.iterdir() if e.name.endswith(".yaml"))
    except (ImportError, TypeError, OSError):
        return ""
    rest = [a for a in args if a not in given]
    plus = given[-1].partition("=")[0]
    takes = []
    for option in options:
        try:
            if option != name:
                compose([*rest, f"{plus}={option}"])
                takes.append(option)
        except Exception:  # noqa: BLE001 - another command's too, or another override in the way
            continue
    others = f"; this command takes {plus}=<{'|'.join(takes)}>" if takes else ""
    return (
        f"{given[-1]}: {group}/{name}.yaml sets {key}, which this command's config ({schema}) does not have: it "
        f"is another command's {group}{others}"
    )


def _is_free(key: str, free_keys) -> bool:
    """Whether the dotted ``key`` is one of ``free_keys`` (fnmatch patterns: ``"seed"``, ``"optax.*"``) or
    lies below one of them."""
    import fnmatch

    parts = key.split(".")
    return any(
        fnmatch.fnmatchcase(".".join(parts[:n]), p) for p in free_keys for n in range(1, len(parts) + 1)
    )


def _unknown_key(message: str, why: str, args: list[str], compose, free_keys=None) -> str:
    """For Hydra's "Could not override 'a.foo'. To append to your config use +a.foo=1": a key the command's
    config lacks, which the command's validation refuses in the ``+a.foo=1`` form too, so Hydra's remedy
    only led to a second refusal; the message that says so instead: ``"unknown config key 'a.foo'; did you
    mean 'a.bar'? (known keys in 'a': ...)"`` (:func:`tttlab.core.config.closest_key`: a close key next to it,
    or the one key anywhere with that last component, ``progress`` -> ``logging.progress``).  Which keys are
    closed: with ``free_keys=None``, those a schema node (a dataclass) lacks (Hydra's "Key 'foo' not in
    'ASection'"), while a free-form node (an engine's kwargs: "is not in struct") keeps Hydra's message, where
    ``+`` is the remedy; with ``free_keys`` (fnmatch patterns), every key of the config except those and the
    keys below them (:func:`check_hydra_command`).  ``""`` where Hydra's message stays, or where the rest of
    the command line does not compose (another bad override: Hydra's message)."""
    import re

    from omegaconf import OmegaConf

    from .config import closest_key

    found = re.search(r"Could not override '([^']+)'\. To append to your config use \+", message)
    if not found:
        return ""
    key = found.group(1)
    if free_keys is None and not re.search(r"Key '[^']+' not in '\w+'", why or message):
        return ""
    if free_keys is not None and _is_free(key, free_keys):
        return ""
    rest = [a for a in args if a.lstrip("+~").partition("=")[0] != key]
    try:
        cfg = OmegaConf.to_container(compose(rest), resolve=False)
    except Exception:  # noqa: BLE001 - another bad override too: Hydra's message
        return ""
    cfg.pop("hydra", None)
    added = set()  # the keys only '+' gives: a did-you-mean names them with their '+'
    for pattern in free_keys or ():  # a key the command takes that '+' adds (no wildcard): a known key
        head, _, name = pattern.rpartition(".")
        target = cfg
        for part in head.split(".") if head else ():
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict) and not any(c in pattern for c in "*?[") and name not in target:
            target[name] = None
            added.add(pattern)
    # the node the key goes into: the deepest one the config has (engin.name: the top, which lacks 'engin')
    parts, node, depth = key.split("."), cfg, 0
    while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), dict):
        node, depth = node[parts[depth]], depth + 1
    if parts[depth] in node:  # a value where the key wants a node (seed.x=1): Hydra's message
        return ""
    close = closest_key(cfg, key)
    # '+include_original=true', not 'include_original=true', which Hydra refuses ("To append ... use +")
    hint = f"; did you mean {('+' if close in added else '') + close!r}?" if close else ""
    parent = ".".join(parts[:depth])
    where = f" in {parent!r}" if parent else ""
    return f"unknown config key {key!r}{hint} (known keys{where}: {', '.join(map(str, node))})"


def _list_expected(message: str, why: str, args: list[str], compose) -> str:
    """For Hydra's "Error merging override benchmark.severities=7 (Invalid value assigned: int is not a
    ListConfig, list or tuple.)" (or "Cannot merge DictConfig with ListConfig", for a mapping given to a list
    key): the key holds a list, and the line says so with its value now and the list to give,
    ``benchmark.severities=[7]``; ``""`` for any other message, and for a mapping key given a list
    (``engine.kwargs=[1,2]``: Hydra says "Cannot merge DictConfig with ListConfig" there too)."""
    import re

    from omegaconf import ListConfig, OmegaConf

    found = re.match(r"Error merging override (\S+?)=(.*)$", message)
    if not found or not re.search(
        r"is not a ListConfig|Cannot merge DictConfig with ListConfig", why or message
    ):
        return ""
    key, value = found.group(1).lstrip("+~"), found.group(2)
    now, current = "", None
    try:
        current = OmegaConf.select(compose([a for a in args if a.lstrip("+~").partition("=")[0] != key]), key)
        if isinstance(current, ListConfig):
            now = f" (now [{','.join(map(str, OmegaConf.to_container(current, resolve=False)))}])"
    except Exception:  # noqa: BLE001 - another bad override too: the line without the value now
        pass
    # "Cannot merge DictConfig with ListConfig" is also a mapping given a list (engine.kwargs=[1,2]): no list
    # key, Hydra's message stays
    if not isinstance(current, ListConfig) and "is not a ListConfig" not in (why or message):
        return ""
    return f"{key}={value}: {key} is a list{now}; give a list, e.g. {key}=[{value}]"


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


def _is_path_key(key: str) -> bool:
    """A key whose value is a folder or file: ``out_dir``, ``run_dir``, ``hydra.run.dir``, ``cache_dir``,
    ``benchmark.root``, ``datasets_root``, ``tfds_path``, ``train_run``, ``python`` (compare's keys too)."""
    leaf = key.lstrip("+").rpartition(".")[2]
    return leaf in ("dir", "root", "path", "train_run", "python") or leaf.endswith(("_dir", "_root", "_path"))


def expand_quoted_home(args: list[str]) -> list[str]:
    """``args`` with each folder key's value quoted for Hydra that starts with ``~`` (``out_dir="~/runs"``,
    ``'~user/x'``) given as the home folder it names, in the same quotes, as tttlab-compare takes it: Hydra
    keeps the quoted ``~`` as it is, and the command made a folder named '~' in the working directory (an
    unquoted ``~`` the shell left is refused by :func:`_not_an_override`, saying ``$HOME``).  A ``~user`` of
    no user, or a home holding a quote or a backslash, stays as given."""
    import os
    import re

    out = []
    for word in args:
        key, sep, value = word.partition("=")
        quoted = (
            re.fullmatch(r"(['\"])(~[^'\"\\]*)\1", value.strip())
            if sep and key[:1] != "~" and _is_path_key(key)
            else None
        )
        if quoted:
            home = os.path.expanduser(quoted.group(2))
            if home != quoted.group(2) and not re.search(r"['\"\\]", home):
                word = f"{key}={quoted.group(1)}{home}{quoted.group(1)}"
        out.append(word)
    return out


def check_hydra_command(
    prog: str, conf: str, config_name: str, *, compile_key: bool = True, free_keys=None, input_dirs=None
) -> None:
    """Every check a Hydra command makes of its command line before its ``@hydra.main`` function runs,
    in order: Hydra options that Hydra would refuse with a traceback (:func:`check_hydra_flags`), a bad
    ``compile=`` value (``compile_key``: the config has that key), a config-group override naming no YAML,
    any other override Hydra cannot apply or a run directory it cannot make from the config (``run_dir: ???``
    not given), for each job of a ``--multirun`` sweep, an ``out_dir`` that is a file.  Each stops the
    command with one ``<prog>: error: ...`` line and exit status 2, before anything is written.  ``conf`` is
    the package's config package (``"tttlab.<pkg>.conf"``), ``config_name`` the ``@hydra.main`` one.  It
    also makes a closed standard output (Hydra's ``--help`` into ``| head``) end the command quietly
    (:func:`quiet_closed_stdout`), and so does Hydra's ``--cfg``/``--info`` output (:func:`quiet_hydra_output`);
    the ``--info`` pages print each line once (:func:`hydra_pages_log_once`).

    ``free_keys`` says where Hydra's own remedy for a key the config lacks ("To append to your config use
    +key=value") is right.  ``None`` (a config of dataclass schemas): Hydra's rule, a schema node is closed,
    a node of plain YAML or a ``dict`` field free.  A sequence of fnmatch patterns (a config of plain YAML
    whose command checks its keys itself, as mttt_jax's and memo_tpt's): every key the config lacks is
    unknown (one line with a did-you-mean and the node's keys, instead of the '+' that the command would
    refuse next) except the keys these patterns name and the keys below them: ``("optax.*",)`` (any
    keyword argument of the optimizer), ``("include_original",)`` (a key the command takes that its YAML
    leaves out).  ``input_dirs``: ``{key: what it is}`` for the folder keys the command reads, which must
    exist (:func:`check_dir_overrides`'s ``inputs``).  A folder key's value quoted for Hydra with a leading ``~``
    is first given as the home folder it names (:func:`expand_quoted_home`, in ``sys.argv``)."""
    sys.argv[1:] = expand_quoted_home(sys.argv[1:])
    quiet_closed_stdout()
    quiet_hydra_output()
    hydra_pages_log_once()
    check_hydra_flags(prog, conf=conf, config_name=config_name)
    if compile_key:
        check_compile_override(prog)
    check_group_overrides(prog, conf)
    check_config_overrides(prog, conf, config_name, free_keys=free_keys)
    check_dir_overrides(prog, inputs=input_dirs)


__all__ = [
    "AGREEMENT_MEASURE",
    "CLOSED_STDOUT_STATUS",
    "DIR_KEYS",
    "check_compile_override",
    "check_config_overrides",
    "check_dir_overrides",
    "check_group_overrides",
    "check_hydra_command",
    "check_hydra_flags",
    "domain_table",
    "dotlist_config",
    "dotlist_hydra_prefix",
    "expand_quoted_home",
    "hydra_pages_log_once",
    "quiet_closed_stdout",
    "quiet_hydra_output",
    "refuse",
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


def domain_table(
    path,
    note: Callable[[dict], str | None] | None = None,
    title_note: Callable[[list[dict]], str | None] | None = None,
) -> list[str]:
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
    SAR's recoveries per domain).  ``title_note``: called with the method's accuracy records (those of the
    table); a string it returns ends the title's parentheses (torch_ttt: the engine kwargs it ran with)."""
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
        parts = [acc[0]["setting"], reset and f"reset {reset}", steps and f"{steps} step(s)",
                 title_note(acc) if title_note is not None else None]  # fmt: skip
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
