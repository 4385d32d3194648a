"""report.py: the one-page study report is filled in from the metrics files, and says what has not run."""

import json
import os
import re

import pytest

import report
from utils import UserError


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run(outputs, task, metrics, files=("results.md",)):
    run = outputs / task / "r1"
    _write(run / "metrics.json", metrics)
    for name in files:
        (run / name).write_text("x")
    os.symlink("r1", outputs / task / "latest")


def test_report_reads_numbers_and_lists_missing_tasks(tmp_path):
    outputs = tmp_path / "outputs"
    split = {"R@1": 0.111, "R@5": 0.222, "R@10": 0.333, "mAP": 0.444}
    _run(outputs, "retrieval", {"img2txt": split, "txt2img": dict(split, **{"R@10": 0.777}),
                                "n_train_images": 12, "n_eval_images": 5, "n_eval_captions": 25},
         files=("results.md", "umap.png"))
    out = report.main(["--outputs", str(outputs), "--model", str(tmp_path / "no-model")])
    text = out.read_text()
    assert out == outputs / "REPORT.md"
    assert "| txt2img | 0.111 | 0.222 | 0.777 | 0.444 |" in text
    assert "[umap.png](retrieval/r1/umap.png)" in text
    assert "Not run yet (no `" in text and "task_d/latest/metrics.json" in text
    assert "no-model/metrics.json` is missing" in text


def test_generator_section_names_the_model_task_d_generated_with(tmp_path):
    outputs = tmp_path / "outputs"
    assert report.generator_folder(outputs) == report.resolve_model(report.STUDY_MODEL)["id"]  # task_d not run
    folder = tmp_path / "my-generator"
    _write(folder / "model_index.json", {})
    _run(outputs, "task_d", {})
    _write(outputs / "task_d" / "r1" / "config.json", {"args": {"model": str(folder)}})
    assert report.generator_folder(outputs) == str(folder)
    assert report.parse_args(["--outputs", str(outputs)]).model == str(folder)
    _write(outputs / "task_d" / "r1" / "config.json", {"args": {"model": "org/hub-model"}})  # no folder: the default
    assert report.generator_folder(outputs) == report.resolve_model(report.STUDY_MODEL)["id"]


def test_report_missing_outputs_folder(tmp_path):
    with pytest.raises(UserError, match="outputs folder not found: .*nope .run `make demo` first."):
        report.main(["--outputs", str(tmp_path / "nope")])


def test_task_d_summary_states_whether_the_target_is_met(tmp_path):
    outputs = tmp_path / "outputs"
    d = {"mean": 0.123, "ci95": [0.05, 0.2]}
    met = [{"target": "gap_closed", "threshold": 0.5, "measured": 0.6, "met": True},
           {"target": "overall_txt2img_R@10_delta", "threshold": -0.01, "measured": -0.004, "met": True}]
    _run(outputs, "task_d", {"filter": {"acceptance_rate": 0.5, "rule": "r"}, "rare_txt2img_R@10_delta": d,
                             "overall_txt2img_R@10_delta": {"mean": -0.004, "ci95": [-0.01, 0.002]},
                             "filtered_vs_oversample": {"rare": d}, "seeds": [0, 1, 2], "epochs": 3,
                             "targets_met": met}, files=("results.md", "deltas.png"))
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "on the target categories: +0.123 [+0.050, +0.200] (target: closes ≥ 50% of the gap" in text
    assert "the CI above 0: met); overall: -0.004 [-0.010, +0.002]" in text
    assert "![deltas](task_d/r1/deltas.png)" in text  # the key figure inline, not only linked


def _cell(experiment, label, f, lo, hi, sec, **extra):
    return {"experiment": experiment, "label": label, "fidelity_mean": f, "fidelity_ci95": [lo, hi],
            "sec_per_image": sec, "timestep_spacing": "trailing", **extra}


