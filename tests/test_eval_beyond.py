"""The five beyond-species evaluators on tiny fixtures in their published layouts, end to end with a micro model,
plus their classifiers and metrics checked against hand computations."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from _fixtures_eval import (corrupt, make_awa2, make_fishnet, make_herbarium19, make_newt, make_plantdoc,
                            reference_fishnet_rows)
from bioclip_fast.errors import DataError


@pytest.fixture(scope="module")
def micro():
    from bioclip_fast.model import create_model, image_transform

    torch.manual_seed(0)
    model = create_model("bioclip-micro").eval()
    return model, image_transform(model)


def test_mlp_probe_learns_separable_attributes():
    from bioclip_fast.eval.beyond.common import mlp_probe_predict

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 4))
    x = np.concatenate([y * 2.0 - 1.0, np.zeros((200, 12))], axis=1) + 0.1 * rng.normal(size=(200, 16))
    pred = mlp_probe_predict(x[:150], y[:150], x[150:], epochs=30, lr=2e-2, seed=0)
    assert pred.shape == (50, 4) and set(np.unique(pred)) <= {0, 1}
    assert np.all(pred == y[150:], axis=1).mean() > 0.9
    again = mlp_probe_predict(x[:150], y[:150], x[150:], epochs=30, lr=2e-2, seed=0)
    assert (again == pred).all()  # seeded: the same run twice gives the same predictions
    state = torch.random.get_rng_state()
    mlp_probe_predict(x[:10], y[:10], x[:2], epochs=1, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


def test_fishnet_end_to_end(tmp_path, micro):
    from bioclip_fast.eval.beyond import fishnet
    from bioclip_fast.eval.beyond.common import extract_features, mlp_probe_predict

    root = make_fishnet(tmp_path / "fishnet")
    paths, y, _ = fishnet.read_split(root, "train")
    assert len(paths) == 16 and y.shape == (16, 9)  # the row with an empty target is dropped
    assert y[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0]  # pelagic -> 1; marine -> saltwater
    assert paths[0] == root / "Image_Library" / "Family0" / "train_0.jpg"  # file name of `image`, folder `Folder`
    for split in ("train", "test"):  # the published header read as the reference reads it (after with_row_index)
        p, t, _ = fishnet.read_split(root, split)
        ref = reference_fishnet_rows(root / f"{split}.csv")
        assert [(q.name, q.parent.name, list(v)) for q, v in zip(p, t.tolist())] == ref
    res = fishnet.evaluate(*micro, root, runs=2, epochs=5)
    assert res["n_train"] == 16 and res["n_test"] == 8 and len(res["runs"]) == 2
    # the score is the exact-match accuracy of the seeded probe on raw features
    tr = extract_features(micro[0], micro[1], paths, normalize=False)
    te_paths, te_y, _ = fishnet.read_split(root, "test")
    te = extract_features(micro[0], micro[1], te_paths, normalize=False)
    pred = mlp_probe_predict(tr["features"], y, te["features"], epochs=5, seed=1)
    assert res["runs"][1] == pytest.approx(np.all(pred == te_y, axis=1).mean())
    assert set(res["attribute_accuracy"]) == set(fishnet.TARGETS)
    (root / "test.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="FishNet columns"):
        fishnet.evaluate(*micro, root, runs=1, epochs=1)


def test_awa2_end_to_end_and_reference_f1(tmp_path, micro):
    from sklearn.metrics import f1_score

    from bioclip_fast.eval.beyond import awa2

    root = make_awa2(tmp_path / "awa2")
    paths, y, cls = awa2.read_split(root, "test")
    assert sorted(set(cls)) == ["beaver", "dalmatian"] and y.shape == (8, 85)  # "4<TAB>beaver" lines parsed
    # the reference's labels=np.unique(y_true) selects attribute columns 0 and 1 of the multi-label targets
    rng = np.random.default_rng(1)
    yt, yp = rng.integers(0, 2, (30, 85)), rng.integers(0, 2, (30, 85))
    by_hand = np.mean([f1_score(yt[:, j], yp[:, j]) for j in (0, 1)])
    assert awa2.reference_macro_f1(yt, yp) == pytest.approx(by_hand)
    res = awa2.evaluate(*micro, root, runs=1, epochs=5)
    assert res["n_train"] == 12 and res["n_test"] == 8 and res["n_attributes"] == 85
    assert 0 <= res["score"] <= 1 and 0 <= res["macro_f1_all_attributes"] <= 1
    (root / "testclasses.txt").write_text("unicorn\n")
    with pytest.raises(DataError, match="unicorn"):
        awa2.evaluate(*micro, root, runs=1, epochs=1)


def test_newt_end_to_end(tmp_path, micro):
    from bioclip_fast.eval.beyond import newt

    root = make_newt(tmp_path / "newt")
    res = newt.evaluate(*micro, root, runs=2, n_iter=3)
    assert res["n_tasks"] == 2 and res["n_test"] == 8 and res["n_train"] == 20
    assert set(res["by_cluster"]) == {"appearance", "behavior"} and len(res["runs"]) == 2
    # pooled accuracy = the test-size-weighted mean of the per-cluster accuracies (equal sizes here)
    assert res["score"] == pytest.approx(np.mean(list(res["by_cluster"].values())))
    assert newt.evaluate(*micro, root, runs=2, n_iter=3)["runs"] == res["runs"]  # seeded search


def test_herbarium19_kmeans_and_cluster_accuracy():
    from bioclip_fast.eval.beyond.herbarium19 import cluster_acc, semi_supervised_kmeans

    y = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_acc(y, np.array([2, 2, 0, 0, 1, 1])).all()  # a relabelling is fully correct
    assert cluster_acc(y, np.array([0, 1, 1, 1, 2, 2])).tolist() == [True, False, True, True, True, True]
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    truth = np.repeat(np.arange(4), 10)
    x = centers[truth] + rng.normal(size=(40, 8))
    lab = np.isin(np.arange(40), [0, 1, 2, 10, 11, 12])  # classes 0 and 1 partly labelled; 2 and 3 unseen
    labels = semi_supervised_kmeans(x[~lab], x[lab], truth[lab], 4, seed=0)
    assert (labels[: lab.sum()] == truth[lab]).all()  # labelled images keep their class
    assert cluster_acc(truth[~lab], labels[lab.sum():]).all()


def test_herbarium19_end_to_end_and_safe_split_file(tmp_path, micro):
    from bioclip_fast.eval.beyond import herbarium19

    root = make_herbarium19(tmp_path / "herb")
    res = herbarium19.evaluate(*micro, root, runs=2)
    # Old classes 0, 2, 4: 15 images, 80% labelled = 12; the rest of the 30 are unlabelled
    assert res["n_labelled"] == 12 and res["n_unlabelled"] == 18 and res["k"] == 6
    assert res["class_split"].endswith("class_splits.json") and 0 <= res["score"] <= 1
    (root / "class_splits.json").unlink()
    with open(root / "herbarium_19_class_splits.pkl", "wb") as f:
        pickle.dump({"Old": np.array([0, 1, 2]), "New": np.array([3, 4, 5])}, f)
    assert herbarium19.evaluate(*micro, root, runs=1)["n_labelled"] == 12
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "herbarium_19_class_splits.pkl", "wb") as f:
        pickle.dump({"Old": Evil()}, f)
    with pytest.raises(DataError, match="refusing to load"):
        herbarium19.evaluate(*micro, root, runs=1)
    (root / "herbarium_19_class_splits.pkl").unlink()
    assert "NOT the reference split" in herbarium19.evaluate(*micro, root, runs=1)["class_split"]


def test_plantdoc_end_to_end_with_an_unreadable_image(tmp_path, micro):
    from bioclip_fast.eval.beyond import plantdoc

    root = make_plantdoc(tmp_path / "plantdoc")
    corrupt(root / "test" / "Apple leaf" / "0.jpg", "truncated")
    res = plantdoc.evaluate(*micro, root, repeats=3)
    assert res["n_classes"] == 3 and res["n_test"] == 8 and len(res["runs"]) == 3
    assert [s["image"] for s in res["skipped"]] == [str(root / "test" / "Apple leaf" / "0.jpg")]
    pick = plantdoc.choose_k_per_class(np.array([0, 0, 1, 1, 1, 2]), 1, np.random.RandomState(0))
    assert sorted(np.array([0, 0, 1, 1, 1, 2])[pick].tolist()) == [0, 1, 2]
    with pytest.raises(DataError, match="train"):
        plantdoc.evaluate(*micro, tmp_path / "nowhere")
