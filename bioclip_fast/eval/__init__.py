"""Evaluation as in the BioCLIP 2 reference: zero-shot (reference naming rules, 81 templates, top-1/3/5), few-shot
SimpleShot (the reference's per-fold draws), a logistic-regression linear probe, the beyond-species benchmarks
(:mod:`bioclip_fast.eval.beyond`) and the paper's suite (:mod:`bioclip_fast.eval.suite`), on image folders + CSV (ours
or the reference's conventions), our shards or the bundled butterflies. Protocol and layouts: docs/evaluation.md."""
from bioclip_fast.eval.fewshot import few_shot_eval, reference_few_shot_eval, simpleshot_predict
from bioclip_fast.eval.linear_probe import linear_probe
from bioclip_fast.eval.naming import ReferenceTaxon
from bioclip_fast.eval.zeroshot import (
    TEXT_TYPES,
    class_text,
    encode_images,
    zero_shot_classifier,
    zero_shot_eval,
)

__all__ = ["TEXT_TYPES", "ReferenceTaxon", "class_text", "encode_images", "few_shot_eval", "linear_probe",
           "reference_few_shot_eval", "simpleshot_predict", "zero_shot_classifier", "zero_shot_eval"]
