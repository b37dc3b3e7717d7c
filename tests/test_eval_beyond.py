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


# ---- faithful ports of the reference's scoring, compared on the same features ------------------------------------
def _reference_probe(x_tr, y_tr, x_te, *, seed, lr, epochs, batch_size, eval_every, eval_mode=False):
    """A port of the reference's FishNet/AwA2 `__main__` run loop (src/evaluation/{fishnet,awa2}.py): random_seed,
    init_classifier, a shuffled DataLoader of Features, Adam + BCE + StepLR, the logged evaluation every
    `eval_every` epochs and the final one, with the classifier left in train mode (dropout on) as the reference
    leaves it. `eval_mode=True` is our corrected variant (eval mode when scoring)."""
    import random

    class Features(torch.utils.data.Dataset):
        def __init__(self, x, y, ids):
            self.x, self.y, self.ids = x, y, ids

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i], self.ids[i]

    def evaluate(classifier, dataloader):
        if eval_mode:
            classifier.eval()
        it = iter(dataloader)
        y_pred = []
        for _ in range(len(dataloader)):
            features, labels, ids = next(it)
            with torch.no_grad():
                pred_logits = classifier(features)
            y_pred.append((pred_logits > 0.5).cpu().numpy())
        classifier.train()
        return np.concatenate(y_pred, axis=0)

    train = Features(torch.as_tensor(x_tr), torch.as_tensor(y_tr), np.arange(len(x_tr)))
    test = Features(torch.as_tensor(x_te), torch.zeros(len(x_te), y_tr.shape[1]), np.arange(len(x_te)))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    classifier = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 512), torch.nn.Dropout(0.5),
                                     torch.nn.Linear(512, y_tr.shape[1]))
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    criterion = torch.nn.BCEWithLogitsLoss()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    for epoch in range(epochs):
        it = iter(train_loader)
        for _ in range(len(train_loader)):
            features, labels, _ = next(it)
            loss = criterion(classifier(features), labels.to(dtype=torch.float))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0:
            evaluate(classifier, test_loader)
    return evaluate(classifier, test_loader)


@pytest.mark.parametrize("eval_mode", [False, True])
def test_probe_equals_the_reference_run_loop(eval_mode):
    """Same features, same seed: our probe's test predictions are the reference loop's, draw for draw (weights,
    loader shuffling, dropout during training and, by default, when scoring)."""
    from bioclip_fast.eval.beyond.common import mlp_probe_predict

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(300, 9))
    x = (np.concatenate([y * 1.5 - 0.75, rng.normal(size=(300, 23))], axis=1)
         + 0.5 * rng.normal(size=(300, 32))).astype(np.float32)
    kw = dict(seed=3, lr=1e-3, epochs=12, batch_size=64)
    ours = mlp_probe_predict(x[:220], y[:220], x[220:], eval_every=5, eval_mode=eval_mode, **kw)
    ref = _reference_probe(x[:220], y[:220], x[220:], eval_every=5, eval_mode=eval_mode, **kw)
    assert ours.shape == ref.shape == (80, 9) and (ours == ref.astype(np.int64)).all()
    if not eval_mode:  # dropout on when scoring: not what eval mode gives
        off = mlp_probe_predict(x[:220], y[:220], x[220:], eval_every=5, eval_mode=True, **kw)
        assert (off != ours).any()


