"""Zero-shot, few-shot (SimpleShot) and linear-probe evaluation of one model on one labelled image set (what
`bioclip-fast eval` runs per checkpoint), the check of class sizes before any model is loaded, and the summary row
and notes of its report."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from bioclip_fast.eval.options import EvalOptions
from bioclip_fast.eval.report import skipped_summary

TASKS = ("zeroshot", "fewshot", "linear")


def _split_half(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 50/50 split of indices (train, test); singleton classes go to train."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        h = (len(idx) + 1) // 2
        tr.extend(idx[:h])
        te.extend(idx[h:])
    return np.sort(np.array(tr, dtype=np.int64)), np.sort(np.array(te, dtype=np.int64))


def _task_failure(options: EvalOptions, errors: dict[str, str], task: str, exc: BaseException) -> None:
    """Record a task that could not run (one line; the other tasks go on); ``--debug`` re-raises."""
    from bioclip_fast.errors import one_line

    if options.debug:
        raise exc
    errors[task] = one_line(exc)
    print(f"warning: {task} not computed: {errors[task]}", file=sys.stderr)


def topk_notes(n_classes: int) -> list[str]:
    """What a reader must know beside top-k accuracies on few classes: k >= classes makes top-k 100% by design."""
    trivial = [k for k in (3, 5) if k >= n_classes]
    if not trivial:
        return []
    ks = " and ".join(f"top-{k}" for k in trivial)
    return [f"{ks} {'are' if len(trivial) > 1 else 'is'} 100% by construction: only {n_classes} classes "
            f"(k ≥ the number of classes)"]


def evaluate_checkpoint(ckpt: Path | str, options: EvalOptions, tasks: list[str], device: str) -> dict[str, Any]:
    """Every task in ``tasks`` for one model. A task that cannot run (too few images per class for a k, a class
    absent from the training data, ...) is recorded under ``errors`` with its reason and the other tasks go on."""
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.fewshot import few_shot_eval, reference_few_shot_eval
    from bioclip_fast.eval.linear_probe import linear_probe
    from bioclip_fast.eval.zeroshot import class_name, classification_metrics, encode_images, zero_shot_logits
    from bioclip_fast.errors import UsageError
    from bioclip_fast.model import load_model

    expected = (UsageError, OSError, ValueError)
    model, preprocess, tokenizer, meta = load_model(ckpt, model_name=options.model_name, device=device)
    common = dict(preprocess=preprocess, model=model, tokenizer=tokenizer, batch_size=options.batch_size,
                  root=options.root, image_column=options.image_column, label_column=options.label_column,
                  num_workers=options.workers, device=device)
    data = load_eval_data(options.data, split=options.split, **common)
    names = [class_name(c) for c in data.classes]
    result: dict[str, Any] = {"checkpoint": str(ckpt), "data": data.description, "n_classes": len(names)}
    errors: dict[str, str] = {}
    enc = None
    if "zeroshot" in tasks:
        try:
            zs = zero_shot_logits(model, tokenizer, data.loader, data.classes, text_types=options.text_types,
                                  templates=options.templates, device=device, progress=options.progress)
            enc = zs
            metrics = classification_metrics(zs["logits"], zs["labels"], data.classes)
            metrics["by_text_type"] = {
                tt: {k: v for k, v in classification_metrics(lg, zs["labels"], data.classes).items()
                     if k in ("top1", "top3", "top5")}
                for tt, lg in zs["logits_by_text_type"].items()
            }
            metrics["text_types"] = list(zs["logits_by_text_type"])
            metrics["templates"] = options.templates
            metrics["classes"] = len(names)
            metrics["chance_top1"] = 1.0 / len(names)
            metrics["notes"] = topk_notes(len(names))
            result["zeroshot"] = metrics
            result["_confusion"] = (zs["logits"].argmax(1).numpy(), zs["labels"].numpy(), names)
        except expected as e:
            _task_failure(options, errors, "zeroshot", e)
    if enc is None:
        enc = encode_images(model, data.loader, device=device, desc="eval: images", progress=options.progress)
    if enc["labels"] is None:
        raise ValueError(f"{options.data}: the loader yields no labels")
    skipped = list(enc.get("skipped", []))
    feats = enc["features"].numpy()
    labels = np.array([names[i] for i in enc["labels"].tolist()], dtype=object)

    reference = options.fewshot_protocol == "reference"
    if "fewshot" in tasks and reference:
        try:
            shots = list(options.shots)
            result["fewshot"] = reference_few_shot_eval(feats, labels.astype(str), shots=shots, folds=options.folds,
                                                        rare_classes="leave_out")
            result["fewshot_protocol"] = ("reference: k per class per fold (random.seed(fold)) from --data, rest "
                                          "queried; classes with fewer than k images left out of that k")
            for k, v in result["fewshot"].items():
                if v.get("error"):
                    errors[f"fewshot {k}"] = v["error"]
                if v.get("left_out"):
                    print(f"warning: {k}: left out {len(v['left_out'])} class(es) with fewer than {k.split('-')[0]} "
                          f"images: {', '.join(v['left_out'][:5])}" + (" ..." if len(v["left_out"]) > 5 else ""),
                          file=sys.stderr)
        except expected as e:
            _task_failure(options, errors, "fewshot", e)
    if ("fewshot" in tasks and not reference) or "linear" in tasks:
        # the bundled train split is disjoint from val only; other splits fall back to a held-out half
        try:
            if options.train_data or (options.data == "butterflies" and options.split == "val"):
                src = options.train_data or "butterflies"
                tdata = load_eval_data(src, split="train", **common)
                tenc = encode_images(model, tdata.loader, device=device, desc="eval: support images",
                                     progress=options.progress)
                skipped += tenc.get("skipped", [])
                tnames = [class_name(c) for c in tdata.classes]
                tr_x = tenc["features"].numpy()
                tr_y = np.array([tnames[i] for i in tenc["labels"].tolist()], dtype=object)
                te_x, te_y = feats, labels
                result["train_data"] = tdata.description
            else:
                tr, te = _split_half(labels.astype(str), options.seed)
                tr_x, tr_y, te_x, te_y = feats[tr], labels[tr], feats[te], labels[te]
                result["train_data"] = f"stratified half of {data.description} (seed {options.seed})"
            shared = np.isin(te_y.astype(str), np.unique(tr_y.astype(str)))
            if not shared.all():
                print(f"warning: {int((~shared).sum())} test images of classes absent from the training data are "
                      "left out of few-shot / linear probe", file=sys.stderr)
            te_x, te_y = te_x[shared], te_y[shared]
            tr_y, te_y = tr_y.astype(str), te_y.astype(str)
        except expected as e:
            for task in ("fewshot",) * ("fewshot" in tasks and not reference) + ("linear",) * ("linear" in tasks):
                _task_failure(options, errors, task, e)
        else:
            if "fewshot" in tasks and not reference:
                try:
                    shots = list(options.shots)
                    result["fewshot"] = few_shot_eval(tr_x, tr_y, te_x, te_y, shots=shots, folds=options.folds,
                                                      seed=options.seed)
                    result["fewshot_protocol"] = "split: support from the training data, queries the held-out images"
                except expected as e:
                    _task_failure(options, errors, "fewshot", e)
            if "linear" in tasks:
                try:
                    lp = linear_probe(tr_x, tr_y, te_x, te_y, seed=options.seed)
                    n_cls = len(np.unique(tr_y))
                    result["linear"] = {k: v for k, v in lp.items() if k not in ("probabilities", "classes")}
                    result["linear"].update(classes=n_cls, chance_top1=1.0 / n_cls)
                except expected as e:
                    _task_failure(options, errors, "linear", e)
    result["skipped_images"] = skipped_summary(skipped)
    if errors:
        result["errors"] = errors
    return result


def check_class_counts(options: EvalOptions, tasks: list[str]) -> None:
    """Before any model is loaded: read the labels of a CSV / image-folder ``--data`` (a bad label or image column
    is an error now) and say which classes are too small for which k, and how to include them."""
    from bioclip_fast.eval.datasets import ImageCsvDataset, image_folder_rows, read_csv_rows

    if "fewshot" not in tasks or options.fewshot_protocol != "reference":
        return
    src = str(options.data)
    if src.lower().endswith(".csv"):
        rows, label_column = read_csv_rows(src), options.label_column
        root = Path(options.root or Path(src).resolve().parent)
    elif src != "butterflies" and Path(src).is_dir() and not any(Path(src).glob("*.tar")):
        rows, root, label_column = image_folder_rows(src), Path(src), options.label_column or "label"
    else:
        return
    ds = ImageCsvDataset(rows, root, image_column=options.image_column, label_column=label_column)
    counts = np.bincount(np.asarray(ds.labels), minlength=len(ds.class_labels))
    for k in options.shots:
        rare = [(ds.class_labels[i], int(counts[i])) for i in np.flatnonzero(counts < k)]
        if rare:
            listed = ", ".join(f"{c} ({n})" for c, n in rare[:5]) + (" ..." if len(rare) > 5 else "")
            print(f"warning: {k}-shot: {len(rare)} of {len(counts)} classes have fewer than {k} images: {listed}; "
                  f"{k}-shot is computed over the other {len(counts) - len(rare)} classes and the ones left out are "
                  f"named in the results (to score them, lower --shots to {int(counts.min())} or add images)",
                  file=sys.stderr)


def summary_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "classes": r.get("n_classes")}
    if r.get("n_classes"):
        row["chance top-1"] = 1.0 / r["n_classes"]
    if "zeroshot" in r:
        row.update({"zero-shot top-1": r["zeroshot"]["top1"], "zero-shot top-3": r["zeroshot"]["top3"],
                    "zero-shot top-5": r["zeroshot"]["top5"], "n": r["zeroshot"]["n"]})
    for k, v in r.get("fewshot", {}).items():
        row[f"{k} top-1"] = v["top1"]
        if v.get("left_out"):
            row[f"{k} classes"] = v.get("classes")
    if "linear" in r:
        row["linear probe top-1"] = r["linear"]["top1"]
    row["skipped images"] = r.get("skipped_images", {}).get("count", 0)
    return row


def report_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """The lines a reader needs beside the table: chance level of what was scored, top-k that are trivial, classes
    left out of a k-shot task, tasks not computed."""
    notes = []
    for name, r in results.items():
        n = r.get("n_classes")
        if n:
            notes.append(f"{name}: chance (top-1) = 1/{n} = {100 / n:.1f}% over the {n} classes scored")
            if "zeroshot" in r:
                notes += [f"{name}: zero-shot {t}" for t in topk_notes(n)]
        for k, v in r.get("fewshot", {}).items():
            if v.get("left_out"):
                c = v.get("classes")
                notes.append(f"{name}: {k} scored over {c} classes (chance {100 / c:.1f}%)" if c and v.get("top1")
                             is not None else f"{name}: {k} not scored")
                notes[-1] += (f"; left out, fewer than {k.split('-')[0]} images: {', '.join(v['left_out'])}")
        for task, e in r.get("errors", {}).items():
            notes.append(f"{name}: {task} not computed: {e}")
    return notes
