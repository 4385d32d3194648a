"""sweeps/retrieval.yaml and `retrieval.py sweep`: the YAML is a wandb sweep over real retrieval.py flags, the
offline runner trains every trial, chooses on val only and resumes; plus the two speed-ups the sweep relies on
(NT-Xent as one cross-entropy, the top-k val recall), each checked against the slow reference."""

import json
import re

import numpy as np
import pytest
import yaml

import retrieval
import utils
from utils import UserError

SWEEP = utils.REPO / "sweeps" / "retrieval.yaml"


# --------------------------------------------------------------------------- the YAML
def test_sweep_yaml_is_a_wandb_sweep_over_retrieval_flags():
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["program"] == "retrieval.py" and sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": retrieval.SWEEP_METRIC, "goal": "maximize"}
    assert {"loss", "margin", "lr", "dim", "epochs"} <= set(sweep["parameters"])
    flags = set(retrieval.build_parser()._option_string_actions)
    for name, spec in sweep["parameters"].items():
        assert f"--{name}" in flags, name
        values = spec.get("values") or [spec["min"], spec["max"]]
        for value in values:  # what `wandb agent` would pass parses and passes retrieval.py's checks
            args = retrieval.parse_args([f"--{name}={value}"])
            got = getattr(args, name)
            assert got == pytest.approx(value) if isinstance(value, float) else str(got) == str(value)
    assert "--wandb" in sweep["command"] and "${args}" in sweep["command"]
    assert retrieval.load_sweep_config(SWEEP)["parameters"] == sweep["parameters"]


def test_random_trials_are_seeded_distinct_and_start_with_the_incumbent():
    config = retrieval.load_sweep_config(SWEEP)
    incumbent = {name: getattr(retrieval.parse_args([]), name) for name in config["parameters"]}
    trials = retrieval.sweep_trials(config, 12, seed=0, incumbent=incumbent)
    assert trials == retrieval.sweep_trials(config, 12, seed=0, incumbent=incumbent)
    assert trials != retrieval.sweep_trials(config, 12, seed=1, incumbent=incumbent)
    assert len(trials) == 12 and trials[0] == incumbent
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 12
    lr = config["parameters"]["lr"]
    assert all(lr["min"] <= t["lr"] <= lr["max"] for t in trials[1:])


def test_grid_enumerates_every_combination(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"program": "retrieval.py", "method": "grid",
                                    "metric": {"name": retrieval.SWEEP_METRIC, "goal": "maximize"},
                                    "parameters": {"lr": {"values": [0.001, 0.002]}, "dim": {"values": [64, 128]}}},
                                   sort_keys=False))
    trials = retrieval.sweep_trials(retrieval.load_sweep_config(path), 0, 0, {"lr": 0.001, "dim": 256})
    assert trials == [{"lr": 0.001, "dim": 256}, {"lr": 0.001, "dim": 64}, {"lr": 0.001, "dim": 128},
                      {"lr": 0.002, "dim": 64}, {"lr": 0.002, "dim": 128}]


@pytest.mark.parametrize("config, message", [
    ({"method": "bayes"}, "method 'bayes' cannot run offline; choose one of grid, random (bayes needs the wandb server"),
    ({"parameters": {"learning_rate": {"values": [0.1]}}}, "parameter 'learning_rate' is not a retrieval.py flag"),
    ({"parameters": {"lr": {"distribution": "q_normal", "min": 0.1, "max": 0.2}}},
     "lr: distribution 'q_normal' is not supported offline"),
    ({"metric": {"name": "test/txt2img/R@10", "goal": "maximize"}}, "metric must be {name: val/best_txt2img_R@10"),
])
def test_bad_sweep_configs_say_what_is_wrong(tmp_path, config, message):
    base = {"program": "retrieval.py", "method": "random",
            "metric": {"name": retrieval.SWEEP_METRIC, "goal": "maximize"}, "parameters": {"lr": {"values": [0.1]}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, **config}))
    with pytest.raises(UserError, match=re.escape(message)):
        retrieval.load_sweep_config(path)


# --------------------------------------------------------------------------- the offline runner
def _tiny_sweep(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"program": "retrieval.py", "method": "grid",
                                    "metric": {"name": retrieval.SWEEP_METRIC, "goal": "maximize"},
                                    "parameters": {"loss": {"values": ["triplet", "ntxent"]},
                                                   "epochs": {"values": [2]}}}))
    return path