def _reference_plantdoc(x_tr, y_tr, x_te, y_te, *, seed, repeats, batch_size=4):
    """A port of the reference's PlantDoc run (src/evaluation/plantdoc.py + simpleshot.py): random_seed(seed), the
    train and test features through shuffled DataLoaders, then per repeat random_seed(seed + r),
    choose_k_per_class(k=1) with numpy's global generator and SimpleShot (sklearn NearestCentroid)."""
    import random

    import sklearn.neighbors

    def random_seed(s):
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)

    def loader_pass(x, y):
        ds = list(zip([str(i) for i in range(len(x))], torch.as_tensor(x), torch.as_tensor(y)))
        feats, labels = [], []
        for ids, xb, yb in torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True):
            feats.append(xb)
            labels.extend(yb)
        return torch.cat(feats).numpy().astype(np.float64), torch.tensor(labels).numpy()

    def choose_k_per_class(labels, k):
        train_indices = np.array([], dtype=int)
        for cls in np.unique(labels):
            cls_indices = np.where(labels == cls)[0]
            np.random.shuffle(cls_indices)
            train_indices = np.concatenate((train_indices, cls_indices[:k]))
        np.random.shuffle(train_indices)
        return train_indices

    def simpleshot(xtr, ytr, xte, yte):
        x_mean = xtr.mean(axis=0, keepdims=True)
        xtr = (xtr - x_mean) / np.linalg.norm(xtr - x_mean, axis=1, keepdims=True)
        xte = (xte - x_mean) / np.linalg.norm(xte - x_mean, axis=1, keepdims=True)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # its unused variance estimate on 1-shot supports
            clf = sklearn.neighbors.NearestCentroid().fit(xtr, ytr)
        d = np.linalg.norm(xte[:, None] - clf.centroids_[None], axis=2)
        return float((d.argmin(1) == yte).mean())

    random_seed(seed)
    tx, ty = loader_pass(x_tr, y_tr)
    ex, ey = loader_pass(x_te, y_te)
    scores = []
    for r in range(repeats):
        random_seed(seed + r)
        i = choose_k_per_class(ty, 1)
        scores.append(simpleshot(tx[i], ty[i], ex, ey))
    return scores


def test_image_folder_lists_what_torchvision_imagefolder_lists(tmp_path):
    """PlantDoc / Herbarium19 samples in the reference's ImageFolder order and count (nested folders, upper-case
    extensions, files ImageFolder ignores), since the reference's draws index into that order."""
    from torchvision.datasets import ImageFolder

    from _fixtures_eval import write_image
    from bioclip_fast.eval.beyond.plantdoc import image_folder

    root = make_plantdoc(tmp_path / "pd", n_train=3)
    write_image(root / "train" / "Apple leaf" / "sub" / "0.jpg", 0, 9)
    write_image(root / "train" / "Apple leaf" / "Z.JPG", 0, 8)
    (root / "train" / "Apple leaf" / "notes.txt").write_text("x")
    write_image(root / "train" / "Corn leaf blight" / "a.gif", 2, 7)
    paths, labels, classes = image_folder(root / "train")
    ref = ImageFolder(str(root / "train"))
    assert [(str(p), int(y)) for p, y in zip(paths, labels)] == [(p, y) for p, y in ref.samples]
    assert classes == ref.classes


def test_plantdoc_draws_follow_the_reference_loader_order():
    """On features where it matters, the reference's draws (over its shuffled loader's order) are ours, and differ
    from drawing over the sorted ImageFolder order."""
    from bioclip_fast.eval.beyond.plantdoc import reference_train_order, simpleshot_repeats

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 4)
    x = rng.normal(size=(5, 16))[y] + 1.5 * rng.normal(size=(20, 16))
    yt = np.repeat(np.arange(5), 6)
    xt = x.mean(0) + rng.normal(size=(30, 16))
    ref = _reference_plantdoc(x, y, xt, yt, seed=0, repeats=5)
    assert simpleshot_repeats(x, y, xt, yt, order=reference_train_order(20, 0), repeats=5, seed=0) == ref
    assert simpleshot_repeats(x, y, xt, yt, order=np.arange(20), repeats=5, seed=0) != ref


def test_plantdoc_published_folders_reference_labels_and_draws(tmp_path, micro):
    """A class only under train/ (as in the published release): refused before; now scored as the reference scores
    it (test labels of a separate ImageFolder, shifted after the missing class), flagged, and the corrected protocol
    on request; the 1-shot draws follow the reference's shuffled-loader order."""
    from bioclip_fast.eval.beyond import plantdoc
    from bioclip_fast.eval.beyond.common import extract_features

    classes = ("Apple leaf", "Corn leaf blight", "Tomato leaf", "Tomato two spotted spider mites leaf",
               "Tomato yellow virus leaf")
    root = make_plantdoc(tmp_path / "plantdoc", classes=classes, n_train=4, n_test=3)
    import shutil

    shutil.rmtree(root / "test" / "Tomato two spotted spider mites leaf")
    res = plantdoc.evaluate(*micro, root, repeats=5, batch_size=8)
    assert res["classes_only_in_train"] == ["Tomato two spotted spider mites leaf"] and res["n_test_classes"] == 4
    assert res["label_protocol"] == "reference" and "corrected_score" in res
    assert any("only under train/" in f and "1 test class(es) carry another class's label" in f
               for f in res["flags"])
    tr_paths, tr_y, _ = plantdoc.image_folder(root / "train")
    te_paths, te_y, te_classes = plantdoc.image_folder(root / "test")
    tr = extract_features(micro[0], micro[1], tr_paths)
    te = extract_features(micro[0], micro[1], te_paths)
    ref = _reference_plantdoc(tr["features"], tr_y, te["features"], te_y, seed=0, repeats=5)
    assert res["runs"] == pytest.approx(ref, abs=1e-12)
    corrected = plantdoc.evaluate(*micro, root, repeats=5, batch_size=8, protocol="corrected")
    by_name = np.array([classes.index(te_classes[j]) for j in te_y])
    ref_named = _reference_plantdoc(tr["features"], tr_y, te["features"], by_name, seed=0, repeats=5)
    assert corrected["runs"] == pytest.approx(ref_named, abs=1e-12)
    assert res["corrected_score"] == pytest.approx(np.mean(ref_named)) and corrected["flags"]


