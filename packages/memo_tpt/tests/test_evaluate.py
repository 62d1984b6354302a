import pytest

from tttlab.core.errors import ConfigError
from tttlab.core.records import load_records
from tttlab.core.registry import list_methods
from tttlab.memo_tpt.evaluate import METHODS, run

SPEC_NAMES = sorted(m.name for m in list_methods() if m.package == "memo_tpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def test_specs_are_the_evaluated_methods():
    assert SPEC_NAMES == sorted(METHODS)


@pytest.mark.parametrize("method", SPEC_NAMES)
def test_contract_records(method, cache, tmp_path):
    bench = {"corruptions": ["gaussian_noise", "fog"], "num_examples": 3}
    path = run(method=method, profile="smoke", out_dir=str(tmp_path / "a"), cache_dir=str(cache), benchmark=bench,
               progress=False)  # fmt: skip
    df = load_records(path)
    acc = df[df.metric == "accuracy"]
    assert list(acc.corruption) == ["gaussian_noise", "fog", "mean"]
    assert (acc.n.iloc[:2] == 3).all() and acc.n.iloc[2] == 6
    assert set(df.metric) == {"accuracy", "s_per_image"} and (df.method == method).all()
    assert ((acc.value >= 0) & (acc.value <= 1)).all() and (df.package == "memo_tpt").all()
    models = sorted(p.name for p in cache.iterdir())
    again = load_records(run(method=method, profile="smoke", out_dir=str(tmp_path / "b"), cache_dir=str(cache),
                             benchmark=bench, progress=False))  # fmt: skip
    assert sorted(p.name for p in cache.iterdir()) == models  # reused, not retrained
    assert list(again[again.metric == "accuracy"].value) == list(acc.value)  # deterministic


def test_bad_config():
    with pytest.raises(ConfigError, match="tpt.nviews"):
        run(method="memo_tpt.tpt", tpt={"nviews": 3})
    with pytest.raises(ConfigError, match="method"):
        run(method="memo_tpt.nope")


def test_cli_help_errors_and_summary(cache, tmp_path, monkeypatch, capsys):
    """``tttlab-memo-tpt-evaluate --help`` was 'unknown config key --help' with a traceback; bad values are
    one-line errors; a run prints its accuracy before the records path (it printed only the path)."""
    import sys

    from tttlab.memo_tpt.evaluate import main

    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", "--help"])
    main()
    assert "usage: tttlab-memo-tpt-evaluate" in capsys.readouterr().out
    for bad, expected in (("profile=huge", "ConfigError: profile='huge'"), ("fog", "arguments ['fog']")):
        monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", bad])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and "tttlab-memo-tpt-evaluate: error: " in err and expected in err, err
    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", "method=memo_tpt.memo", "profile=smoke",
                                      f"out_dir={tmp_path}", f"cache_dir={cache}", "progress=false",
                                      "benchmark.corruptions=[fog,contrast]", "benchmark.num_examples=2"])  # fmt: skip
    main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("memo_tpt.memo: accuracy ") and "(mean over corruptions, 4 images)" in out[0]
    assert out[1].endswith("records.jsonl")
