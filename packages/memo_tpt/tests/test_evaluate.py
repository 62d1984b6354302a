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