def _reference_fit_mix(u_feats, l_feats, l_targets, k, seed, max_iterations=10, tolerance=1e-4):
    """A port of GCD's K_Means.fit_mix_once (faster_mix_k_means_pytorch.py in the reference), n_init=1."""
    from sklearn.utils import check_random_state

    random_state = check_random_state(seed)
    l_classes = torch.unique(l_targets)
    l_centers = torch.stack([l_feats[l_targets.eq(c).nonzero().squeeze(1)].mean(0) for c in l_classes])
    cat_feats = torch.cat((l_feats, u_feats))
    labels = -torch.ones(len(cat_feats)).long()
    cid2ncid = {int(cid): ncid for ncid, cid in enumerate(l_classes)}
    l_num = len(l_targets)
    for i in range(l_num):
        labels[i] = cid2ncid[int(l_targets[i])]
    c = l_centers
    while c.shape[0] < k:
        d2, _ = torch.min(((u_feats[:, None] - c[None]) ** 2).sum(-1), dim=1)
        cum_prob = torch.cumsum(d2 / d2.sum(), dim=0)
        ind = (cum_prob >= random_state.rand()).nonzero()[0][0]
        c = torch.cat((c, u_feats[ind].view(1, -1)), dim=0)
    centers = c
    best_labels, best_inertia = None, None
    for _ in range(max_iterations):
        centers_old = centers.clone()
        u_mindist, u_labels = torch.min(((u_feats[:, None] - centers[None]) ** 2).sum(-1), dim=1)
        inertia = u_mindist.sum() + torch.sum((l_feats - centers[labels[:l_num]]) ** 2, dim=1).sum()
        labels[l_num:] = u_labels
        for idx in range(k):
            centers[idx] = cat_feats[torch.nonzero(labels == idx).squeeze()].mean(dim=0)
        if best_inertia is None or inertia < best_inertia:
            best_labels, best_inertia = labels.clone(), inertia
        if torch.sum(torch.sqrt(torch.sum((centers - centers_old) ** 2, dim=1))) ** 2 < tolerance:
            break
    return best_labels.numpy()


def test_herbarium19_kmeans_equals_the_reference_fit_mix():
    """Labelled classes that are not 0..L-1 (an Old class without labelled images): renumbered as the reference
    does; the labels are those of the lowest-inertia iteration, equal to the reference's."""
    from bioclip_fast.eval.beyond.herbarium19 import semi_supervised_kmeans

    rng = np.random.default_rng(2)
    centers = rng.normal(size=(7, 6)) * 3
    truth = np.repeat(np.arange(7), 12)
    x = centers[truth] + rng.normal(size=(84, 6))
    lab = np.isin(truth, [1, 3, 6]) & (np.arange(84) % 12 < 8)
    for seed in range(4):
        ours = semi_supervised_kmeans(x[~lab], x[lab], truth[lab], 7, seed=seed)
        ref = _reference_fit_mix(torch.as_tensor(x[~lab]), torch.as_tensor(x[lab]), torch.as_tensor(truth[lab]), 7,
                                 seed)
        assert (ours == ref).all()
        assert set(ours[: lab.sum()].tolist()) == {0, 1, 2}  # labelled classes 1, 3, 6 renumbered 0, 1, 2