def test_offline_sweep_chooses_on_val_writes_every_trial_and_resumes(tmp_path, tiny_data, monkeypatch):
    flags = ["sweep", "--config", str(_tiny_sweep(tmp_path)), "--run-name", "s", "--outputs", str(tmp_path / "out"),
             "--data", str(tiny_data), "--max-train", "200", "--max-eval", "100", "--batch-size", "32", "--epochs", "1"]
    with pytest.raises(UserError, match=r"^--epochs is swept by .*tiny.yaml; leave it out of the fixed flags$"):
        retrieval.main(flags)
    flags = flags[:-2]
    loaded = []
    real_load = retrieval.load_data
    monkeypatch.setattr(retrieval, "load_data",
                        lambda path, splits=None: loaded.append(splits) or real_load(path, splits))
    m = retrieval.main(flags)
    assert loaded == [["train", "val"]]  # the test split is never read
    run = tmp_path / "out" / "retrieval_sweep" / "s"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["args"]["trials"] == [t["params"] for t in on_disk["trials"]]
    # the incumbent (retrieval.py's defaults for the swept flags) first, then the grid in order
    defaults = retrieval.parse_args([])
    assert [t["params"] for t in on_disk["trials"]] == [{"loss": defaults.loss, "epochs": defaults.epochs},
                                                      *[{"loss": loss, "epochs": 2} for loss in ("triplet", "ntxent")
                                                        if (loss, 2) != (defaults.loss, defaults.epochs)]]
    for t in on_disk["trials"]:
        assert len(t["val_curve"]) == t["params"]["epochs"] and t[retrieval.SWEEP_METRIC] == max(t["val_curve"])
    best = max(on_disk["trials"], key=lambda t: t[retrieval.SWEEP_METRIC])
    assert m["best"]["trial"] == best["trial"] and m["best"]["params"] == best["params"]
    assert m["best"]["command"].startswith("python retrieval.py --data ")
    assert (run / "results.md").read_text().count("| ") > 3
    # resume: every trial is read back, nothing is retrained
    monkeypatch.setattr(retrieval, "train_heads", lambda *a, **k: pytest.fail("a finished trial was retrained"))
    again = retrieval.main(flags)
    assert again["trials"] == on_disk["trials"]


# --------------------------------------------------------------------------- the speed-ups, against the references
def test_one_positive_ntxent_equals_pml_ntxent_value_and_gradient():
    import torch
    from pytorch_metric_learning import losses

    torch.manual_seed(0)
    q, r = torch.randn(48, 16, requires_grad=True), torch.randn(48, 16, requires_grad=True)
    labels = torch.arange(48)
    pml = losses.NTXentLoss(temperature=0.07)
    fast = retrieval.OnePositiveNTXent(pml)
    ref = pml(q, labels, None, ref_emb=r, ref_labels=labels.clone())
    got = fast(q, labels, None, ref_emb=r, ref_labels=labels.clone())
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for g_ref, g_got in zip(torch.autograd.grad(ref, [q, r]), torch.autograd.grad(got, [q, r])):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
    # repeated labels (several positives): the general PML code path, same value as PML
    rep = labels % 24
    assert fast(q, rep, None, ref_emb=r, ref_labels=rep.clone()).item() == pytest.approx(
        pml(q, rep, None, ref_emb=r, ref_labels=rep.clone()).item())


def test_top_k_val_recall_equals_the_full_evaluation(tiny_data):
    args = retrieval.parse_args(["--data", str(tiny_data), "--epochs", "1", "--batch-size", "32"])
    data = utils.load_data(tiny_data, ["train", "val"])
    res = retrieval.auto_image_res(data, args.image_encoder)
    fx = retrieval.FeatureExtractor(args.image_encoder, args.text_encoder, res)
    tr = retrieval.split_features(fx, retrieval.subset(data["splits"]["train"], 200, 0))
    va = retrieval.split_features(fx, data["splits"]["val"])
    heads, history = retrieval.train_heads(*tr, args, val=va)
    full = retrieval.evaluate(heads, *va)["txt2img"]["R@10"]
    assert retrieval.txt2img_recall(heads, *va) == pytest.approx(full)
    assert history[-1]["val_txt2img_R@10"] == pytest.approx(full)
    assert 0 < full < 1 and not np.isnan(full)