def test_task_b_section_shows_every_experiment_and_the_filmstrips_inline(tmp_path):
    outputs = tmp_path / "outputs"
    experiments = {
        "schedulers": [_cell("schedulers", "ddim 1 steps", 0.4, 0.3, 0.5, 0.02),
                       _cell("schedulers", "euler 1 steps", 0.9, 0.8, 1.0, 0.01, no_effect="the same images as x"),
                       _cell("schedulers", "ddim 3 steps", 0.7, 0.5, 0.9, 0.04)],
        "eta": [_cell("eta", "ddim eta 0", 0.5, 0.25, 0.75, 0.05, eta=0.0, num_inference_steps=12),
                _cell("eta", "ddim eta 1", 0.25, 0.0, 0.5, 0.05, eta=1.0, num_inference_steps=12)],
        "negative": [_cell("negative", "no negative", 0.6, 0.4, 0.8, 0.05, negative_colour_rate=0.75),
                     _cell("negative", "with negative colour", 0.5, 0.3, 0.7, 0.05, negative_colour_rate=0.25,
                           colour_rate_drop=0.5, colour_rate_drop_ci95=[0.25, 0.75])],
        "trajectory": [{"experiment": "trajectory", "label": "ddim", "filmstrip": "trajectory_ddim.png"},
                       {"experiment": "trajectory", "label": "euler", "filmstrip": "trajectory_euler.png"}],
    }
    _run(outputs, "task_b", {"experiments": experiments, "n_prompts": 8, "n_seeds": 4, "fidelity_key": "color",
                             "time_repeats": 3, "figures": ["fidelity_vs_steps.png", "pareto.png"]},
         files=("findings.md", "pareto.png", "trajectory_ddim.png"))
    text = report.main(["--outputs", str(outputs)]).read_text()
    # The no-effect cell (0.9) is neither the best nor the fastest.
    assert "- schedulers: best ddim 3 steps, 0.700 [0.500, 0.900] (0 of the other 1 inside its CI)." in text
    assert "- fastest: ddim 1 steps at 0.020 s/image (fidelity 0.400)" in text
    assert "1 cells cannot change the image and are not ranked" in text
    assert "- eta (DDIM, 12 steps): eta 0 0.500 [0.250, 0.750], eta 1 0.250 [0.000, 0.500]." in text
    assert "that colour's rate 0.750 -> 0.250, a drop of 0.500 [0.250, 0.750]; shape present 0.600 -> 0.500" in text
    for name in ("trajectory_ddim.png", "trajectory_euler.png", "pareto.png", "fidelity_vs_steps.png"):
        assert f"]({'task_b/r1/' + name})" in text and "![" in text.split(name)[0].splitlines()[-1], name


def test_task_e_with_and_without_editing_is_reported(tmp_path):
    outputs = tmp_path / "outputs"
    text_only = {"R@10": {"mean": 0.5, "ci95": [0.25, 0.75]}}  # the reference row: no delta to itself
    fused = {"R@10": {"mean": 0.625, "ci95": [0.375, 0.875], "delta": 0.125, "delta_ci95": [-0.25, 0.5]}}
    overall = {"n": 4, "text": text_only, "weighted": {"2": fused}}
    _run(outputs, "task_e", {"k_max": 2, "retrieval": {"overall": overall, "relational": {"n": 0}},
                             "fusion": {"weighted": {"2": {"w": 0.5}}},
                             "cost": {"added_s_per_query": {"weighted": {"2": 0.25}}}, "editing": None})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "- overall (4 queries): text-only R@10 0.500; weighted fusion with k = 2 images (w = 0.5 " in text
    assert "ΔR@10 +0.125 [-0.250, +0.500]" in text
    assert "- relational: no queries drawn\n" in text  # an empty subset has no numbers to read
    assert "- added cost 0.25 s per query at k = 2; editing not run (--n-edits 0)" in text

    (outputs / "task_e" / "latest").unlink()  # the same run, now with editing
    best = {"method": "inversion", "strength": "0.5", "success": {"rate": 0.28125, "ci95": [0.125, 0.4375]}, "n": 32}
    _run(outputs, "task_e", {"k_max": 2, "retrieval": {"overall": overall}, "fusion": {"weighted": {"2": {"w": 0.5}}},
                             "cost": {"added_s_per_query": {"weighted": {"2": 0.25}}},
                             "editing": {"by_method": {"img2img": {}, "inversion": {}}, "best": best}})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert ("editing success at the best method and strength (inversion, 0.5): 0.281 [0.125, 0.438] of 32 edits"
            in text)


