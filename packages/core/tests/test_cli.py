import pytest

from tttlab.core.cli import check_dir_overrides, user_errors
from tttlab.core.errors import ConfigError


def test_user_error_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exc, user_errors("tttlab-x"):
        raise ConfigError("lr=-1: expected >= 0")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tttlab-x: error: ConfigError: lr=-1: expected >= 0\n"


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
