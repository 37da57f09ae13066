"""The evaluation stage: how good is a trained model, measured the same way every time.

For one model (a training checkpoint, a saved model directory, or a registered
``models:/<name>@<alias>`` / ``models:/<name>/<version>``) and the dataset version it was trained
on, :func:`evaluate` computes

- **NLL** in bits/dim on the val split: the variational bound of ``diffusion.likelihood``
  (discretised Gaussian decoder, every KL term, the prior), its mean and standard error;
- **sample quality**: the Fréchet distance between generated samples and the val split, in the
  features of the FID Inception-v3 (``evaluate.inception_weights``: FID) or of a reference
  classifier trained once per dataset version, beside the *floor*, what real data scores;
- **memorization**: the share of samples whose nearest training image is closer than
  ``evaluate.memorization_threshold``, beside the same share for held-out real images;
- the **quality-vs-cost frontier**: the Fréchet distance and images/s for each sampler setting
  in ``evaluate.frontier``; the headline ``fd`` is the distance at the *default* sampler, the
  cheapest setting within ``evaluate.tolerance`` of the best.

"The val split" above is ``evaluate.split``: ``val`` (the default), the selection split that the
promotion gate, the default sampler and benchmark choices read, or ``test``, the locked split
that only reports a model (its evaluations cannot be registered).

Two models evaluated with the same settings are judged on the same evaluation set and seeds
(the ``eval_key``, which includes the split), and a result is stored under the model's weights:
re-evaluating an unchanged model is a read.

The modules, in the order an evaluation uses them:

- :mod:`~tasks.evaluate.config`: the ``evaluate`` section (:class:`EvalConfig`) and its
  frontier settings;
- :mod:`~tasks.evaluate.reference`: the feature networks (stored reference network, FID
  Inception);
- :mod:`~tasks.evaluate.metrics`: sample labels, floor images, nearest distances, the default
  sampler;
- :mod:`~tasks.evaluate.run`: :func:`evaluate` and its sampling, in this process;
- :mod:`~tasks.evaluate.result`: the eval key, where results are stored, the markdown table;
- :mod:`~tasks.evaluate.placement`: :func:`run_evaluation`, in this process or as a Ray task.
"""

from tasks.evaluate.config import EvalConfig, parse_setting
from tasks.evaluate.metrics import (
    copy_share,
    default_setting,
    floor_images,
    nearest_rms,
    sample_labels,
)
from tasks.evaluate.placement import run_evaluation, stored_evaluation
from tasks.evaluate.reference import (
    FLOOR_EVERY,
    REFERENCE_DIR,
    Features,
    fid_features,
    reference_features,
)
from tasks.evaluate.result import (
    EVALUATIONS_DIR,
    FORMAT,
    eval_key,
    load_paired,
    result_location,
    table,
)
from tasks.evaluate.run import evaluate, generate
from tasks.models import LoadedModel, load_model_ref  # reachable here before the split

__all__ = [
    "EVALUATIONS_DIR",
    "FLOOR_EVERY",
    "FORMAT",
    "REFERENCE_DIR",
    "EvalConfig",
    "Features",
    "LoadedModel",
    "copy_share",
    "default_setting",
    "eval_key",
    "evaluate",
    "fid_features",
    "floor_images",
    "generate",
    "load_model_ref",
    "load_paired",
    "nearest_rms",
    "parse_setting",
    "reference_features",
    "result_location",
    "run_evaluation",
    "sample_labels",
    "stored_evaluation",
    "table",
]