def test_bench_speed_section_reads_the_limit_and_the_index_scale(tmp_path):
    outputs = tmp_path / "outputs"
    hw = {"cpu": "cpu x", "cores_usable": 2, "gpu": None, "contended": False}
    scale = [{"n": 100000, "index": "flat", "k": 10, "build_s": 0.031, "search_s": 0.4481, "recall@10": 1.0},
             {"n": 100000, "index": "ivf", "k": 10, "build_s": 3.084, "search_s": 0.0321, "recall@10": 0.9861},
             {"n": 100000, "index": "hnsw", "k": 10, "skipped": "n > --hnsw-max-n"}]
    _run(outputs, "bench", {"hardware": hw, "ratios": {"generation_ours_vs_plain": 3.44},
                            "limit": {"plain": 0.0171, "ours": 0.0884, "best_config": "+ inference_mode",
                                      "peak": {"peak_flops_per_s": 86.1e9}},
                            "retrieval": {"scale": scale, "scale_data": {"n_base": 1000, "noise": 0.1, "source": "s"}}})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "GPU none. Ratios measured side by side (fastest of the repeats): generation_ours_vs_plain ×3.44." in text
    assert "reach 1.7% of this machine's measured fp32 peak (86.1 GFLOP/s) on the plain diffusers path and 8.8% on " \
           "ours (`+ inference_mode`)" in text
    assert "| 100,000 | ivf | 3.08 | 0.032 | 0.986 |" in text and "| 100,000 | flat | 0.03 | 0.448 | exact |" in text
    assert "hnsw" not in text.split("## Benchmarks")[1]  # a skipped index has no numbers to show
    # our best configuration computes in bf16: its share is of the bf16 peak, and the section says so
    outputs = tmp_path / "outputs_bf16"
    _run(outputs, "bench", {"hardware": hw, "ratios": {"generation_ours_vs_plain": 4.2},
                            "limit": {"plain": 0.0171, "ours": 0.0412, "best_config": "+ bf16_autocast",
                                      "configs": [{"config": "+ bf16_autocast", "precision": "bf16"}],
                                      "peak": {"peak_flops_per_s": 86.1e9, "peak_flops_per_s_bf16": 350.0e9}}})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "and 4.1% on ours (`+ bf16_autocast`, of the bf16 peak 350.0 GFLOP/s)." in text
    # the equal-fidelity ratio names the prompts its verdict rests on, and says when they are too few (the quick form)
    for n_images, more, basis in ((2, None, "2 prompts; too few to show equal fidelity"),
                                  (96, 400, "496 prompts")):
        outputs = tmp_path / f"outputs_eq{n_images}"
        row = {"config": "kept", **({"more_prompts": {"n_prompts": more}} if more else {})}
        _run(outputs, "bench", {"hardware": hw, "ratios": {"generation_at_equal_fidelity": 5.06},
                                "generation": {"n_images": n_images, "fidelity_tolerance": 0.01,
                                               "fastest_equal_fidelity_config": "kept", "configs": [row]}})
        text = report.main(["--outputs", str(outputs)]).read_text()
        assert f"generation_at_equal_fidelity ×5.06 (fidelity compared on {basis})." in text


BLOCKS = ("study-numbers", "retrieval-numbers", "oracle-numbers", "model-numbers")


def _readme(path, blocks=BLOCKS):
    """A README with each block holding a hand copy (0.999) between prose lines."""
    path.write_text("# Title\n\nintro\n" + "".join(f"<!-- {b} -->\nold hand copy 0.999\n<!-- /{b} -->\nafter {b}\n"
                                                   for b in blocks))
    return path


def _block(text, name):
    return text.split(f"<!-- {name} -->\n")[1].split(f"<!-- /{name} -->")[0]


def _category(train_count, t2i_r10, i2t_r10):
    return {"train_count": train_count, "txt2img": {"R@1": 0.1, "R@5": 0.2, "R@10": t2i_r10},
            "img2txt": {"R@1": 0.1, "R@5": 0.2, "R@10": i2t_r10}}


