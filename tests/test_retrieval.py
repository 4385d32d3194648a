"""retrieval.py: metrics against hand-computed cases, FAISS against brute force, bad inputs, a real run."""

import json
import subprocess
import sys

import numpy as np
import pytest

import retrieval
from utils import UserError, l2_normalize


# --------------------------------------------------------------------------- metrics by hand
def test_ranking_metrics_hand_computed():
    ranked = np.array([[1, 0, 2, 0],     # relevant at ranks 2 and 4 of 2 relevant: AP = (1/2 + 2/4) / 2
                       [3, 1, 2, 4],     # relevant at rank 1: AP = 1
                       [0, 1, 2, 4],     # nothing relevant retrieved: AP = 0
                       [7, 1, 2, 4]])    # 1 of 3 relevant found, at rank 1: AP = 1/3
    query = np.array([0, 3, 5, 7])
    n_rel = np.array([2, 1, 1, 3])
    m = retrieval.ranking_metrics(ranked, query, n_rel, ks=(1, 2, 4))
    np.testing.assert_allclose(m["R@1"], [0, 1, 0, 1])
    np.testing.assert_allclose(m["R@2"], [1, 1, 0, 1])
    np.testing.assert_allclose(m["R@4"], [1, 1, 0, 1])
    np.testing.assert_allclose(m["AP"], [0.5, 1.0, 0.0, 1 / 3])


def test_retrieve_both_on_a_hand_built_case():
    # Two images on the x and y axes; captions 0,1 belong to image 0, captions 2,3 to image 1.
    img = np.array([[1, 0], [0, 1]], np.float32)
    txt = l2_normalize(np.array([[1, 0.1], [0.2, 1], [0.1, 1], [1, 0.3]], np.float32))
    cap2img = np.array([0, 0, 1, 1])
    per_q = retrieval.retrieve_both(img, txt, cap2img)
    # image 0 ranks captions 0, 3, 1, 2 -> relevant (0, 1) at ranks 1 and 3: AP = (1 + 2/3) / 2
    # image 1 ranks captions 2, 1, 3, 0 -> relevant (2, 3) at ranks 1 and 3: AP = (1 + 2/3) / 2
    np.testing.assert_allclose(per_q["img2txt"]["AP"], [5 / 6, 5 / 6])
    np.testing.assert_allclose(per_q["img2txt"]["R@1"], [1, 1])
    # captions 1 and 3 are closer to the other image: txt2img R@1 = 0.5, AP = (1 + 1/2 + 1 + 1/2) / 4
    np.testing.assert_allclose(per_q["txt2img"]["R@1"], [1, 0, 1, 0])
    assert retrieval.summarize(per_q["txt2img"])["mAP"] == pytest.approx(0.75)


def test_per_category_metrics_selects_queries_by_category():
    per_q = {"img2txt": {"R@1": np.array([1.0, 0.0]), "AP": np.array([1.0, 0.2])},
             "txt2img": {"R@1": np.array([1.0, 1.0, 0.0]), "AP": np.array([1.0, 1.0, 0.5])}}
    records = [{"category_ids": [1]}, {"category_ids": [1, 2]}]
    out = retrieval.per_category_metrics(per_q, records, np.array([0, 0, 1]), {1: "star", 2: "ring"}, {1: 40, 2: 3})
    assert out["star"]["img2txt"] == {"R@1": 0.5, "mAP": pytest.approx(0.6)}
    assert out["ring"]["img2txt"] == {"R@1": 0.0, "mAP": pytest.approx(0.2)}
    assert out["ring"]["txt2img"]["R@1"] == 0.0 and out["ring"]["train_count"] == 3


# --------------------------------------------------------------------------- FAISS vs brute force
@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    return l2_normalize(rng.normal(size=(2000, 32))), l2_normalize(rng.normal(size=(100, 32)))


