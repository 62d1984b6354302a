import contextlib
import importlib.util
import os
import re
import sys

import pytest

from tttlab.core.cli import check_dir_overrides, user_errors
from tttlab.core.errors import ConfigError
from tttlab.core.testing import run_into_a_closed_pipe


def test_user_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exc, user_errors("tttlab-x"):
        raise ConfigError("lr=-1: expected >= 0")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tttlab-x: error: ConfigError: lr=-1: expected >= 0\n"


def test_user_error_goes_into_torchruns_error_file(tmp_path, monkeypatch, capsys):
    """Under torchrun the worker's error file carries the same line, and torch elastic's failure summary (its
    "Root Cause" block) prints it instead of "To enable traceback see ..."."""
    err_file = tmp_path / "attempt_0" / "0" / "error.json"
    err_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    with pytest.raises(SystemExit), user_errors("tttlab-x"):
        raise ConfigError("lr=-1: expected >= 0")
    line = "tttlab-x: error: ConfigError: lr=-1: expected >= 0"
    assert capsys.readouterr().err == line + "\n"
    import json

    data = json.loads(err_file.read_text())
    assert data["message"] == line and isinstance(data["timestamp"], int)
    errors = pytest.importorskip("torch.distributed.elastic.multiprocessing.errors")
    failure = errors.ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(err_file))
    summary = errors.ChildFailedError("tttlab-x", {0: failure}).format_msg()
    assert f"traceback : {line}" in summary and "To enable traceback" not in summary


def test_no_error_file_outside_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit), user_errors("tttlab-x"):
        raise ConfigError("bad")
    assert list(tmp_path.iterdir()) == []


def test_other_exceptions_keep_their_traceback(capsys):
    with pytest.raises(ZeroDivisionError), user_errors("tttlab-x"):
        1 / 0  # noqa: B018
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("arg", "where"),
    [("out_dir={file}", "is a file"), ("+out_dir={file}/run", "lies below the file"),
     ("run_dir={file}/a/b", "lies below the file"), ("hydra.run.dir={file}", "is a file")],
)  # fmt: skip
def test_a_run_directory_override_that_is_a_file_stops_before_hydra(tmp_path, capsys, arg, where):
    """Hydra creates ``out_dir`` before the task runs: a file there is our one-line error, not its
    FileExistsError / NotADirectoryError traceback."""
    (tmp_path / "f").write_text("x")
    argv = ["seed=1", arg.format(file=tmp_path / "f")]
    with pytest.raises(SystemExit) as exc:
        check_dir_overrides("tttlab-x", argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tttlab-x: error: InvalidInputError: ") and where in err and str(tmp_path / "f") in err
    )


def test_a_folder_the_command_reads_that_is_a_file_says_it_must_be_an_existing_run(tmp_path, capsys):
    """``inputs``: a key naming the run a command reads (mttt_jax evaluate's ``run_dir``) is refused with what
    it must be, not with an output folder's "(or a path that does not exist yet)", which ``out_dir`` keeps."""
    (tmp_path / "f").write_text("x")
    inputs = {"run_dir": "the out_dir of a training run"}
    for arg, where in (("run_dir={f}/a", "lies below the file {f}"), ("run_dir={f}", "is a file"),
                       ("out_dir={f}", "is a file")):  # fmt: skip
        arg, where = arg.format(f=tmp_path / "f"), where.format(f=tmp_path / "f")
        with pytest.raises(SystemExit):
            check_dir_overrides("tttlab-x", ["seed=1", arg], inputs=inputs)
        expected = (
            "expected a directory (or a path that does not exist yet)"
            if arg.startswith("out_dir")
            else "expected an existing run folder (the out_dir of a training run)"
        )
        assert (
            capsys.readouterr().err
            == f"tttlab-x: error: InvalidInputError: {arg}: the path {where}; {expected}\n"
        )


def test_a_run_directory_that_cannot_be_made_stops_before_hydra(tmp_path, capsys, monkeypatch):
    """``out_dir=`` in or below a folder the user cannot write (no permission, a read-only file system)
    ended in a PermissionError traceback from Hydra's mkdir, exit status 1; now the one-line error naming
    the folder, exit status 2, and nothing is written to find out."""
    import os

    (tmp_path / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("locked") else real(p, mode))
    for arg, problem in (
        (f"out_dir={tmp_path / 'locked'}", f"{tmp_path / 'locked'} is not writable; "),
        (
            f"run_dir={tmp_path / 'locked' / 'a' / 'b'}",
            f"is not writable, so {tmp_path / 'locked' / 'a'} cannot be made",
        ),
    ):
        with pytest.raises(SystemExit) as exc:
            check_dir_overrides("tttlab-x", ["seed=1", arg])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tttlab-x: error: InvalidInputError: {arg}: ") and problem in err
        assert err.endswith("expected a directory this command can write\n") and err.count("\n") == 1
    # Hydra's print options make no run directory: no error; a writable folder passes
    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'locked'}", "--cfg", "job"])
    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'new' / 'run'}"])
    assert [p.name for p in tmp_path.iterdir()] == ["locked"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_run_directory_where_no_folder_can_be_made_stops_before_hydra(tmp_path, capsys, monkeypatch):
    """``out_dir=/proc/x`` as root (access() says root may write /proc, but mkdir there fails) ended in
    Hydra's FileNotFoundError traceback from its mkdir, exit status 1; now the one-line error naming the
    folder, exit status 2.  A folder where one can be made passes, and the probe leaves nothing there."""
    monkeypatch.setattr(os, "access", lambda p, mode: True)  # root's answer, whoever runs the tests
    with pytest.raises(SystemExit) as exc:
        check_dir_overrides("tttlab-x", ["seed=1", "out_dir=/proc/tttlab-x/run"])
    assert exc.value.code == 2
    assert re.fullmatch(
        r"tttlab-x: error: InvalidInputError: out_dir=/proc/tttlab-x/run: no folder can be made in /proc \(.+\), "
        r"so /proc/tttlab-x cannot be made; expected a directory this command can write\n",
        capsys.readouterr().err,
    )
    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'new' / 'run'}"])
    check_dir_overrides("tttlab-x", ["out_dir=/proc/tttlab-x", "--cfg", "job"])  # Hydra's page: no folder
    assert list(tmp_path.iterdir()) == []

    # a folder made that cannot be removed (an append-only folder: chattr +a) is no refusal: Hydra's mkdir works
    # there (it said 'no folder can be made in ... (Operation not permitted)')
    def no_rmdir(path, *a, **kw):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(os, "rmdir", no_rmdir)
    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'append_only' / 'run'}"])


def test_run_directory_overrides_that_can_be_created_pass(tmp_path):
    (tmp_path / "d").mkdir()
    for arg in ("out_dir={d}", "out_dir={d}/new/run", "out_dir=null", "out_dir=runs/${{seed}}", "seed=3",
                "name={d}/f"):  # fmt: skip
        check_dir_overrides("tttlab-x", [arg.format(d=tmp_path / "d")])
    (tmp_path / "f").write_text("x")
    check_dir_overrides("tttlab-x", [f"name={tmp_path / 'f'}"])  # not a directory key


def test_a_bad_compile_override_stops_before_hydra_and_good_ones_pass(capsys):
    """``compile=fast`` is the one-line ConfigError (exit 2) before Hydra makes the run directory; the values
    core's ``compile_kwargs`` accepts, as Hydra parses them (``TRUE`` is a bool, quotes are dropped), pass."""
    pytest.importorskip("torch")
    pytest.importorskip("hydra")
    from tttlab.core.cli import check_compile_override

    for bad in ("compile=fast", "+compile=1", "++compile=yes"):
        with pytest.raises(SystemExit) as exc:
            check_compile_override("tttlab-x", ["seed=1", bad, "out_dir=x"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("tttlab-x: error: ConfigError: compile=") and "'reduce-overhead'" in err
    for good in ("compile=true", "compile=FALSE", "compile=null", "compile=reduce-overhead",
                 "+compile='max-autotune'", "~compile", "seed=1", "compile_other=fast"):  # fmt: skip
        check_compile_override("tttlab-x", [good])
    assert capsys.readouterr().err == ""


HYDRA_APP = """
import os
import hydra
from hydra.core.hydra_config import HydraConfig
from tttlab.core.cli import user_errors
from tttlab.core.errors import DatasetNotFoundError


@hydra.main(version_base=None, config_path=None)
def main(cfg):
    with user_errors("tttlab-x"):
        if cfg.fail:
            raise DatasetNotFoundError("data.root=/missing: no such folder; expected MNIST-C's layout")
        with open(os.path.join(HydraConfig.get().runtime.output_dir, "config.yaml"), "w") as f:
            f.write("ok")


main()
"""


@pytest.mark.parametrize("before", ["nothing", "an earlier run", "a user's file"])
@pytest.mark.parametrize("fail", [True, False])
def test_a_user_error_leaves_no_hydra_only_run_directory(tmp_path, before, fail):
    """Hydra makes the run directory (``.hydra/``, the job log) before the task runs; a user error in the
    task removes it when nothing else is there, and leaves any other directory (an earlier run, a user's
    file) and every successful run as they are."""
    import subprocess
    import sys

    pytest.importorskip("hydra")
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP)
    run = tmp_path / "runs" / "x" / "run"  # Hydra makes the parents too; cwd = tmp_path
    if before == "an earlier run":
        subprocess.run(
            [sys.executable, str(app), f"hydra.run.dir={run}", "+fail=0"], check=True, cwd=tmp_path
        )
        assert (run / "config.yaml").exists()
    elif before == "a user's file":
        run.mkdir(parents=True)
        (run / "notes.txt").write_text("mine")
    earlier = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else None
    res = subprocess.run([sys.executable, str(app), f"hydra.run.dir={run}", f"+fail={int(fail)}"],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    if not fail:
        assert res.returncode == 0, res.stderr
        assert (run / "config.yaml").exists() and (run / ".hydra").is_dir() and (run / "app.log").exists()
        return
    assert res.returncode == 2
    assert res.stderr.strip().endswith("tttlab-x: error: DatasetNotFoundError: data.root=/missing: no such "
                                       "folder; expected MNIST-C's layout")  # fmt: skip
    if before == "nothing":  # neither the run directory nor the empty folders Hydra made above it
        assert not (tmp_path / "runs").exists() and app.exists()
    else:  # nothing of the earlier run / the user's is touched (Hydra's own files of this run may be added)
        assert set(earlier) <= {p.relative_to(run) for p in run.rglob("*")}
        if before == "a user's file":
            assert (run / "notes.txt").read_text() == "mine"


HYDRA_APP_CHECKED = HYDRA_APP.replace(
    "\n\nmain()\n", "\n\ncheck_dir_overrides('tttlab-x')\nmain()\n"
).replace(
    "from tttlab.core.cli import user_errors", "from tttlab.core.cli import check_dir_overrides, user_errors"
)


@pytest.mark.parametrize("key", ["hydra.run.dir", "out_dir"])
def test_a_user_error_leaves_no_empty_folders_outside_the_working_directory(tmp_path, key):
    """``out_dir=/elsewhere/new/deeper/run`` (or mttt's ``run_dir=/abs/typo``, whose run directory Hydra makes as
    ``<run_dir>/eval``): Hydra makes the folders above the run directory too, outside the working
    directory; a user error removes the ones it made and leaves every folder that existed before the
    command, even empty, as it was."""
    import subprocess
    import sys

    pytest.importorskip("hydra")
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP_CHECKED)
    work = tmp_path / "work"  # cwd
    work.mkdir()
    (tmp_path / "elsewhere" / "mine").mkdir(parents=True)  # the user's empty folders: stay
    target = tmp_path / "elsewhere" / "mine" / "new" / "deeper"
    run = target / "run"
    # as the commands' configs: hydra.run.dir given, or ${out_dir} (mttt evaluate: ${run_dir}/eval)
    args = (
        [f"hydra.run.dir={run}"]
        if key == "hydra.run.dir"
        else [f"+out_dir={run}", "hydra.run.dir=${out_dir}"]
    )
    res = subprocess.run(
        [sys.executable, str(app), *args, "+fail=1"], capture_output=True, text=True, cwd=work
    )
    assert res.returncode == 2, res.stderr
    assert "tttlab-x: error: DatasetNotFoundError" in res.stderr
    assert (tmp_path / "elsewhere" / "mine").is_dir() and list(
        (tmp_path / "elsewhere" / "mine").iterdir()
    ) == []
    assert list(work.iterdir()) == []
    # a successful run there keeps everything
    res = subprocess.run(
        [sys.executable, str(app), *args, "+fail=0"], capture_output=True, text=True, cwd=work
    )
    assert res.returncode == 0, res.stderr
    assert (run / "config.yaml").exists()


def test_only_the_current_commands_missing_folders_may_be_removed(tmp_path):
    """What check_dir_overrides notes for the clean-up is the folders of *this* command's paths that do not
    exist yet; a second command in the same process (tests, a notebook) starts afresh, so a folder that an
    earlier command found missing but that exists now is never removed."""
    from tttlab.core import cli

    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'a' / 'b'}"])
    assert cli._NEW_DIRS == {(tmp_path / "a").resolve(), (tmp_path / "a" / "b").resolve()}
    (tmp_path / "a").mkdir()
    check_dir_overrides("tttlab-x", [f"out_dir={tmp_path / 'a' / 'c'}", "seed=1"])
    assert cli._NEW_DIRS == {(tmp_path / "a" / "c").resolve()}
    check_dir_overrides("tttlab-x", ["seed=1"])
    assert cli._NEW_DIRS == set()