def test_readme_blocks_are_filled_from_the_latest_metrics(tmp_path):
    outputs = tmp_path / "outputs"
    split = {"R@1": 0.25, "R@5": 0.5, "R@10": 0.625, "mAP": 0.375}
    # rarest three: txt2img R@10 0.2, 0.3, 0.4 (mean 0.3); commonest three: 0.6, 0.7, 0.8 (mean 0.7)
    per_cat = {"star": _category(2, 0.2, 0.5), "ring": _category(5, 0.3, 0.5), "moon": _category(9, 0.4, 0.5),
               "cross": _category(50, 0.6, 0.25), "heart": _category(70, 0.7, 0.25), "arrow": _category(90, 0.8, 0.25)}
    _run(outputs, "retrieval", {"img2txt": split, "txt2img": split, "n_train_images": 12, "n_eval_images": 5,
                                "n_eval_captions": 25, "per_category": per_cat})
    _write(outputs / "retrieval" / "r1" / "config.json", {"args": {"seed": 7, "data": "/elsewhere/data.pkl",
                                                                   "eval_split": "test"}})
    s = {"rho": 0.14, "ci95": [-0.24, 0.53], "n_categories": 12}
    _run(outputs, "task_c", {"spearman": {"txt2img": s}, "targets": {"rule_name": "rule", "targets": [
        {"category": "hexagon"}, {"category": "circle"}]}})
    readme = _readme(tmp_path / "README.md")
    report.main(["--outputs", str(outputs), "--readme", str(readme), "--models", str(tmp_path / "no-models")])
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n<!-- study-numbers -->\n") and text.endswith("after model-numbers\n")
    study, retrieval = _block(text, "study-numbers"), _block(text, "retrieval-numbers")
    assert "0.999" not in study + retrieval
    assert "| txt2img | 0.250 | 0.500 | 0.625 | 0.375 |" in study
    assert "0.140 (95% CI [-0.240, 0.530], 12 categories)" in study and "**hexagon, circle**" in study
    assert study.count("Not run yet.") == 5  # task_a, task_b, task_d, task_e, bench
    assert "`python retrieval.py --run-name r1`" in retrieval and "seed 7, data `/elsewhere/data.pkl`" in retrieval
    assert "| 3 rarest | star (2), ring (5), moon (9) | 0.100 | 0.200 | 0.500 | 0.100 | 0.200 | 0.300 |" in retrieval
    assert "-0.400 txt2img R@10, +0.250 img2txt R@10" in retrieval  # 0.3 - 0.7 and 0.5 - 0.25
    assert "weakest category is star (2 training images, txt2img R@10 0.200), the best arrow (90, 0.800)" in retrieval
    # no models folder: both model blocks keep their hand copy
    assert _block(text, "oracle-numbers") == _block(text, "model-numbers") == "old hand copy 0.999\n"
    again = report.main(["--outputs", str(outputs), "--readme", str(readme), "--models", str(tmp_path / "no-models")])
    assert again.is_file() and readme.read_text() == text  # filling twice changes nothing


def _model(models, folder, name, single, two, steps, distilled=False, warm_steps=0, ceiling=None):
    attrs = {"shape": single, "color": 0.5, "size": None, "position": 0.25, "count": 1.0, "all": single, "n": 4}
    _write(models / folder / "model_index.json", {})
    if distilled:  # a distill.py student logs its steps in distill_log.json
        _write(models / folder / "distill_log.json", {"steps": steps})
    else:  # a UNet warm-started from another pipeline's counts that pipeline's steps too
        _write(models / folder / "training_log.json", {"card_facts": {"steps": steps},
                                                       "warm_start": {"steps": warm_steps} if warm_steps else None})
    _write(models / folder / "metrics.json", {
        "model": {"name": name}, "args": {"heads": None}, "n_prompts": 4, "seed": 3, "oracle_accuracy_on_renders": 0.9,
        "sampler": {"scheduler": "S", "steps": 7, "guidance": 2.0, "device": "cpu"},
        "single_object": attrs, "single_object_all_correct": single, "two_object": dict(attrs, all=two),
        "two_object_all_correct": two, "fd": 12.34, "fd_real_vs_real": 5.0, "fd_n": 8,
        "representation_round_trip": ceiling})


