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


# --------------------------------------------------------------------------- category level by hand
def test_category_level_metrics_hand_computed():
    # images: 0 {A}, 1 {B}, 2 {A, B}, 3 {} (no category)
    has = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    ranked = np.array([[1, 2, 0, 3],    # query of image 0 (A): A-images 2, 0 at ranks 2, 3; R = 2
                       [3, 0, 1, 2],    # query of image 2 (A, B)
                       [0, 1, 2, 3]])   # query of image 3: nothing to share, undefined
    m = retrieval.category_level_metrics(ranked, np.array([0, 2, 3]), has, np.ones(4), ks=(1, 2, 4))
    # overall: relevant = shares any queried category. q0: rel 0,1,1,0, R=2 -> mAP@R = (1/2) / 2
    # q1: rel 0,1,1,1, R=3 -> (1/2 + 2/3) / 3
    np.testing.assert_allclose(m["R@1"], [0, 0, np.nan])
    np.testing.assert_allclose(m["R@2"], [1, 1, np.nan])
    np.testing.assert_allclose(m["mAP@R"], [0.25, 7 / 18, np.nan])
    by = m["by_category"]
    # by A: q0 as above; q1 rel 0,1,0,1 with R_A = 2 -> 0.25. By B: q0 does not ask; q1 rel 0,0,1,1 -> 0 in R_B = 2
    np.testing.assert_allclose(by["mAP@R"], [[0.25, np.nan], [0.25, 0.0], [np.nan, np.nan]])
    np.testing.assert_allclose(by["R@2"], [[1, np.nan], [1, 0], [np.nan, np.nan]])
    np.testing.assert_allclose(by["R@4"], [[1, np.nan], [1, 1], [np.nan, np.nan]])


def test_category_level_counts_every_caption_of_an_image_for_img2txt():
    # image 0 {A} queries captions owned by images 2, 1, 0, 0; A-captions: two of image 0, one of image 2: R = 3
    has = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    m = retrieval.category_level_metrics(np.array([[2, 1, 0, 0]]), np.array([0]), has, np.array([2, 1, 1]), ks=(1,))
    np.testing.assert_allclose(m["mAP@R"], [(1 + 2 / 3) / 3])