def test_a_config_group_override_naming_no_file_stops_before_hydra(tmp_path, monkeypatch, capsys):
    """``+experiment=mnist_tutoral`` / ``engine=tnet``: one ConfigError line with the choices and a
    did-you-mean, exit status 2 (Hydra's own report is many lines and exit status 1); a good value, a plain
    key, a dotted key, a sweep or null pass through to Hydra."""
    from tttlab.core.cli import check_group_overrides

    conf = tmp_path / "fakepkg_cli" / "conf"
    for name in ("experiment/mnist_tutorial.yaml", "experiment/smoke.yaml", "engine/tent.yaml", "top.yaml"):
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text("{}\n")
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for arg, message in (
        ("+experiment=mnist_tutoral", "experiment='mnist_tutoral': no such experiment config (did you mean "
                                      "'mnist_tutorial'?); expected one of mnist_tutorial, smoke"),
        ("engine=tnet", "engine='tnet': no such engine config (did you mean 'tent'?); expected one of tent"),
        # a sweep's values (-m engine=tent,tnet): Hydra's many-line report, or its first jobs ran
        ("engine=tent,tnet", "engine='tnet': no such engine config (did you mean 'tent'?); expected one of tent"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            check_group_overrides("prog", "fakepkg_cli.conf", ["seed=1", arg])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"prog: error: ConfigError: {message}\n"
    fine = ["+experiment=smoke", "experiment=mnist_tutorial.yaml", "engine=tent", "seed=3", "engine.lr=0.1",
            "+experiment=smoke,mnist_tutorial", "engine=null", "~engine", "top=1", "nosuchgroup=x",
            "hydra/job_logging=none"]  # fmt: skip
    check_group_overrides("prog", "fakepkg_cli.conf", fine)
    check_group_overrides("prog", "no_such_package_xyz.conf", ["+experiment=x"])
    assert capsys.readouterr().err == ""


def test_domain_table_shows_each_domain_once_then_the_mean(tmp_path):
    """The table an evaluate command prints (pilimit's and memo_tpt's printed only the mean): per domain the
    accuracy in % and ms/image, a domain recorded twice (the run again in the same folder) once with its
    latest numbers, a torchrun rank's partial records left out, the clean domain named ``clean`` and the mean
    over corruptions last; a method with several test sets names each by its dataset."""
    from tttlab.core.cli import domain_table
    from tttlab.core.records import RecordWriter

    path = tmp_path / "records.jsonl"
    with RecordWriter(path, dict(method="pkg.m", dataset="mnist_c", setting="continual")) as w:
        w.write(corruption="fog", severity=5, metric="accuracy", value=0.1, n=4)
        w.write(corruption="fog", severity=5, metric="accuracy", value=0.9, n=4, extra={"shard": 1})
        # the run again in the same folder: the latest record wins
        w.write(corruption="fog", severity=5, metric="accuracy", value=0.25, n=4)
        w.write(corruption="fog", severity=5, metric="s_per_image", value=0.002, n=4)
        w.write(corruption=None, severity=None, metric="accuracy", value=1.0, n=4)
        w.write(corruption="mean", severity=5, metric="accuracy", value=0.25, n=4)
        w.write(corruption="snow", severity=5, metric="accuracy", value=0.5, n=4)  # a later run's domain
    with RecordWriter(path, dict(method="pkg.paper", setting="episodic")) as w:
        w.write(dataset="imagenet_a", metric="accuracy", value=0.5)
        w.write(dataset="imagenet_v2", metric="accuracy", value=0.625)
        w.write(dataset="imagenet_v2", metric="s_per_image", value=1.5)
    assert domain_table(path) == [
        "pkg.m on mnist_c (continual): accuracy %, ms/image",
        "  fog-5                     25.0     2.000",
        "  clean                    100.0",
        "  snow-5                    50.0",
        "  mean                      25.0",
        "pkg.paper on imagenet_a, imagenet_v2 (episodic): accuracy %, ms/image",
        "  imagenet_a                50.0",
        "  imagenet_v2               62.5  1500.000",
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert domain_table(empty) == [f"no accuracy records in {empty}"]


def test_domain_table_shows_each_methods_last_config_only(tmp_path):
    """A folder holds two configs only under ``TTTLAB_APPEND_TO_OTHER_CONFIG=1``: per method the table shows
    the records of its last config alone.  The old rule (the latest record per domain over every config)
    mixed the second config's fog with the first's snow and mean; torch_ttt's old one (the trailing run of
    the file's last config) dropped the other method, whose config is not the file's last."""
    from tttlab.core.cli import domain_table
    from tttlab.core.records import RecordWriter

    path = tmp_path / "records.jsonl"
    with RecordWriter(path, dict(method="pkg.m", dataset="mnist_c", setting="continual", severity=5)) as w:
        for corruption, value in (("fog", 0.5), ("snow", 0.25), ("mean", 0.375)):  # config a: 2 domains
            w.write(config_hash="a", corruption=corruption, metric="accuracy", value=value)
        w.write(config_hash="a", corruption="fog", metric="s_per_image", value=0.001)
        w.write(method="pkg.other", config_hash="c", corruption="fog", metric="accuracy", value=0.75)
        w.write(config_hash="b", corruption="fog", metric="accuracy", value=0.125)  # config b: fog only
        w.write(config_hash="b", corruption="fog", metric="accuracy", value=0.0625)  # b run again: latest
    assert domain_table(path) == [
        "pkg.m on mnist_c (continual): accuracy %, ms/image",
        "  fog-5                      6.2",
        "pkg.other on mnist_c (continual): accuracy %, ms/image",
        "  fog-5                     75.0",
    ]


def test_domain_table_title_names_reset_steps_and_agreement_and_rows_take_a_note(tmp_path):
    """torch_ttt's printout, now core's: the title names the reset policy (``extra.reset``) and the step
    count (``step``) when the records carry them, and agreement instead of accuracy when every accuracy
    record says ``extra.labels == "agreement"``; ``note`` ends a row with what it returns for its record,
    ``title_note`` a title with what it returns for the method's accuracy records."""
    from tttlab.core.cli import AGREEMENT_MEASURE, domain_table
    from tttlab.core.records import RecordWriter

    path = tmp_path / "records.jsonl"
    agree = {"reset": "per_batch", "labels": "agreement"}
    with RecordWriter(path, dict(dataset="photos_c", setting="episodic", severity=5, metric="accuracy")) as w:
        w.write(method="p.agree", step=1, corruption=None, severity=None, value=1.0, extra={**agree, "k": 3})
        w.write(method="p.agree", step=1, corruption="fog", value=0.5, extra={**agree, "k": 1})
        w.write(method="p.agree", step=1, corruption="fog", metric="s_per_image", value=0.25, extra=agree)
        w.write(method="p.agree", step=1, corruption="mean", value=0.5, extra=agree)
        # reset without a step; one of two records with ground-truth labels: accuracy; no dataset and no
        # setting: neither "on None" nor "(None)" (a TypeError before)
        reset = {"reset": "per_image"}
        w.write(method="p.reset", corruption="fog", value=0.5, extra={**reset, "labels": "agreement"})
        w.write(method="p.reset", corruption="snow", value=0.5, extra={**reset, "labels": "dataset"})
        w.write(method="p.bare", dataset=None, setting=None, corruption="fog", value=0.5)

    def note(r):
        return f"k={r['extra']['k']}" if "k" in (r["extra"] or {}) else None

    assert domain_table(path, note=note) == [
        f"p.agree on photos_c (episodic, reset per_batch, 1 step(s)): {AGREEMENT_MEASURE}, ms/image",
        "  clean                    100.0  k=3",
        "  fog-5                     50.0   250.000  k=1",
        "  mean                      50.0",
        "p.reset on photos_c (episodic, reset per_image): accuracy %, ms/image",
        "  fog-5                     50.0",
        "  snow-5                    50.0",
        "p.bare: accuracy %, ms/image",
        "  fog-5                     50.0",
    ]
    assert AGREEMENT_MEASURE.startswith("top-1 agreement with the source model's clean prediction")

    # title_note: with the method's accuracy records, its string ends the parentheses (opens them if none)
    def title_note(records):
        return None if records[0]["method"] == "p.agree" else f"{len(records)} rows"

    titled = domain_table(path, title_note=title_note)
    assert [titled[0], titled[4], titled[7]] == [
        f"p.agree on photos_c (episodic, reset per_batch, 1 step(s)): {AGREEMENT_MEASURE}, ms/image",
        "p.reset on photos_c (episodic, reset per_image, 2 rows): accuracy %, ms/image",
        "p.bare (1 rows): accuracy %, ms/image",
    ]


def _packages_with_and_without_an_experiment(tmp_path, monkeypatch, suffix):
    """Two config packages on the path, ``fakepkg_with_<suffix>.conf`` (its ``train`` chooses
    ``experiment: smoke`` in its defaults list, as mttt_jax's commands) and ``fakepkg_without_<suffix>.conf``
    (no experiment there, as the other packages' commands); each has ``experiment/smoke.yaml``."""
    for pkg, defaults in ((f"with_{suffix}", "defaults:\n  - _self_\n  - experiment: smoke\n"),
                          (f"without_{suffix}", "defaults:\n  - _self_\n")):  # fmt: skip
        conf = tmp_path / f"fakepkg_{pkg}" / "conf"
        (conf / "experiment").mkdir(parents=True)
        (conf / "experiment" / "smoke.yaml").write_text("# @package _global_\nexperiment_name: smoke\n")
        (conf / "train.yaml").write_text(defaults + "experiment_name: none\nseed: 0\n")
        (conf.parent / "__init__.py").write_text("")
        (conf / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_an_experiment_given_with_the_wrong_plus_gets_the_right_remedy(tmp_path, monkeypatch, capsys):
    """mttt_jax's commands take ``experiment=x`` (their defaults list has one), the others ``+experiment=x``.
    ``+experiment=smoke`` on the former was Hydra's "Multiple values for experiment. To override a value use
    'override experiment: smoke'" (a defaults-list line, not a command line): the line now says to give
    ``experiment=smoke`` without the '+'.  ``experiment=smoke`` on the latter kept Hydra's right remedy
    ("use +experiment=smoke") but added "did you mean 'experiment_name'?": no such guess now."""
    from tttlab.core.cli import check_config_overrides

    _packages_with_and_without_an_experiment(tmp_path, monkeypatch, "exp")
    with pytest.raises(SystemExit) as exit_info:
        check_config_overrides("prog", "fakepkg_with_exp.conf", "train", ["+experiment=smoke", "seed=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("prog: error: ConfigError: "), err
    assert err.endswith(
        "; the command's defaults list has its experiment already: give experiment=smoke (without the '+')\n"
    )
    with pytest.raises(SystemExit):
        check_config_overrides("prog", "fakepkg_without_exp.conf", "train", ["experiment=smoke"])
    err = capsys.readouterr().err
    assert "use +experiment=smoke" in err and "did you mean" not in err, err
    with pytest.raises(SystemExit):  # a misspelt plain key still gets its guess
        check_config_overrides("prog", "fakepkg_without_exp.conf", "train", ["sead=1"])
    assert "did you mean 'seed'?" in capsys.readouterr().err
    check_config_overrides("prog", "fakepkg_with_exp.conf", "train", ["experiment=smoke"])
    check_config_overrides("prog", "fakepkg_without_exp.conf", "train", ["+experiment=smoke"])
    assert capsys.readouterr().err == ""


def test_an_option_for_a_group_gets_the_form_the_commands_defaults_list_takes(tmp_path, monkeypatch, capsys):
    """``--experiment=smoke`` / ``--experiment smoke`` (Hydra's ``--experimental-rerun``, abbreviated) was
    refused with "give experiment=smoke" on every command, but a command whose defaults list has no
    experiment (torch_ttt's train, ttt_mae's, memo_tpt's) needs ``+experiment=smoke`` (Hydra: "Could not
    override 'experiment'").  The hint now reads the command's primary config; a plain key stays
    ``key=value``, and so does every hint without the command's config."""
    from tttlab.core.cli import check_hydra_command, check_hydra_flags

    _packages_with_and_without_an_experiment(tmp_path, monkeypatch, "exp2")  # new names: not imported yet

    def hint(argv, conf=None):
        with pytest.raises(SystemExit) as exit_info:
            if conf:  # as the command runs it
                monkeypatch.setattr("sys.argv", ["prog", *argv])
                check_hydra_command("prog", conf, "train", compile_key=False)
            else:
                check_hydra_flags("prog", argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        return err.rstrip("\n").rpartition(": give ")[2]

    for argv in (["--experiment=smoke"], ["--experiment", "smoke"]):
        assert hint(argv, "fakepkg_without_exp2.conf") == "+experiment=smoke"
        assert hint(argv, "fakepkg_with_exp2.conf") == "experiment=smoke"
        assert hint(argv) == "experiment=smoke"
    assert hint(["--seed=1"], "fakepkg_without_exp2.conf") == "seed=1"  # a key, not a group
    assert hint(["--experiment_name=x"], "fakepkg_without_exp2.conf") == "experiment_name=x"
    # the hint is right: Hydra composes it
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    for pkg, override in (("without_exp2", "+experiment=smoke"), ("with_exp2", "experiment=smoke")):
        GlobalHydra.instance().clear()
        with initialize_config_module(f"fakepkg_{pkg}.conf", version_base=None):
            assert compose("train", [override]).experiment_name == "smoke"
    GlobalHydra.instance().clear()


HYDRA_COMMAND = """
import hydra
from tttlab.core.cli import check_hydra_command

@hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
def _main(cfg):
    print("task ran")

check_hydra_command("tttlab-x", "tttlab.core.conf", "compare", compile_key=False)
_main()
"""


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]])
def test_hydra_help_into_a_closed_pipe_ends_quietly_with_status_141(tmp_path, args):
    """``<any Hydra command> --help | head -3`` ended in a BrokenPipeError traceback from Hydra's own print,
    before any of our code ran, and ``--cfg job | head -1`` in the traceback Hydra prints for the exception it
    catches (exit status 1): check_hydra_command makes both end with no output and exit status 141 (the other
    --cfg/--info pages: test_hydra_print_into_a_closed_pipe_ends_quietly, in process)."""
    pytest.importorskip("hydra")
    from tttlab.core.cli import CLOSED_STDOUT_STATUS

    script = tmp_path / "command.py"
    script.write_text(HYDRA_COMMAND)
    res = run_into_a_closed_pipe(str(script), *args)
    assert (res.returncode, res.stderr) == (CLOSED_STDOUT_STATUS, "") == (141, "")


class _ClosedPipe:
    """A standard output whose reader has gone: every write and flush raises ``BrokenPipeError``."""

    def __init__(self):
        self.writes = 0

    def write(self, text):
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


@pytest.fixture
def closed_stdout(monkeypatch):
    """A :class:`_ClosedPipe` for the test to make sys.stdout (in the test's body: pytest's capture sets its
    own at the start of each phase), which ``_stdout_closed`` reports closed, and ``_end_quietly`` (which
    would point fd 1 at the null device and ``os._exit``) raising ``SystemExit(141)`` instead; the root
    logger's handlers and level (Hydra's ``--info`` adds one on stdout) and HydraConfig are put back after."""
    pytest.importorskip("hydra")
    import logging

    from tttlab.core import cli

    pipe = _ClosedPipe()
    monkeypatch.setattr(cli, "_stdout_closed", lambda: True)

    def end_quietly():
        raise SystemExit(cli.CLOSED_STDOUT_STATUS)

    monkeypatch.setattr(cli, "_end_quietly", end_quietly)
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield pipe
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    "args", [["--cfg", "job"], ["--cfg", "hydra"], ["-c", "all"], ["--cfg=job", "--package", "overrides"],
             ["--info"], ["--info", "config"], ["-i", "defaults"]]
)  # fmt: skip
def test_hydra_print_into_a_closed_pipe_ends_quietly(closed_stdout, monkeypatch, capsys, args):
    """Hydra's own pages into a closed pipe (``--cfg job | head -1``; in process, stdout faked closed): the
    ``--cfg`` print's BrokenPipeError is caught by Hydra (a traceback on stderr, exit status 1) and the
    ``--info`` pages' by logging (a "Logging error" report per line, exit status 0), so the hook of
    quiet_closed_stdout never saw them; after check_hydra_command the first refused write ends the command
    with status 141 and nothing on stderr.  The task never runs."""
    import hydra

    from tttlab.core.cli import check_hydra_command

    ran = []

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def _main(cfg):
        ran.append(cfg)

    monkeypatch.setattr("sys.argv", ["tttlab-x", *args])
    monkeypatch.setattr("sys.stdout", closed_stdout)
    check_hydra_command("tttlab-x", "tttlab.core.conf", "compare", compile_key=False)
    with pytest.raises(SystemExit) as exit_info:
        _main()
    assert (exit_info.value.code, capsys.readouterr().err, ran) == (141, "", [])
    assert closed_stdout.writes == 1


@pytest.mark.parametrize(
    "argv, prints",
    [(["--cfg", "job"], True), (["-c", "hydra", "seed=1"], True), (["--info"], True), (["--help"], True),
     (["--hydra-help"], True), (["--cfg=job", "-cn", "other"], True), ([], False), (["seed=1", "out_dir=x"], False),
     (["-m", "seed=1,2"], False), (["--multirun", "seed=1,2"], False), (["--run", "seed=1"], False),
     (["--config-name", "other", "seed=1"], False), (["-cd", "/conf", "seed=1"], False),
     (["--multi", "seed=1,2"], False), (["--config-n", "other", "seed=1"], False), (["--cf", "job"], True),
     (["--in"], True), (["-pfoo", "seed=1"], False), (["-mp", "x"], False), (["-cn=other", "seed=1"], False),
     (["-cjob"], True), (["-iplugins"], True), (["-cnother"], True), (["--version"], True),
     (["--help", "-m"], True)],
)  # fmt: skip
def test_only_a_command_line_that_asks_hydra_to_print_guards_stdout(monkeypatch, argv, prints):
    """quiet_hydra_output wraps standard output only where Hydra prints and stops; a command line that runs
    the task keeps its stdout (its own output into a closed pipe is user_errors' to end, unwinding)."""
    import sys

    from tttlab.core import cli

    monkeypatch.setattr("sys.stdout", sys.stdout)  # put back after the test
    before = sys.stdout
    cli.quiet_hydra_output(argv)
    assert isinstance(sys.stdout, cli._ClosedStdoutGuard) is prints
    assert (sys.stdout is before) is not prints
    cli.quiet_hydra_output(argv)  # idempotent: one guard
    assert not isinstance(getattr(sys.stdout, "_stream", None), cli._ClosedStdoutGuard)


@pytest.mark.parametrize("where", ["inside", "after"])
def test_output_into_a_closed_pipe_inside_or_after_user_errors_ends_quietly(where):
    """A command's output (its result table) into a closed pipe: inside user_errors, and after it (the hook it
    installs), no traceback and exit status 141; Python's flush at exit raises nothing either."""
    body = 'print("row\\n" * 100_000)'
    code = "from tttlab.core.cli import user_errors\nwith user_errors('tttlab-x'):\n    "
    code += body if where == "inside" else "pass\n" + body
    res = run_into_a_closed_pipe("-c", code)
    assert (res.returncode, res.stderr) == (141, "")


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback():
    """Only a closed standard output is the reader leaving; a BrokenPipeError of another pipe (a child's, a
    socket) is a bug and keeps its traceback, stdout open or not."""
    code = "from tttlab.core.cli import user_errors\nwith user_errors('tttlab-x'):\n    raise BrokenPipeError(32, 'of a child')"
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "BrokenPipeError: [Errno 32] of a child" in res.stderr, res.stderr


def test_a_run_directory_the_config_cannot_make_stops_before_hydra(tmp_path, monkeypatch, capsys):
    """Hydra resolves ``hydra.run.dir`` before the task runs: ``run_dir: ???`` not given ended in Hydra's
    traceback ("Missing mandatory value: run_dir", exit status 1), ``run_dir=null`` made a folder named
    ``None/eval`` (``out_dir=null`` for ``${out_dir}``: Hydra's traceback, the directory being typed as a
    string), and a resolver's own TTTLabError came wrapped in Hydra's traceback too; ``run_dir=None`` (the
    string) made ``None/eval`` with no word, or blamed a null out_dir next to it.  Now each is one line
    naming the key given, exit status 2, before Hydra makes any folder, for each job of a ``--multirun``
    sweep too and for the config ``--config-name`` picks; a directory that resolves passes."""
    from omegaconf import OmegaConf

    from tttlab.core.cli import check_config_overrides
    from tttlab.core.errors import InvalidInputError

    conf = tmp_path / "fakepkg_rundir" / "conf"
    conf.mkdir(parents=True)
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    hydra_node = "hydra:\n  run:\n    dir: {}\n"
    (conf / "evaluate.yaml").write_text("run_dir: ???\nseed: 0\n" + hydra_node.format("${run_dir}/eval"))
    (conf / "train.yaml").write_text("out_dir: runs/x\n" + hydra_node.format("${out_dir}"))
    (conf / "picky.yaml").write_text("where: null\n" + hydra_node.format("${tttlab_test_picky:${where}}"))
    # mttt_jax evaluate's: out_dir, else <run_dir>/eval
    (conf / "select.yaml").write_text(
        "out_dir: null\nrun_dir: ???\n"
        + hydra_node.format("${tttlab_test_either:${out_dir},${oc.select:run_dir,null}}")
    )

    def picky(where):
        if where is None:
            raise InvalidInputError("where is not set; give where=<folder>")
        return str(where)

    OmegaConf.register_new_resolver("tttlab_test_picky", picky, replace=True)
    OmegaConf.register_new_resolver(
        "tttlab_test_either", lambda out, run: out or (run and f"{run}/eval") or "x", replace=True
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TTTLAB_TEST_UNSET_VAR", raising=False)
    for config, args, line in (
        ("evaluate", [], "ConfigError: run_dir is not set (the config has no default); the command's run "
                         "directory (hydra.run.dir: ${run_dir}/eval) is made from it: give run_dir=<value>"),
        ("evaluate", ["seed=1", "run_dir=null"], "ConfigError: run_dir=null, but the command's run directory "
         "(hydra.run.dir: ${run_dir}/eval) is made from it and would be the folder 'None/eval': give "
         "run_dir=<value>"),
        ("train", ["out_dir=null"], "ConfigError: out_dir=null, but the command's run directory (hydra.run.dir: "
         "${out_dir}) is made from it: give out_dir=<value>"),  # Hydra's InterpolationValidationError traceback
        ("picky", [], "InvalidInputError: where is not set; give where=<folder>"),
        # a resolver's own failure (an unset environment variable): Hydra's traceback, exit status 1
        ("train", ["out_dir=${oc.env:TTTLAB_TEST_UNSET_VAR}/x"], "ConfigError: the command's run directory "
         "(hydra.run.dir: ${out_dir}) cannot be resolved: KeyError raised while resolving interpolation: "
         "\"Environment variable 'TTTLAB_TEST_UNSET_VAR' not found\"; give values that resolve"),
        # Hydra's None is the string 'None': the folder None (it blamed out_dir=null, or said nothing at all)
        ("select", ["run_dir=None"], "ConfigError: run_dir=None, but the command's run directory (hydra.run.dir: "
         "${tttlab_test_either:${out_dir},${oc.select:run_dir,null}}) is made from it and would be the folder "
         "'None/eval': on Hydra's command line None is the string 'None' (null is null); give run_dir=<value>"),
        # under --multirun, each job of the sweep (it was left to Hydra: its traceback, or a folder None; without
        # -m, out_dir=None made and filled the folder None with no word)
        ("train", ["--multirun", "out_dir=a,None"], "ConfigError: the sweep's job out_dir=None: out_dir=None, but the "
         "command's run directory (hydra.run.dir: ${out_dir}) is made from it and would be the folder 'None': on "
         "Hydra's command line None is the string 'None' (null is null); give out_dir=<value>"),
        # two jobs of a sweep with one run directory: the later resumed from, overwrote or was refused by the
        # earlier's run (torch_ttt train -m seed=0,1: a CheckpointError after the first job trained)
        ("evaluate", ["-m", "run_dir=r", "seed=0,1"], "ConfigError: the sweep's jobs run_dir=r seed=0 and run_dir=r "
         "seed=1 would both write into r/eval (their run directory): the later would resume from, overwrite or be "
         "refused by the earlier's run; give each job its own hydra.run.dir, e.g. 'hydra.run.dir=r/eval-${seed}'"),
        ("train", ["-cn", "evaluate", "run_dir=null"], "ConfigError: run_dir=null, but the command's run directory "
         "(hydra.run.dir: ${run_dir}/eval) is made from it and would be the folder 'None/eval': give "
         "run_dir=<value>"),  # --config-name: that config's directory
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            check_config_overrides("prog", "fakepkg_rundir.conf", config, args)
        assert (exit_info.value.code, capsys.readouterr().err) == (2, f"prog: error: {line}\n")
    check_config_overrides("prog", "fakepkg_rundir.conf", "evaluate", ["run_dir=runs/x"])
    check_config_overrides("prog", "fakepkg_rundir.conf", "picky", ["where=runs/None_yet"])
    # a resolver the check does not know (registered by the command later): left to Hydra
    check_config_overrides(
        "prog", "fakepkg_rundir.conf", "train", ["out_dir=${tttlab_test_not_registered:x}"]
    )
    check_config_overrides("prog", "fakepkg_rundir.conf", "select", ["run_dir=runs/x", "out_dir=null"])
    check_config_overrides("prog", "fakepkg_rundir.conf", "train", ["--multirun", "out_dir=a,b"])
    check_config_overrides("prog", "fakepkg_rundir.conf", "evaluate", ["-m", "run_dir=r", "seed=0,1",
                                                                       "hydra.run.dir=r/eval-${seed}"])  # fmt: skip
    check_config_overrides(
        "prog", "fakepkg_rundir.conf", "evaluate", ["--cfg", "job"]
    )  # Hydra's page: its own
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakepkg_rundir"]  # nothing made


def test_hydra_info_pages_print_each_line_once(monkeypatch, capsys):
    """The commands call ``logging.basicConfig`` (a root handler on stderr) before Hydra, and Hydra's
    ``--info`` adds one on stdout for its page: every line came twice, the second on stderr with a timestamp.
    After check_hydra_command it is printed once, on stdout; the task never runs."""
    pytest.importorskip("hydra")
    import logging
    import sys

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from tttlab.core.cli import check_hydra_command

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # put back after
    monkeypatch.setattr("sys.stdout", sys.stdout)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])  # Hydra's stdout handler goes with it
    # (the root's level, DEBUG under --info, is put back by the conftest, with setLevel: see the next test)
    console = logging.StreamHandler(sys.stderr)  # what the commands' logging.basicConfig adds
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    root.addHandler(console)
    ran = []

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def _main(cfg):
        ran.append(cfg)

    monkeypatch.setattr("sys.argv", ["tttlab-x", "--info", "searchpath"])
    check_hydra_command("tttlab-x", "tttlab.core.conf", "compare", compile_key=False)
    _main()
    out, err = capsys.readouterr()
    assert out.count("Config search path") == 1 and "pkg://tttlab.core.conf" in out, out
    assert (err, ran) == ("", [])
    assert console not in root.handlers


def test_a_hydra_run_after_hydras_info_page_leaves_no_hydra_config(tmp_path, monkeypatch, capsys):
    """The leak CI met.  Hydra's ``--info`` puts the root logger at DEBUG, and Hydra's own logger, asked
    then, caches that DEBUG passes; the test above put the root's level back by assignment
    (``monkeypatch.setattr(root, "level", ...)``), which leaves that cache, so every later Hydra run in the
    process took Hydra's debug path (``_print_debug_info``), whose search-path page sets a HydraConfig without
    a run directory and keeps it: after core's test_cli, pilimit's test_commands_print_one_error_line found
    one (reproduced with the two files in one process).  hydra_state_kept, around every test, puts the
    level back with setLevel, which empties the cache."""
    pytest.importorskip("hydra")
    import logging

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from tttlab.core.testing import hydra_state_kept

    ran = []

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def _main(cfg):
        ran.append(cfg)

    root, hydras_log = logging.getLogger(), logging.getLogger("hydra._internal.hydra")
    before = HydraConfig.instance().cfg
    with hydra_state_kept():
        level = root.level
        monkeypatch.setattr("sys.argv", ["tttlab-x", "--info", "searchpath"])
        _main()
        assert hydras_log.isEnabledFor(logging.DEBUG)
        root.level = level  # what the monkeypatch above did
    capsys.readouterr()
    assert HydraConfig.instance().cfg is before and root.level == level
    monkeypatch.setattr("sys.argv", ["tttlab-x", "hydra/job_logging=none", "hydra/hydra_logging=none",
                                     f"hydra.run.dir={tmp_path}"])  # fmt: skip
    _main()
    assert len(ran) == 1 and not hydras_log.isEnabledFor(logging.DEBUG)
    assert HydraConfig.instance().cfg is before


def test_a_user_error_under_a_hydra_config_without_a_run_directory_is_one_line(monkeypatch, capsys):
    """Hydra's ``--cfg``/``--info``/``--help`` paths set HydraConfig without a run directory
    (``hydra.runtime.output_dir`` missing); user_errors looked there for a Hydra-only run directory to remove
    and raised omegaconf's MissingMandatoryValue instead of printing the user's error line."""
    pytest.importorskip("hydra")
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from tttlab.core.cli import user_errors
    from tttlab.core.errors import ConfigError

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # put back after
    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.mode = RunMode.RUN
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    assert HydraConfig.initialized() and OmegaConf.is_missing(HydraConfig.get().runtime, "output_dir")
    with pytest.raises(SystemExit) as exit_info, user_errors("tttlab-x"):
        raise ConfigError("lr=-1: expected a positive number")
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip() == "tttlab-x: error: ConfigError: lr=-1: expected a positive number"
    )


#: what the first test of the pair below saw before its command ran, for the second to compare
_BEFORE_A_LEAKING_COMMAND: dict = {}


def test_a_hydra_command_run_in_process_leaves_hydras_state_behind(monkeypatch, capsys):
    """First of a pair (the next test checks what is left after this one; pytest runs a file's tests in order,
    and pytest-xdist's --dist loadfile keeps a file on one worker).  A command run in the tests' process
    leaves Hydra's process-wide state behind: a run directory Hydra cannot resolve
    (``hydra.run.dir=${oc.env:<unset>}``, which the commands' pre-check now refuses first; Hydra run on
    its own, as here, still gets it), leaves the job's HydraConfig
    (without a run directory: Hydra sets it before resolving the folder and puts the old one back only after),
    and ``hydra.verbose=true`` the root logger at DEBUG.  A later test's ``user_errors`` then took itself to
    be inside a Hydra task: CI once failed so (pilimit's and torch_ttt's one-line error tests)."""
    pytest.importorskip("hydra")
    import logging

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    root = logging.getLogger()
    _BEFORE_A_LEAKING_COMMAND.update(
        hydra_config=HydraConfig.instance().cfg, root=(root.level, root.handlers[:])
    )
    monkeypatch.delenv("TTTLAB_TEST_UNSET", raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra raises its exception (else, by its traceback, exit 1)
    ran = []

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def _main(cfg):
        ran.append(cfg)

    # Hydra's logging configured in pytest's process closes the capture's streams (its dictConfig closes every
    # handler): its hydra.verbose alone sets the root logger's level
    argv = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.verbose=true"]
    monkeypatch.setattr("sys.argv", ["tttlab-x", *argv, "hydra.run.dir=${oc.env:TTTLAB_TEST_UNSET}"])
    with pytest.raises(Exception, match="TTTLAB_TEST_UNSET"):
        _main()
    capsys.readouterr()
    assert ran == []
    assert HydraConfig.initialized() and OmegaConf.is_missing(HydraConfig.get().runtime, "output_dir")
    assert root.level == logging.DEBUG != _BEFORE_A_LEAKING_COMMAND["root"][0]


def test_the_next_test_finds_hydras_state_as_it_was():
    """Second of the pair: the package conftest's autouse fixture (core.testing.hydra_state_kept) put back
    the HydraConfig and the root logger's handlers and level the first test's command changed."""
    if not _BEFORE_A_LEAKING_COMMAND:
        pytest.skip("runs after test_a_hydra_command_run_in_process_leaves_hydras_state_behind")
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    assert HydraConfig.instance().cfg is _BEFORE_A_LEAKING_COMMAND["hydra_config"]
    assert not GlobalHydra.instance().is_initialized()
    assert (root.level, root.handlers) == _BEFORE_A_LEAKING_COMMAND["root"]


def test_hydra_state_kept_puts_back_hydras_config_its_global_app_and_the_loggers():
    """What :func:`tttlab.core.testing.hydra_state_kept` puts back: HydraConfig, a GlobalHydra left initialised,
    the root's and existing loggers' level, handlers, propagate and disabled (``tttlab``'s too, made on entry
    if new: apply_log_level sets it); a logger made inside keeps what it was given."""
    pytest.importorskip("hydra")
    import logging

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from tttlab.core.testing import hydra_state_kept

    root, tttlab, hydra_log = logging.getLogger(), logging.getLogger("tttlab"), logging.getLogger("hydra")
    before = [(lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in (root, tttlab, hydra_log)]
    config, handler = HydraConfig.instance().cfg, logging.NullHandler()
    with hydra_state_kept():
        initialize_config_module("tttlab.core.conf", version_base=None).__enter__()  # never left
        HydraConfig.instance().set_config(compose("compare", return_hydra_config=True))
        root.setLevel(logging.DEBUG)
        root.handlers[:] = [handler]
        tttlab.setLevel(logging.DEBUG)
        hydra_log.propagate, hydra_log.disabled = False, True
        made_inside = logging.getLogger("tttlab_test_made_inside")
        made_inside.setLevel(logging.ERROR)
        assert GlobalHydra.instance().is_initialized() and HydraConfig.initialized()
        assert tttlab.isEnabledFor(logging.DEBUG)
    assert not GlobalHydra.instance().is_initialized() and HydraConfig.instance().cfg is config
    assert [(lg.level, lg.handlers, lg.propagate, lg.disabled) for lg in (root, tttlab, hydra_log)] == before
    assert not tttlab.isEnabledFor(logging.DEBUG)  # logging's cache of the levels enabled was emptied
    assert made_inside.level == logging.ERROR


def test_absl_handler_made_during_a_test_does_not_close_pytests_capture_in_a_later_one():
    """CI failed with 763 errors: absl's handler, made when a test imported ``absl.logging`` (stream: that
    test's ``sys.stderr``, pytest's capture file), closed that file when a later test with ``capsys`` ran
    Hydra, whose logging set-up (``dictConfig``) shuts every handler down; every later test of the worker
    failed "I/O operation on closed file".  Here the capture file is a StringIO given to the handler inside
    ``hydra_state_kept`` (as an import in a test would), and the later test's set-up is ``dictConfig`` under
    another ``sys.stderr``."""
    absl_logging = pytest.importorskip("absl.logging")
    import io
    import logging.config

    from tttlab.core.testing import hydra_state_kept

    handler = absl_logging.get_absl_handler().python_handler
    captured = io.StringIO()
    with hydra_state_kept():  # the earlier test
        handler.stream = captured
    with hydra_state_kept(), contextlib.redirect_stderr(io.StringIO()):  # the later one, capsys's stderr
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert not captured.closed
    assert handler.stream is sys.__stderr__


def test_a_log_handler_made_on_a_tests_stderr_does_not_turn_later_lines_into_logging_errors():
    """A library's ``logging.StreamHandler()`` made inside a test (huggingface_hub's, when a memo_tpt command
    loads open_clip) writes to that test's ``sys.stderr``, which ``capsys`` closes when the test ends; every
    later line of that library, in any later test, was a "--- Logging error --- ValueError: I/O operation on
    closed file" report in that test's stderr instead of the line.  Shuffled orders of the test files could
    put such a test before one that checks its stderr.  After ``hydra_state_kept`` the handler writes to
    the interpreter's standard error and a later line is no error."""
    import io
    import logging

    from tttlab.core.testing import hydra_state_kept

    captured = io.StringIO()  # the earlier test's capsys
    with hydra_state_kept():
        with contextlib.redirect_stderr(captured):
            library = logging.getLogger("tttlab_test_library_made_inside")
            handler = logging.StreamHandler()  # on this test's sys.stderr, as the library's own set-up
            library.addHandler(handler)
        captured.close()  # capsys ends before the autouse fixture does
    try:
        later = io.StringIO()
        with hydra_state_kept(), contextlib.redirect_stderr(later):
            library.warning("a line of the library")
        assert "Logging error" not in later.getvalue()
        assert handler.stream is sys.__stderr__
    finally:
        library.removeHandler(handler)


def test_torch_threads_a_command_sets_are_put_back():
    """``threads``/``num_threads`` (pilimit, memo_tpt, ttt_mae) make a command call ``torch.set_num_threads``,
    which lasts for the process: a test ending on a run with ``num_threads=2`` (ttt_mae's config tests run one,
    put back by that test's next run) would leave every later test of its worker on two threads (slower on
    the 2-core machine where the conftests chose one, and other float sums than the references its module
    fixtures computed on one thread)."""
    torch = pytest.importorskip("torch")

    from tttlab.core.testing import hydra_state_kept

    before = torch.get_num_threads()
    try:
        with hydra_state_kept():
            torch.set_num_threads(before + 1)  # what a command's threads=<n> does
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_the_excepthook_and_stdout_guard_of_a_command_are_put_back(monkeypatch):
    """Every command installs :func:`tttlab.core.cli.quiet_closed_stdout`'s ``sys.excepthook`` and, for a
    Hydra page (``--cfg job``), :func:`tttlab.core.cli.quiet_hydra_output` wraps ``sys.stdout``; both stayed
    for the rest of the process (pytest puts its own capture back, but under ``-s`` the next test's stdout was
    the guard).  After ``hydra_state_kept`` both are the ones the test started with."""
    import io

    from tttlab.core import cli
    from tttlab.core.testing import hydra_state_kept

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with hydra_state_kept():
            cli.quiet_closed_stdout()
            cli.quiet_hydra_output(["--cfg", "job"])
            assert isinstance(sys.stdout, cli._ClosedStdoutGuard) and sys.excepthook is not sys.__excepthook__
        assert sys.stdout is out
    assert sys.excepthook is sys.__excepthook__


HYDRA_ARGVS = [
    ["--cfg", "job"], ["-cjob"], ["--cfg=hydra", "-p", "x"], ["-pfoo", "seed=1"], ["-mp", "x"], ["-mr"],
    ["-mcjob"], ["--multi", "a=1,2"], ["--config-n", "other"], ["-cn=other"], ["-cn", "other"], ["-cdx"],
    ["-i"], ["-iplugins"], ["--in", "config"], ["-sc", "install=bash"], ["-hm"], ["--resolve"],
    ["seed=1", "--experimental-rerun", "x.pickle"], ["-cnother"], ["-cpDIR"], ["-ijob"], ["--cfg"],
    ["--con", "x"], ["--version"], ["--hel"], [],
]  # fmt: skip


def test_hydra_options_are_read_by_hydras_own_parser(capsys):
    """core.cli reads a command line's Hydra options with the parser of the installed hydra-core (a private
    function of Hydra's, the one hydra.main calls): the same namespace where it parses (abbreviations, values
    attached to short options: ``-pfoo`` is ``--package foo``, ``-cnother`` is ``--cfg nother``, flags run
    together: ``-mcjob`` is ``-m --cfg job``), None where it stops (an error, ``--version``), and in core's
    reading it neither prints nor exits."""
    pytest.importorskip("hydra")
    from hydra._internal.utils import get_args_parser

    from tttlab.core import cli

    stopped = []
    for argv in HYDRA_ARGVS:
        try:
            expected = vars(get_args_parser().parse_args(argv))
        except SystemExit:
            expected = None
            stopped.append(argv)
        capsys.readouterr()
        got = cli._hydra_args(argv)
        assert (vars(got) if got is not None else None) == expected, argv
        assert capsys.readouterr() == ("", ""), argv
    assert stopped == [
        ["-cdx"],
        ["-cnother"],
        ["-cpDIR"],
        ["-ijob"],
        ["--cfg"],
        ["--con", "x"],
        ["--version"],
    ]
    assert vars(cli._hydra_args(["-pfoo"]))["package"] == "foo"
    used = {"help", "hydra_help", "run", "multirun", "cfg", "info", "shell_completion", "resolve", "overrides",
            "config_name", "config_path", "config_dir", "experimental_rerun"}  # fmt: skip
    assert used <= set(vars(cli._hydra_args([])))  # the attributes core reads


@pytest.fixture
def hydra_app(tmp_path, monkeypatch):
    """Run ``check_hydra_command`` and a ``@hydra.main`` task on core's compare config with the command line
    ``args`` in the empty working directory ``tmp_path``; returns the task's configs (one per job run).
    Standard output, the root logger and HydraConfig are put back after."""
    pytest.importorskip("hydra")
    import logging
    import sys

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from tttlab.core.cli import check_hydra_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdout", sys.stdout)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])  # and its level: the conftest, with setLevel
    ran = []

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def _main(cfg):
        ran.append(cfg)

    def run(*args):
        monkeypatch.setattr("sys.argv", ["tttlab-x", *args])
        check_hydra_command("tttlab-x", "tttlab.core.conf", "compare", compile_key=False)
        _main()
        return ran

    return run


#: core's compare config (plain YAML)'s top-level keys, as the unknown-key line lists them
COMPARE_KEYS = (
    "methods, benchmark, root, setting, dirichlet_delta, stream_order, corruptions, severities, seeds, profile, "
    "num_examples, batch_size, jobs, threads, out_dir, cache_dir, device, timeout_s, progress, python, overrides, "
    "baselines, profiles"
)


@pytest.mark.parametrize(
    "arg, free_keys, line",
    [
        # a closed config (the command refuses the key after '+'): unknown, with the key meant and the node's
        ("sed=1", [], f"unknown config key 'sed'; did you mean 'seeds'? (known keys: {COMPARE_KEYS})"),
        # a bare leaf name: the one key anywhere with that last component
        ("pilimit=x", [], f"unknown config key 'pilimit'; did you mean 'baselines.pilimit'? (known keys: "
         f"{COMPARE_KEYS})"),
        # the free keys: below a pattern, and a key the command takes that its YAML leaves out, keep Hydra's
        # '+' (without a did-you-mean for a right key: python2 is no misspelt python); a key close to one is
        # named so
        ("overrides.foo=1", ["overrides.*", "python2"], "Could not override 'overrides.foo'. To append to your "
         "config use +overrides.foo=1 (Key 'foo' is not in struct)"),
        ("python2=1", ["overrides.*", "python2"], "Could not override 'python2'. To append to your config use "
         "+python2=1 (Key 'python2' is not in struct)"),
        # ... with its '+' where only '+' gives it (python2=1 is Hydra's refusal above)
        ("pythn2=1", ["overrides.*", "python2"], "unknown config key 'pythn2'; did you mean '+python2'? (known "
         f"keys: {COMPARE_KEYS}, python2)"),
        ("progres=1", ["overrides.*", "python2"], "unknown config key 'progres'; did you mean 'progress'? (known "
         f"keys: {COMPARE_KEYS}, python2)"),
    ],
)  # fmt: skip
def test_a_command_says_which_keys_are_free_and_gets_unknown_keys_named(capsys, arg, free_keys, line):
    """mttt_jax's and memo_tpt's configs are plain YAML, where Hydra calls every key free ("To append to
    your config use +foo=1"), and their commands refuse '+foo=1' next with their own check: the advice led
    to a second refusal.  ``free_keys`` tells core which keys '+' may add; any other key the config lacks is
    one line naming it, with the key meant (the bare leaf ``pilimit``: ``baselines.pilimit``).  Without
    ``free_keys``, Hydra's rule (a plain node is free) and its message stay:
    test_hydra_options_that_hydra_refuses_after_reading_them_are_one_line."""
    pytest.importorskip("hydra")
    from tttlab.core.cli import check_config_overrides

    with pytest.raises(SystemExit) as exc:
        check_config_overrides("tttlab-x", "tttlab.core.conf", "compare", [arg], free_keys=free_keys)
    assert (exc.value.code, capsys.readouterr().err) == (2, f"tttlab-x: error: ConfigError: {line}\n")


@pytest.mark.parametrize(
    "arg, line",
    [
        # a list key given a mapping: the list to give
        ("severities={a:1}", "severities={a:1}: severities is a list (now [5]); give a list, e.g. "
         "severities=[{a:1}]"),
        # a mapping given a list: Hydra's "Cannot merge DictConfig with ListConfig" too, but no list key (the
        # line said 'overrides is a list; give a list, e.g. overrides=[[1]]')
        ("overrides=[1]", "Error merging override overrides=[1] (Cannot merge DictConfig with ListConfig)"),
        ("baselines=[a]", "Error merging override baselines=[a] (Cannot merge DictConfig with ListConfig)"),
    ],
)  # fmt: skip
def test_only_a_list_key_is_named_a_list(capsys, arg, line):
    pytest.importorskip("hydra")
    from tttlab.core.cli import check_config_overrides

    with pytest.raises(SystemExit) as exc:
        check_config_overrides("tttlab-x", "tttlab.core.conf", "compare", [arg])
    assert (exc.value.code, capsys.readouterr().err) == (2, f"tttlab-x: error: ConfigError: {line}\n")


@pytest.mark.parametrize(
    "args, line",
    [(["--cfg", "job", "-m"], "--multirun and --cfg job together: Hydra does one of them per command; give "
      "--multirun alone (runs the sweep) or --cfg job alone (prints the job's config)"),
     (["--info", "-r", "seed=1"], "--run and --info together: Hydra does one of them per command; give --run "
      "alone (runs the task) or --info alone (prints Hydra's info pages)"),
     (["-mcjob"], "--multirun and --cfg job together: Hydra does one of them per command; give --multirun alone "
      "(runs the sweep) or --cfg job alone (prints the job's config)"),
     (["--multi", "--in", "plugins", "-c", "all"], "--multirun and --cfg all and --info plugins together: Hydra "
      "does one of them per command; give --multirun alone (runs the sweep) or --cfg all alone (prints the "
      "job's and Hydra's config) or --info plugins alone (prints Hydra's plugins info)"),
     (["--resolve", "seed=1"], "--resolve without --cfg: it resolves the interpolations of the config that --cfg "
      "prints; give --cfg job --resolve (or --cfg all/hydra), or drop --resolve"),
     (["--hydra-help", "--resolve"], "--resolve without --cfg: it resolves the interpolations of the config "
      "that --cfg prints; give --cfg job --resolve (or --cfg all/hydra), or drop --resolve"),
     # an override written as an option: Hydra's usage and "unrecognized arguments" (8 lines)
     (["--seed=1"], "--seed=1: no option of Hydra's; the command takes overrides key=value (no '--'): give seed=1"),
     (["--seed", "1"], "--seed 1: no option of Hydra's; the command takes overrides key=value (no '--'): give "
      "seed=1"),
     # --experiment abbreviates Hydra's --experimental-rerun: its ValueError traceback "File x does not exist!"
     (["--experiment=x"], "--experiment is Hydra's --experimental-rerun (its options may be abbreviated), and x "
      "is no file; an override has no '--': give experiment=x"),
     # a space after '=': Hydra's lexer said "LexerNoViableAltException: quick ^"
     (["profile=", "quick"], "'profile= quick': a space after '='; give profile=quick (one word, or quoted)"),
     (["+experiment", "smoke"], "'+experiment smoke': an override is key=value; give +experiment=smoke"),
     # an option after '--' is an override to argparse: the line said "give --cfg=job", Hydra's lexer error
     (["profile=quick", "--", "--cfg", "job"], "'--cfg' after '--': every word after '--' is an override "
      "(key=value); give Hydra's options before it, or drop '--'"),
     (["seeds=[0,", "1]"], "'seeds=[0, 1]': a space inside a value; quote the override (\"seeds=[0, 1]\") or drop "
      "the space"),
     # a '~' that zsh/sh left unexpanded after '=': Hydra's lexer said "LexerNoViableAltException: out_dir=~/runs"
     (["out_dir=~/runs"], "'out_dir=~/runs': the shell left '~' unexpanded (zsh and sh expand it only at the "
      "start of a word); give out_dir=$HOME/runs or the full path"),
     (["out_dir=~ann/runs"], "'out_dir=~ann/runs': the shell left '~' unexpanded (zsh and sh expand it only at the "
      "start of a word); give the full path"),
     # a value attached to -cn: argparse reads -c nother (--cfg), Hydra's usage said "invalid choice: 'nother'"
     (["-cnother"], "-cnother: Hydra's parser reads it as -c nother (--cfg, one letter); give -cn other or "
      "--config-name=other"),
     # a bad override under --help / --info: Hydra's traceback (59 lines); under --cfg its few-line report
     (["--help", "profile=quick", "sed=1"], "Could not override 'sed'. To append to your config use +sed=1 (Key "
      "'sed' is not in struct); did you mean 'seeds'?"),
     (["--info", "config", "sed=1"], "Could not override 'sed'. To append to your config use +sed=1 (Key 'sed' "
      "is not in struct); did you mean 'seeds'?")],
)  # fmt: skip
def test_hydra_options_that_hydra_refuses_after_reading_them_are_one_line(
    hydra_app, tmp_path, capsys, args, line
):
    """Two of Hydra's modes at once (``--cfg job -m``, ``--info -r``; flags run together, abbreviated) or
    ``--resolve`` without ``--cfg`` ended in Hydra's ValueError traceback ("Only one of --run, --multirun,
    --cfg, --info and --shell_completion can be specified", exit status 1): now one line saying what each
    option does alone, exit status 2, before Hydra starts; the task never runs and nothing is written.  So
    do an override written as an option, with a space after '=' or without '=', and a bad override under
    Hydra's pages, each with what to give instead (the comments: what Hydra printed)."""
    with pytest.raises(SystemExit) as exit_info:
        hydra_app(*args)
    assert (exit_info.value.code, capsys.readouterr().err) == (2, f"tttlab-x: error: ConfigError: {line}\n")
    assert list(tmp_path.iterdir()) == []


def test_hydras_help_wins_over_its_other_options(capsys):
    """Hydra answers --help first, whatever else was given (it prints the page): no error for that."""
    from tttlab.core.cli import check_hydra_flags

    for argv in (
        ["--help", "-m", "--cfg", "job"],
        ["-h", "--resolve"],
        ["--cfg", "job", "--resolve"],
        ["-m"],
    ):
        check_hydra_flags("tttlab-x", argv)
    assert capsys.readouterr().err == ""


def test_a_bad_override_in_a_sweep_stops_before_hydra_makes_its_sweep_folder(hydra_app, tmp_path, capsys):
    """``-m sed=1,2``: core's check of the overrides stepped aside for any option, so Hydra made
    ``multirun/<date>/<time>/multirun.yaml`` and printed its few-line report (exit status 1).  Each job of
    the sweep is now composed first: one line naming the job, with the guess, exit status 2, nothing made."""
    with pytest.raises(SystemExit) as exit_info:
        hydra_app("-m", "sed=1,2", "profile=quick")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(
        "tttlab-x: error: ConfigError: the sweep's job sed=1 profile=quick: Could not override 'sed'"
    )
    assert err.endswith("; did you mean 'seeds'?\n"), err
    assert list(tmp_path.iterdir()) == []


def test_another_commands_experiment_is_named_so(tmp_path, monkeypatch, capsys):
    """``tttlab-ttt-mae-ttt +experiment=smoke_pretrain`` (a pretrain experiment) was Hydra's "In
    'experiment/smoke_pretrain': ConfigKeyError raised while composing config: Key 'epochs' not in 'TTTConfig'
    full_key: epochs object_type=TTTConfig": now it says the experiment is another command's and which of the
    group's experiments this command takes (those that compose with the rest of the command line)."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore

    from tttlab.core.cli import check_config_overrides

    @dataclass
    class TTTConfig:
        seed: int = 0
        steps: int = 1

    ConfigStore.instance().store(name="tttlab_test_ttt_schema", node=TTTConfig)
    conf = tmp_path / "fakepkg_other_exp" / "conf"
    (conf / "experiment").mkdir(parents=True)
    for name, body in (
        ("smoke_ttt", "steps: 2"),
        ("paper_ttt", "steps: 20"),
        ("smoke_pretrain", "epochs: 1"),
    ):
        (conf / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n{body}\n")
    (conf / "ttt.yaml").write_text("defaults:\n  - tttlab_test_ttt_schema\n  - _self_\nseed: 0\n")
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        check_config_overrides(
            "prog", "fakepkg_other_exp.conf", "ttt", ["seed=1", "+experiment=smoke_pretrain"]
        )
    assert (exit_info.value.code, capsys.readouterr().err) == (
        2,
        "prog: error: ConfigError: +experiment=smoke_pretrain: experiment/smoke_pretrain.yaml sets epochs, which "
        "this command's config (TTTConfig) does not have: it is another command's experiment; this command takes "
        "+experiment=<paper_ttt|smoke_ttt>\n",
    )
    check_config_overrides("prog", "fakepkg_other_exp.conf", "ttt", ["+experiment=smoke_ttt"])
    assert capsys.readouterr().err == ""


def test_a_user_error_in_a_sweeps_first_job_leaves_no_sweep_folder(
    tmp_path, monkeypatch, fresh_package, capsys
):
    """``tttlab-mttt-evaluate -m run_dir=a,b`` (no such run): the first job's one-line error, but Hydra's
    ``multirun/<date>/<time>/multirun.yaml`` stayed behind; now nothing does.  A later job's error keeps the
    sweep folder (an earlier job's is in it)."""
    pytest.importorskip("hydra")
    import hydra
    from hydra.core.hydra_config import HydraConfig

    fresh_package("fakepkg_sweep")
    conf = tmp_path / "pkg" / "fakepkg_sweep" / "conf"  # a one-key config: Hydra composes it 5 times a sweep
    conf.mkdir(parents=True)
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    (conf / "app.yaml").write_text("profile: full\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    ran = []

    @hydra.main(config_path="pkg://fakepkg_sweep.conf", config_name="app", version_base=None)
    def _main(cfg):
        with user_errors("tttlab-x"):
            ran.append(cfg.profile)
            if cfg.profile == fail:
                raise ConfigError(f"profile={cfg.profile}: no such run")

    for fail, left in (("quick", []), ("smoke", ["multirun"])):
        argv = ["tttlab-x", "-m", "profile=quick,smoke", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            _main()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"tttlab-x: error: ConfigError: profile={fail}: no such run\n"
        assert sorted(p.name for p in (tmp_path / "work").iterdir()) == left
    assert ran == ["quick", "quick", "smoke"]


def _forget_package(name: str) -> None:
    for module in [m for m in sys.modules if m.split(".")[0] == name]:
        del sys.modules[module]


@pytest.fixture
def fresh_package():
    """``fresh_package(name)``: the test makes a package ``name`` in its own ``tmp_path``; an earlier test's
    (another folder) is forgotten now and this test's when it ends.  Monkeypatch only puts back the modules
    that existed on entry, so a test's ``fakepkg_sweep`` stayed imported and Hydra looked for the next test's
    config in the old folder: test_a_user_error_in_a_sweeps_first_job_leaves_no_sweep_folder failed ("Cannot
    find primary config 'app'") when it ran after a ``sweep_package`` test (a shuffled order)."""
    names = []

    def fresh(name: str) -> None:
        names.append(name)
        _forget_package(name)

    yield fresh
    for name in names:
        _forget_package(name)


@pytest.fixture
def sweep_package(tmp_path, monkeypatch, fresh_package):
    """A package ``fakepkg_sweep.conf`` with a config ``run`` (run directory ``${out_dir}``, an ``engine``
    group of two options, a ``compile`` key) and a user's config folder ``user_conf`` with a third engine."""
    conf = tmp_path / "fakepkg_sweep" / "conf"
    (conf / "engine").mkdir(parents=True)
    (conf.parent / "__init__.py").write_text("")
    (conf / "__init__.py").write_text("")
    for name in ("tent", "bn"):
        (conf / "engine" / f"{name}.yaml").write_text(f"name: {name}\n")
    (conf / "run.yaml").write_text(
        "defaults:\n  - engine: tent\n  - _self_\nseed: 0\ncompile: false\n"
        "out_dir: runs/${engine.name}\nhydra:\n  run:\n    dir: ${out_dir}\n"
    )
    (tmp_path / "user_conf" / "engine").mkdir(parents=True)
    (tmp_path / "user_conf" / "engine" / "mine.yaml").write_text("name: mine\n")
    fresh_package("fakepkg_sweep")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TTTLAB_APPEND_TO_OTHER_CONFIG", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "argv",
    [["-m", "engine=glob(*)"],  # Hydra lists the group's options ("ConfigLoader is not set" before)
     ["-m", "engine=glob(t*)", "seed=0,1", "out_dir=runs/${engine.name}-${seed}"],
     # Hydra's launcher gives each job its number; Hydra's config is set as the folders resolve
     ["-m", "seed=0,1", "out_dir=runs/${hydra:job.num}"],
     ["-m", "seed=0,1", "out_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}"],
     ["out_dir=runs/${hydra:job.name}"],  # a run's ${hydra:...} too ("HydraConfig was not set" before)
     ["out_dir=runs/${hydra:runtime.choices.engine}"],
     # Hydra's own keys keep Hydra's node (the plain ${hydra.job.name} is right there), an escaped one is text
     ["hydra.run.dir=outputs/${hydra.job.name}"],
     ["-m", "seed=0,1", "out_dir=runs/${seed}", "hydra.sweep.subdir=${hydra.job.num}"],
     ["out_dir=runs/\\${hydra.job.num}"],
     # a sweep value of a group option in the --config-dir folder (engine='mine': no such engine config)
     ["-m", "-cd", "user_conf", "engine=tent,mine", "out_dir=runs/${engine.name}"],
     ["--config-dir=user_conf", "engine=mine"],
     ["-m", "compile=false,true", "out_dir=runs/c-${compile}"],  # each value a good one (a ChoiceSweep before)
     ["hydra.sweeper.params.seed=0"],
     # Hydra's mode as an override runs the sweep as -m does ("Ambiguous value for argument 'seed=0,1'")
     ["hydra.mode=MULTIRUN", "seed=0,1", "out_dir=runs/${seed}"]],  # Hydra's own AssertionError, left to Hydra (a traceback of the check's)
)  # fmt: skip
def test_valid_hydra_command_lines_pass_the_checks(sweep_package, capsys, argv):
    """Valid command lines Hydra runs (checked by running them through a package's command) were refused
    with one line before Hydra started: a ``glob(...)`` sweep, a run directory made with Hydra's resolver
    (``${hydra:job.num}``, ``${hydra:sweep.subdir}``), a group option of the ``--config-dir`` folder, a
    ``compile`` sweep.  They pass now, and Hydra's config is left as it was."""
    from hydra.core.hydra_config import HydraConfig

    from tttlab.core.cli import check_compile_override, check_config_overrides, check_group_overrides

    before = HydraConfig.instance().cfg
    check_compile_override("prog", argv)
    check_group_overrides("prog", "fakepkg_sweep.conf", argv)
    check_config_overrides("prog", "fakepkg_sweep.conf", "run", argv)
    assert capsys.readouterr().err == ""
    assert HydraConfig.instance().cfg is before  # no state left for the next in-process command
    assert sorted(p.name for p in sweep_package.iterdir()) == ["fakepkg_sweep", "user_conf"]  # nothing made


@pytest.mark.parametrize(
    ("argv", "plain", "right"),
    [(["out_dir='runs/x-${hydra.job.num}'"], "${hydra.job.num}", "${hydra:job.num}"),
     (["-m", "seed=0,1", "out_dir=runs/x-${hydra.job.num}"], "${hydra.job.num}", "${hydra:job.num}"),
     (["-m", "engine=tent,bn", "out_dir=runs/${hydra.runtime.choices.engine}"],
      "${hydra.runtime.choices.engine}", "${hydra:runtime.choices.engine}"),
     (["-cd", "user_conf", "+name=${hydra.job.name}"], "${hydra.job.name}", "${hydra:job.name}")],
)  # fmt: skip
def test_a_plain_interpolation_of_hydras_node_is_one_line(sweep_package, capsys, argv, plain, right):
    """``out_dir='runs/x-${hydra.job.num}'`` (a run or a ``-m`` sweep) composes with Hydra's config, so the
    checks passed it and Hydra made the run directory; the job's own config has no ``hydra`` node, so the job
    then ended in OmegaConf's InterpolationKeyError traceback.  It is one line naming the override and
    Hydra's resolver form now, before Hydra starts (nothing made)."""
    from tttlab.core.cli import check_config_overrides

    with pytest.raises(SystemExit) as exit_info:
        check_config_overrides("prog", "fakepkg_sweep.conf", "run", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prog: error: ConfigError: {argv[-1]}: {plain} reads Hydra's node")
    assert f"write {right} (Hydra's resolver)" in err and err.count("\n") == 1
    assert sorted(p.name for p in sweep_package.iterdir()) == ["fakepkg_sweep", "user_conf"]  # nothing made
    # the job's config indeed cannot resolve it (what Hydra hands the job: its config without the hydra node)
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    job = OmegaConf.create({"out_dir": f"runs/{plain}"})
    with pytest.raises(InterpolationKeyError):
        _ = job.out_dir


def test_a_sweep_into_one_folder_passes_when_asked_to_append(sweep_package, monkeypatch, capsys):
    """``-m seed=0,1`` into one run directory is refused (the later job would resume from, overwrite or be
    refused by the earlier's run), except under ``TTTLAB_APPEND_TO_OTHER_CONFIG=1``, which asks for two
    configs' records in one folder (the evaluates append, each record naming its config): it was refused
    there too.  A bad value in a sweep of group options or of ``compile`` is still one line."""
    from tttlab.core.cli import check_compile_override, check_config_overrides, check_group_overrides

    argv = ["-m", "seed=0,1"]
    with pytest.raises(SystemExit) as exit_info:
        check_config_overrides("prog", "fakepkg_sweep.conf", "run", argv)
    assert exit_info.value.code == 2
    assert "the sweep's jobs seed=0 and seed=1 would both write into runs/tent" in capsys.readouterr().err
    monkeypatch.setenv("TTTLAB_APPEND_TO_OTHER_CONFIG", "1")
    check_config_overrides("prog", "fakepkg_sweep.conf", "run", argv)
    assert capsys.readouterr().err == ""
    for check, args, message in (
        (check_group_overrides, ["-m", "-cd", "user_conf", "engine=tent,mien"],
         "engine='mien': no such engine config (did you mean 'mine'?); expected one of bn, mine, tent"),
        (check_compile_override, ["-m", "compile=false,fast"], "compile='fast'; expected true or false"),
    ):  # fmt: skip
        if check is check_compile_override and importlib.util.find_spec("torch") is None:
            check("prog", args)  # core-only install: compile values are the torch commands' (none here)
            assert capsys.readouterr().err == ""
            continue
        with pytest.raises(SystemExit) as exit_info:
            check(*(["prog", "fakepkg_sweep.conf"] if check is check_group_overrides else ["prog"]), args)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"prog: error: ConfigError: {message}")


def test_a_check_before_hydra_goes_into_torchruns_error_file_too(tmp_path, monkeypatch, capsys):
    """The checks that run before Hydra starts end with the same line as :func:`user_errors` (core
    ``refuse``), also in torchrun's worker error file: they printed it on stderr only, so torchrun's
    summary showed "To enable traceback see ..." for a command line refused before the task ran."""
    import json

    from tttlab.core.cli import check_hydra_flags

    err_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    with pytest.raises(SystemExit) as exc:
        check_hydra_flags("tttlab-x", ["--cfg", "job", "-m"])
    assert exc.value.code == 2
    line = capsys.readouterr().err.rstrip("\n")
    assert line.startswith("tttlab-x: error: ConfigError: ") and "\n" not in line
    assert json.loads(err_file.read_text())["message"] == line


def test_a_sweeps_jobs_compose_as_hydra_composes_them_with_the_groups_merged_once(tmp_path, monkeypatch):
    """The pre-check of a ``-m`` sweep composed every job (up to 64) from scratch: 0.12 s each, two thirds of
    it Hydra's defaults list and the merge of its configs, the same for every job with the same group
    overrides.  Under ``_reuse_group_composition`` those two steps run once per distinct set of group
    overrides; every job still gets Hydra's own parse, value overrides (struct flag, schema types), ``+``/``~``
    and ``hydra`` node.  Each job's config, or its error, is the one Hydra's compose makes without the reuse,
    also a job after one that added a key (the merged config handed out is a copy each time)."""
    import contextlib
    from dataclasses import dataclass, field

    from hydra import compose, initialize_config_module
    from hydra._internal import config_loader_impl as impl
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tttlab.core.cli import _reuse_group_composition

    @dataclass
    class Schema:
        seed: int = 0
        lr: float = 0.1
        out_dir: str = "runs/x"
        engine: dict = field(default_factory=dict)

    ConfigStore.instance().store(name="fakepkg_reuse_schema", node=Schema)
    conf = tmp_path / "fakepkg_reuse" / "conf"
    for group, names in (("engine", ("tent", "bn")), ("experiment", ("smoke",))):
        (conf / group).mkdir(parents=True)
        for name in names:
            text = "# @package _global_\nseed: 7\nlr: 0.5\n" if group == "experiment" else f"name: {name}\n"
            (conf / group / f"{name}.yaml").write_text(text)
    (conf / "run.yaml").write_text("defaults:\n  - fakepkg_reuse_schema\n  - engine: tent\n  - _self_\n"
                                   "hydra:\n  run:\n    dir: ${out_dir}\n")  # fmt: skip
    (tmp_path / "extra" / "engine").mkdir(parents=True)  # an engine of a searchpath folder
    (tmp_path / "extra" / "engine" / "other.yaml").write_text("name: other\n")
    searchpath = f"hydra.searchpath=['file://{tmp_path / 'extra'}']"
    for folder in (conf.parent, conf):
        (folder / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    jobs = [
        ["+experiment=smoke", "seed=1", "out_dir=runs/${seed}"],
        ["+experiment=smoke", "seed=2", "out_dir=runs/${seed}"],
        ["engine=bn", "+engine.extra=1", "lr=2"],
        ["engine=bn", "+engine.extra=2"],  # added to a copy: the key is new again
        ["+experiment=smoke", "sed=1"],  # a misspelt key: the struct flag holds
        ["+experiment=smoke", "seed=abc"],  # the schema's type
        ["+experiment=smoke", "+seed=5"],  # already there
        ["+experiment=smoke", "~lr", "engine.name=x", "hydra.job.name=j"],
        [searchpath, "engine=other", "seed=1"],  # a key of its own, and the value in hydra.searchpath
        [searchpath, "engine=other", "seed=2"],  # (the second job's was the default [])
        ["hydra/job_logging=disabled", "~engine", "seed=3"],  # a group of Hydra's own, a group deleted
        ["hydra/job_logging=disabled", "~engine", "seed=4"],
    ]

    def each(reuse):
        out = []
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module("fakepkg_reuse.conf", version_base=None), reuse:
                for job in jobs:
                    try:
                        cfg = compose("run", job, return_hydra_config=True)
                        out.append(OmegaConf.to_yaml(cfg))
                    except Exception as exc:  # noqa: BLE001 - the error is the result to compare
                        out.append(f"{type(exc).__name__}: {exc}")
        finally:
            GlobalHydra.instance().clear()
        return out

    calls = []
    real = impl.create_defaults_list
    monkeypatch.setattr(impl, "create_defaults_list", lambda *a, **k: calls.append(1) or real(*a, **k))
    hydras = each(contextlib.nullcontext())
    assert len(calls) == len(jobs)
    calls.clear()
    ours = each(_reuse_group_composition())
    assert len(calls) == 4  # once per distinct set of group overrides
    assert impl.create_defaults_list is not real and calls  # put back as it was (the counting one)
    for job, theirs, mine in zip(jobs, hydras, ours):
        assert mine == theirs, job
    assert f"searchpath:\n  - file://{tmp_path / 'extra'}\n" in ours[9] and "name: other" in ours[9]
    assert ours[11].endswith("engine: {}\n") and "name: tent" not in ours[11]  # the schema's default
    errors = [r.partition(":")[0] for r in ours]
    assert errors[4:7] == ["ConfigCompositionException"] * 3 and "seed: 2\n" in ours[1], ours
    assert "extra: 2" in ours[3] and "lr: 2.0" in ours[2] and "name: x" in ours[7] and "lr:" not in ours[7]
    merge = impl.ConfigLoaderImpl.__dict__["_compose_config_from_defaults_list"]
    with pytest.raises(KeyboardInterrupt), _reuse_group_composition():  # ^C in the middle: put back too
        assert impl.ConfigLoaderImpl.__dict__["_compose_config_from_defaults_list"] is not merge
        raise KeyboardInterrupt
    assert impl.ConfigLoaderImpl.__dict__["_compose_config_from_defaults_list"] is merge
    # the check of a sweep uses it, and puts Hydra's functions back when it refuses a job
    from tttlab.core.cli import check_config_overrides

    monkeypatch.setattr(impl, "create_defaults_list", real)
    calls.clear()
    with pytest.raises(SystemExit):
        check_config_overrides(
            "prog", "fakepkg_reuse.conf", "run", ["-m", "+experiment=smoke", "seed=1,2,abc"]
        )
    assert (
        impl.create_defaults_list is real
        and impl.ConfigLoaderImpl._compose_config_from_defaults_list.__name__
        == ("_compose_config_from_defaults_list")
    )


def test_imported_afresh_blocks_what_it_is_told_and_puts_every_module_back():
    """``testing.imported_afresh``, which the packages' start-up tests use: a fresh module object inside, the
    blocked module unimportable, and afterwards the old modules and package attributes, nothing new left."""
    import importlib
    import json as json_before

    import tttlab.core
    import tttlab.core.errors as errors_before
    from tttlab.core.testing import imported_afresh

    names_before = set(sys.modules)
    with imported_afresh(["tttlab.core.errors"], blocked=["json"]):
        from tttlab.core import errors as from_the_package  # not the old module left on tttlab.core

        fresh = importlib.import_module("tttlab.core.errors")
        assert fresh is from_the_package and tttlab.core.errors is fresh
        assert fresh is not errors_before and fresh.ConfigError is not errors_before.ConfigError
        with pytest.raises(ImportError, match="json"):
            importlib.import_module("json")
        importlib.import_module("colorsys")  # new here unless imported before: dropped again
    assert sys.modules["tttlab.core.errors"] is errors_before and tttlab.core.errors is errors_before
    assert sys.modules["json"] is json_before
    assert set(sys.modules) == names_before


def test_imported_afresh_keeps_a_new_outside_module_and_leaves_no_dropped_one_on_its_package(
    tmp_path, monkeypatch
):
    """With nothing blocked, a module outside ``packages`` imported for the first time inside the block stays
    imported (dropped, the next import ran it again: torchvision or torch._dynamo, first imported inside,
    cannot be imported twice in a process); a module of ``packages`` imported for the first time inside is
    dropped and not left on its kept package (it was: ``pkg.sub`` named a module ``sys.modules`` lacked)."""
    import importlib

    from tttlab.core.testing import imported_afresh

    (tmp_path / "afresh_pkg").mkdir()
    (tmp_path / "afresh_pkg" / "__init__.py").write_text("")
    (tmp_path / "afresh_pkg" / "sub.py").write_text("import afresh_outside\n")
    (tmp_path / "afresh_outside.py").write_text("RUNS = []\nRUNS.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("afresh_pkg", "afresh_pkg.sub", "afresh_outside"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    package = importlib.import_module("afresh_pkg")
    with imported_afresh(["afresh_pkg.sub"]):
        sub = importlib.import_module("afresh_pkg.sub")
        outside = sys.modules["afresh_outside"]
        assert package.sub is sub
    assert "afresh_pkg.sub" not in sys.modules and not hasattr(package, "sub")
    assert sys.modules["afresh_outside"] is outside
    assert importlib.import_module("afresh_outside").RUNS == [1], "run once"
    with imported_afresh(["afresh_pkg.sub"], blocked=["json"]):  # blocked: what the block imported goes
        importlib.import_module("afresh_pkg.sub")
    assert "afresh_pkg.sub" not in sys.modules and not hasattr(package, "sub")


def test_a_quoted_home_folder_of_a_hydra_command_is_the_users_home(tmp_path, monkeypatch):
    """``out_dir="~/runs"`` (quoted for Hydra, which keeps the '~'): every Hydra command made a folder named '~'
    in the working directory, while check_dir_overrides checked the home's; tttlab-compare expands it.  Now
    every command's folder keys are the home's, in the argv Hydra reads; other keys, a deletion, an unknown
    user and an unquoted '~' (refused with $HOME) stay as given."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tttlab.core.cli import check_hydra_command, expand_quoted_home

    monkeypatch.setenv("HOME", str(tmp_path))
    given = ['out_dir="~/runs"', "cache_dir='~'", "python='~/bin/python'", 'device="~/x"',
             'hydra.run.dir="~nosuchuser12/r"']  # fmt: skip
    monkeypatch.setattr("sys.argv", ["tttlab-x", *given])
    check_hydra_command("tttlab-x", "tttlab.core.conf", "compare", compile_key=False)  # a ~user of no user:
    # no RuntimeError from Path.expanduser (Hydra makes that folder as given)
    assert sys.argv[1:] == [f'out_dir="{tmp_path}/runs"', f"cache_dir='{tmp_path}'",
                            f"python='{tmp_path}/bin/python'", *given[3:]]  # fmt: skip
    assert expand_quoted_home(["~out_dir='~/r'", "+a.b.data_root='~/d'", "out_dir=~/r"]) == [
        "~out_dir='~/r'", f"+a.b.data_root='{tmp_path}/d'", "out_dir=~/r"]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_module("tttlab.core.conf", version_base=None):
        cfg = compose("compare", sys.argv[1:3])
    GlobalHydra.instance().clear()
    assert (cfg.out_dir, cfg.cache_dir) == (str(tmp_path / "runs"), str(tmp_path))