def test_readme_oracle_and_model_blocks_come_from_the_model_folders(tmp_path, capsys):
    models = tmp_path / "models"
    _write(models / "shapes-oracle" / "metrics.json", {
        "heldout": {"n_scenes": 1234}, "accuracy_on_renders": 0.995, "false_reject_rate_renders": 0.02,
        "reject_rate_heldout": 0.96, "reject_rate_heldout_by_recipe": {"ellipse": 1.0, "overlap": 0.92},
        "ece": 0.0125, "ece_uncalibrated": 0.05,
        "blur_sigma2": {"single_shape_correct": 0.25, "two_shape_correct": 0.5},
        "other_audits": {"models/x": {"n": 8, "precision": 0.75, "precision_ci": [0.5, 1.0], "recall": 0.25,
                                      "yes_rate": 0.3, "yes_rate_ci": [0.1, 0.5], "acceptance_rate": 0.1,
                                      "shape_check": {"recall": 0.25, "recall_ci": [0.05, 0.6], "precision": 0.5,
                                                      "precision_ci": [0.2, 0.8], "read_rate": 0.2}}}})
    _model(models, "a-good", "good", single=0.95, two=0.75, steps=4000, warm_steps=1000)
    _model(models, "b-shipped", "shipped", single=0.5, two=0.75, steps=12345, ceiling={"single": 0.98, "two": 0.955})
    _model(models, "c-student", "student", single=0.0, two=0.0, steps=678, distilled=True)
    (tmp_path / "outputs").mkdir()
    readme = _readme(tmp_path / "README.md")
    report.main(["--outputs", str(tmp_path / "outputs"), "--readme", str(readme), "--models", str(models),
                 "--model", str(models / "b-shipped")])
    text = readme.read_text()
    oracle = _block(text, "oracle-numbers")
    assert "| whole-scene accuracy on clean renders (1,234 scenes) | 0.995 | ≥ 0.99 (met) |" in oracle
    assert "| false rejects of clean objects | 0.020 | ≤ 0.01 (**not met**) |" in oracle
    assert "(by recipe: ellipse 1.000, overlap 0.920) | 0.960 | ≥ 0.95 (met) |" in oracle
    assert "0.0500 before temperature scaling) | 0.0125 |" in oracle and "| 0.250 / 0.500 |" in oracle
    assert "| by-eye audit of the filter on `models/x` on 8 generated images: precision [95% CI], recall | 0.750 " \
           "[0.500, 1.000], 0.250 |" in oracle
    rescored = report.oracle_numbers(dict(json.loads((models / "shapes-oracle" / "metrics.json").read_text()),
                                          audit={"n": 8, "precision": 0.5, "precision_ci": None, "recall": 0.25,
                                                 "rescored_from": ["0ld"]}))
    assert "on 8 generated images (labels kept, images re-read by this oracle): precision [95% CI], recall | 0.500 " \
           "n/a, 0.250 |" in "\n".join(rescored)
    assert "precision P(recognisable given read) | 0.250 [0.050, 0.600], 0.500 [0.200, 0.800] |" in oracle
    assert "recognisable by eye, against the filter's acceptance rate | 0.300 [0.100, 0.500] vs 0.100 |" in oracle
    model = _block(text, "model-numbers")
    rows = [line for line in model.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `shipped` (") and rows[1].startswith("| `good` (")  # the shipped model first
    assert [c.strip() for c in rows[0].split("|")[2:-1]] == ["S, 7 steps, guidance 2.0", "12,345", "0.500", "0.500", "0.500", "0.250", "0.750",
                                                              "12.3 (5.0)", "0.980 / 0.955"]
    assert rows[1].endswith("| n/a / n/a |")  # no round trip measured (e.g. before evaluate-model recorded it)
    assert rows[2].startswith("| `student` (") and "| 678 |" in rows[2]
    assert "| 5,000 |" in rows[1]  # 4,000 steps after a warm start from 1,000
    assert "`shipped` **not met**, `good` met, `student` **not met**." in model  # 0.5 < 0.90; 0.95 and 0.75 reach 0.90 and 0.60
    assert "--model shipped` (4 single- and 4 two-object prompts, seed 3, S 7 steps, guidance 2.0, cpu)" in model
    # the study and retrieval blocks have no metrics: left as they are, one note each on stderr
    assert _block(text, "study-numbers") == _block(text, "retrieval-numbers") == "old hand copy 0.999\n"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "study-numbers left as it is" in notes[0] and "retrieval-numbers" in notes[1]


@pytest.mark.parametrize("blocks", [(), BLOCKS[:1], BLOCKS[1:]])
def test_readme_without_every_block_is_an_error_and_stays_unchanged(tmp_path, blocks):
    (tmp_path / "outputs").mkdir()
    readme = _readme(tmp_path / "README.md", blocks)
    before = readme.read_text()
    missing = next(b for b in BLOCKS if b not in blocks)
    with pytest.raises(UserError, match=f"^no <!-- {missing} --> ... <!-- /{missing} --> block to fill$"):
        report.main(["--outputs", str(tmp_path / "outputs"), "--readme", str(readme)])
    assert readme.read_text() == before


@pytest.mark.parametrize("ci_low, acceptance", [(0.02, 0.8), (-0.01, 0.1)])
def test_report_leads_with_the_answer_from_task_d_and_the_model(tmp_path, ci_low, acceptance):
    outputs, model = tmp_path / "outputs", tmp_path / "model"
    d = {"mean": 0.05, "ci95": [ci_low, 0.09]}
    _write(model / "metrics.json", {"single_object_all_correct": 0.035, "two_object_all_correct": 0.0,
                                    "oracle_accuracy_on_renders": 0.98, "fd": 1.0,
                                    "single_object": {"shape": 0.1, "color": 0.9, "position": 0.2},
                                    "fd_real_vs_real": 1.0, "fd_n": 4, "sampler": {"scheduler": "S", "steps": 2,
                                                                                   "guidance": 5.0}})
    _run(outputs, "task_d", {
        "gap": {"gap": {"mean": 0.12, "ci95": [0.04, 0.2]}, "targets": {"mean": 0.34, "ci95": [0.3, 0.4]},
                "others": {"mean": 0.46, "ci95": [0.44, 0.49]}},
        "targets": [{"category": "square", "category_id": 2}, {"category": "heart", "category_id": 6}],
        "closed_fraction": {"synthetic_filtered": {"mean": 0.42, "ci95": [0.1, 0.7]},
                            "rendered": {"mean": 0.9, "ci95": [0.5, 1.2]}},
        "rare_txt2img_R@10_delta": d, "overall_txt2img_R@10_delta": d, "filtered_vs_oversample": {"rare": d},
        "filter": {"acceptance_rate": acceptance, "rule": "r",
                   "per_target": {"square": {"generated": 50, "accepted": 7}, "heart": {"generated": 50, "accepted": 3}}},
        "arms": {"synthetic_filtered": {"n_extra": 10}, "rendered": {"n_extra": 10}}, "seeds": [0, 1, 2],
        "epochs": 3, "targets_met": []})
    text = report.main(["--outputs", str(outputs), "--model", str(model)]).read_text()
    answer = text[text.index("## The answer"):text.index("## The study's generator")]
    assert text.index("## The answer") < text.index("## The study's generator")  # the answer comes first
    assert "**square, heart**" in answer and {"0.340", "0.460", "0.120", "0.420", "0.900"} <= set(
        re.findall(r"\d+\.\d+", answer))
    assert "10 of 100 generated candidates" in answer and "(`rendered`, 10 images)" in answer
    assert "against repeating real target images as often (`oversample`) it is +0.050" in answer
    assert ("did close it" in answer) == (ci_low > 0)  # the verdict follows the CI, not the point estimate
    assert ("The limit is the generator" in answer) == ("0.035" in answer) == (acceptance < 0.5)