def test_flat_index_equals_brute_force(vectors):
    db, q = vectors
    scores, ids = retrieval.search(retrieval.build_index(db, "flat"), q, 10)
    ref_scores, ref_ids = retrieval.brute_force_search(db, q, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_ivf_searching_every_list_is_exact(vectors):
    db, q = vectors
    index = retrieval.build_index(db, "ivf", nlist=16, nprobe=16)
    _, ids = retrieval.search(index, q, 10)
    np.testing.assert_array_equal(ids, retrieval.brute_force_search(db, q, 10)[1])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(vectors, kind):
    db, q = vectors
    _, ids = retrieval.search(retrieval.build_index(db, kind, nlist=16, nprobe=4), q, 10)
    ref = retrieval.brute_force_search(db, q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall > 0.6


def test_search_caps_k_at_index_size(vectors):
    db, q = vectors
    _, ids = retrieval.search(retrieval.build_index(db[:5]), q, 10)
    assert ids.shape == (100, 5)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags, message", [
    (["--loss", "arcface"], "unknown --loss 'arcface'; choose one of triplet, ntxent"),
    (["--miner", "easy"], "unknown --miner 'easy'"),
    (["--index", "lsh"], "unknown --index 'lsh'; choose one of flat, ivf, hnsw"),
    (["--epochs", "0"], "--epochs must be positive, got 0"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
])
def test_bad_arguments(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        retrieval.parse_args(flags)


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.pkl .run `python generate_data.py` first"):
        retrieval.main(["--data", str(tmp_path / "nope.pkl"), "--outputs", str(tmp_path)])


def test_missing_split(tiny_data, tmp_path):
    with pytest.raises(UserError, match="split 'holdout' not in"):
        retrieval.main(["--data", str(tiny_data), "--eval-split", "holdout", "--outputs", str(tmp_path)])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="retrieval checkpoint not found"):
        retrieval.load_heads(tmp_path / "heads.pt")


def test_unknown_encoders():
    from utils import load_image_encoder, load_text_encoder

    with pytest.raises(UserError, match="unknown image encoder 'vgg'"):
        load_image_encoder("vgg")
    with pytest.raises(UserError, match="cannot load 'no-such-org/no-such-model' offline .* pass a local folder"):
        load_text_encoder("no-such-org/no-such-model")


def test_cli_prints_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "retrieval.py", "--data", str(tmp_path / "x.pkl")],
                         capture_output=True, text=True, cwd=retrieval.Path(retrieval.__file__).parent)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'x.pkl'} "
                                               "(run `python generate_data.py` first)"]


# --------------------------------------------------------------------------- a real (small) run
def test_quick_run_writes_the_output_contract_and_learns(tiny_data, tmp_path):
    metrics = retrieval.main(["--data", str(tiny_data), "--quick", "--outputs", str(tmp_path),
                              "--run-name", "t"])
    run = tmp_path / "retrieval" / "t"
    assert (tmp_path / "retrieval" / "latest").resolve() == run.resolve()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["args"]["loss"] == "triplet"
    for d in ("img2txt", "txt2img"):
        assert set(on_disk[d]) == {"R@1", "R@5", "R@10", "mAP"}
        assert all(0 <= v <= 1 for v in on_disk[d].values())
        assert on_disk[d]["R@1"] <= on_disk[d]["R@5"] <= on_disk[d]["R@10"]
    assert len(on_disk["per_category"]) >= 10
    for cat in on_disk["per_category"].values():
        assert isinstance(cat["train_count"], int)
        assert set(cat["txt2img"]) == {"R@1", "R@5", "R@10", "mAP"}
    # Learning must beat chance clearly: a random caption finds its image in the top 10 with p = 10 / n_images.
    chance = 10 / metrics["n_eval_images"]
    assert metrics["txt2img"]["R@10"] > 3 * chance
    assert (run / "per_category.png").stat().st_size > 0 and (run / "heads.pt").is_file()
    heads, meta = retrieval.load_heads(run / "heads.pt")
    assert meta["dim"] == 256 and meta["image_encoder"] == "efficientnet-lite0"


def test_training_is_deterministic(tiny_data, tmp_path):
    runs = [retrieval.main(["--data", str(tiny_data), "--quick", "--epochs", "2", "--outputs", str(tmp_path),
                            "--val-split", "", "--run-name", f"r{i}"]) for i in range(2)]
    assert runs[0]["txt2img"] == runs[1]["txt2img"]
    assert runs[0]["history"] == runs[1]["history"]