def test_map_at_r_equals_pytorch_metric_learning_on_single_label_data():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=80)
    centres = rng.normal(size=(5, 16))
    img = l2_normalize(centres[labels] + rng.normal(scale=1.5, size=(80, 16)))
    cap2img = np.repeat(np.arange(80), 2)
    txt = l2_normalize(centres[labels[cap2img]] + rng.normal(scale=1.5, size=(160, 16)))
    per_q = retrieval.retrieve_both(img, txt, cap2img, has=np.eye(5, dtype=bool)[labels], cat_ids=range(5))
    ours = retrieval.summarize(per_q["category"]["txt2img"])
    pml = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count",
                             device=__import__("torch").device("cpu")).get_accuracy(txt, labels[cap2img], img, labels)
    assert ours["mAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert 0.2 < ours["mAP@R"] < 0.95  # neither trivial nor perfect: the comparison can fail


def test_per_category_metrics_report_the_category_level_beside_the_instance_level():
    img = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    txt = l2_normalize(np.array([[0.95, 0.05], [1, 0], [0, 1]], np.float32))  # caption 0 is image 1's twin
    records = [{"category_ids": [7]}, {"category_ids": [7]}, {"category_ids": [9]}]
    cap2img = np.array([0, 1, 2])
    has = retrieval.category_matrix(records, [7, 9])
    per_q = retrieval.retrieve_both(l2_normalize(img), txt, cap2img, has=has, cat_ids=[7, 9])
    out = retrieval.per_category_metrics(per_q, records, cap2img, {7: "cat", 9: "dog"}, {})
    assert out["cat"]["txt2img"]["R@1"] == 0.5  # caption 0 ranks image 1 first: an instance miss
    assert out["cat"]["category_level"]["txt2img"]["R@1"] == 1.0  # ... but an image of the same category
    assert out["dog"]["category_level"]["txt2img"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP@R": 1.0}


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
    (["--head-threads", "-1"], "--head-threads must be >= 0, got -1"),
])
def test_bad_arguments(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        retrieval.parse_args(flags)


def test_heads_train_with_head_threads_and_give_the_threads_back():
    import torch

    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((8, 6), dtype=np.float32), rng.standard_normal((16, 4), dtype=np.float32)
    seen, before = [], torch.get_num_threads()
    args = retrieval.parse_args(["--epochs", "1", "--batch-size", "4", "--hidden", "8", "--dim", "4",
                                 "--head-threads", "1"])
    torch.set_num_threads(2)
    try:
        retrieval.train_heads(img, txt, np.repeat(np.arange(8), 2), args, on_epoch=lambda *_: seen.append(
            torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_adamw_impl_trains_the_same_heads():
    """--adamw-impl changes how the update runs, not what it computes: the same seed gives the same heads."""
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((32, 6), dtype=np.float32), rng.standard_normal((64, 4), dtype=np.float32)
    weights = {}
    for impl in retrieval.ADAMW_IMPLS:
        args = retrieval.parse_args(["--epochs", "3", "--batch-size", "8", "--hidden", "8", "--dim", "4",
                                     "--adamw-impl", impl, "--head-threads", "1"])
        heads, history = retrieval.train_heads(img, txt, np.repeat(np.arange(32), 2), args)
        weights[impl] = np.concatenate([p.detach().numpy().ravel() for p in heads.parameters()])
        assert history[-1]["loss"] < history[0]["loss"]  # it learns
    for impl in ("foreach", "loop"):
        np.testing.assert_allclose(weights[impl], weights["fused"], rtol=1e-4, atol=1e-5)


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


def test_text_features_do_not_depend_on_batching_or_padding():
    """Length-sorted batches give each text the features it gets alone (no padding), in the input order."""
    import numpy as np

    from utils import encode_texts, load_text_encoder

    tokenizer, model, _ = load_text_encoder()
    texts = ["a large red circle in the top left and a small blue square in the bottom right", "a star",
             "two shapes: a green heart to the left of a purple ring", "a cyan cross", "", "an image of a yellow arrow"]
    batched = encode_texts(tokenizer, model, texts, batch_size=4)
    alone = np.concatenate([encode_texts(tokenizer, model, [t], batch_size=1) for t in texts])
    assert batched.shape == (len(texts), 384)
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    assert encode_texts(tokenizer, model, []).shape == (0, 384)


def test_offline_torchvision_weights_name_their_url_and_folder_without_a_download(tmp_path, monkeypatch):
    import torch

    from utils import load_image_encoder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    with pytest.raises(UserError) as err:
        load_image_encoder("torchvision:resnet18", "cpu")
    assert str(err.value) == (f"cannot load 'torchvision:resnet18' offline (HF_HUB_OFFLINE): its weights come from "
                              f"{url} and are not in torch.hub's cache; download that file while online and put it "
                              f"at {tmp_path / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'} (TORCH_HOME moves "
                              "the cache)")
    with pytest.raises(UserError, match="^unknown torchvision model 'resnet0'$"):
        load_image_encoder("torchvision:resnet0", "cpu")


def test_failed_torchvision_download_says_where_the_file_goes(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    import utils

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(utils, "_offline", lambda: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models, "get_model", unreachable)
    with pytest.raises(UserError, match=r"^cannot load 'torchvision:resnet18': downloading its weights from "
                                        r"https://download\.pytorch\.org/models/resnet18-f37072fd\.pth failed "
                                        r"\(URLError\); .* put it at .*hub/checkpoints/resnet18-f37072fd\.pth"):
        utils.load_image_encoder("torchvision:resnet18", "cpu")


def test_offline_timm_weights_name_their_hub_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from utils import load_image_encoder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError) as err:
        load_image_encoder("timm:resnet18", "cpu")
    message = str(err.value)
    assert message.startswith("cannot load 'timm:resnet18' (")
    assert "Hugging Face Hub repo timm/resnet18.a1_in1k" in message
    assert "`hf download timm/resnet18.a1_in1k`" in message and "huggingface-cli" not in message
    with pytest.raises(UserError, match="^unknown timm model 'resnet0'$"):
        load_image_encoder("timm:resnet0", "cpu")


def test_encode_images_resizes_each_image_of_any_size_and_mode_before_batching(tmp_path):
    import torch
    from PIL import Image

    from utils import encode_images

    # A "backbone" that returns each channel's mean: features are the normalised colour, checkable by hand.
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # encode_images reads the device from one
    info = {"res": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "dim": 3}
    Image.new("RGB", (64, 48), (255, 0, 128)).save(tmp_path / "landscape.jpg", quality=100)
    Image.new("L", (30, 90), 51).save(tmp_path / "portrait_grey.png")
    images = [tmp_path / "landscape.jpg", tmp_path / "portrait_grey.png", np.full((5, 7, 3), 204, np.uint8)]
    feats = encode_images(model, info, images, batch_size=8)
    expected = (np.array([[255, 0, 128], [51, 51, 51], [204, 204, 204]]) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(feats, expected, atol=0.03)


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
    assert json.loads((run / "config.json").read_text())["args"]["loss"] == "ntxent"  # the tuned default
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
    for d in ("img2txt", "txt2img"):
        assert set(on_disk["category_level"][d]) == {"R@1", "R@5", "R@10", "mAP@R"}
        assert on_disk["category_level"][d]["R@10"] >= on_disk[d]["R@10"]  # any image of the category counts
    assert all(set(c["category_level"]["txt2img"]) == {"R@1", "R@5", "R@10", "mAP@R"}
               for c in on_disk["per_category"].values())
    assert on_disk["figures"] == {"per_category.png": "written"}
    assert "same category" in (run / "results.md").read_text()
    assert (run / "per_category.png").stat().st_size > 0 and (run / "heads.pt").is_file()
    heads, meta = retrieval.load_heads(run / "heads.pt")
    assert meta["dim"] == 128 and meta["image_encoder"] == "efficientnet-lite0"  # the tuned embedding size


def test_training_is_deterministic(tiny_data, tmp_path):
    runs = [retrieval.main(["--data", str(tiny_data), "--quick", "--epochs", "2", "--outputs", str(tmp_path),
                            "--val-split", "", "--run-name", f"r{i}"]) for i in range(2)]
    assert runs[0]["txt2img"] == runs[1]["txt2img"]
    assert runs[0]["history"] == runs[1]["history"]


def test_a_failing_figure_is_one_warning_line_after_metrics_and_latest(tiny_data, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("Cannot use scipy.linalg.eigh for sparse A with k >= N. Use scipy.linalg.eigh(A.toarray())")

    monkeypatch.setattr(retrieval, "plot_per_category", broken)
    metrics = retrieval.main(["--data", str(tiny_data), "--quick", "--epochs", "1", "--max-eval", "20",
                              "--outputs", str(tmp_path), "--run-name", "broken"])
    run = tmp_path / "retrieval" / "broken"
    assert (tmp_path / "retrieval" / "latest").resolve() == run.resolve()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["txt2img"] == metrics["txt2img"] and not (run / "per_category.png").exists()
    assert on_disk["figures"]["per_category.png"].startswith("failed: TypeError: Cannot use scipy.linalg.eigh")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "per_category.png" in line]
    assert warnings == ["warning: per_category.png not written (TypeError: Cannot use scipy.linalg.eigh for sparse A "
                        "with k >= N. Use scipy.linalg.eigh(A.toarray()))"]
