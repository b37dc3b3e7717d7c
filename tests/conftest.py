"""Shared test setup.

Without a GPU, TRITON_INTERPRET=1 is set before triton is first imported, so the Triton kernels run on CPU tensors
(CI). With a GPU the real kernels run and the `gpu`-marked tests are enabled.
"""
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# A full run that collects fewer tests than this means a test module failed to import or was lost: fail loudly
# instead of passing on a fraction of the suite (pytest's own "no tests" exit 5 is the degenerate case).
MIN_TESTS_FULL_RUN = 20


def pytest_collection_finish(session):
    args = session.config.invocation_params.args
    full_run = not any(a for a in args if not a.startswith("-")) and not session.config.option.keyword
    if full_run and len(session.items) < MIN_TESTS_FULL_RUN:
        raise pytest.UsageError(
            f"only {len(session.items)} tests collected (expected >= {MIN_TESTS_FULL_RUN}); a test module is missing"
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- trained model shared by the eval/analysis/predict tests (owned by the training tests) -------------------------
# A fixed step count (not a wall-clock budget) so the model, and the tests' accuracy checks, do not depend on how
# busy the machine is: ~1 minute on 2 idle cores.
TRAINED_MODEL_STEPS = 90


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """Run dir of a short `bioclip-fast train` default run (tiny model, bundled butterflies, 90 steps: ~1 min on 2 cores).

    Contains `model.pt` (bioclip_fast.model.save_model format; meta["classes"] = the class list as dicts,
    meta["class_names"] = scientific names), `results.json` (with zero-shot top-1 on the val split),
    `metrics.jsonl`, `loss.png` and `checkpoints/`. Stable API: returns a pathlib.Path.
    """
    from bioclip_fast.train.config import resolve_config
    from bioclip_fast.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained_model")
    cfg = resolve_config(
        {"out": str(out), "max_steps": TRAINED_MODEL_STEPS, "max_minutes": None, "schedule_clock": "steps", "progress": False}
    )
    Trainer(cfg).fit()
    assert (out / "model.pt").is_file()
    return out
