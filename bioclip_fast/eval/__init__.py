"""Evaluation as in the BioCLIP papers: zero-shot (five text types, template averaging), few-shot SimpleShot, and a
logistic-regression linear probe, on image folders + CSV, our shards or the bundled butterflies."""
from bioclip_fast.eval.fewshot import few_shot_eval, simpleshot_predict
from bioclip_fast.eval.linear_probe import linear_probe
from bioclip_fast.eval.zeroshot import (
    TEXT_TYPES,
    class_text,
    encode_images,
    zero_shot_classifier,
    zero_shot_eval,
)

__all__ = ["TEXT_TYPES", "class_text", "encode_images", "few_shot_eval", "linear_probe", "simpleshot_predict",
           "zero_shot_classifier", "zero_shot_eval"]
