"""The BioCLIP 2 paper's beyond-species benchmarks, each reading its published layout from a local folder
(layouts: each module's docstring and docs/evaluation.md):

* :mod:`.fishnet` — habitat / trait MLP probe, BCE, exact-match accuracy;
* :mod:`.newt` — 164 binary tasks, randomized SVM search, pooled accuracy;
* :mod:`.awa2` — attribute MLP probe, macro-F1;
* :mod:`.herbarium19` — semi-supervised k-means, clustering accuracy;
* :mod:`.plantdoc` — 1-shot SimpleShot accuracy.

Each module has ``evaluate(model, preprocess, root, ...) -> dict`` with ``score`` (mean over runs, a fraction),
``std``, ``runs``, ``metric``, ``protocol`` and ``skipped`` (unreadable images, listed).
"""
BENCHMARKS = ("fishnet", "newt", "awa2", "herbarium19", "plantdoc")
