"""The registry stage: trained weights → an MLflow model version → the ``champion`` alias.

    register_model   logs the model as a pyfunc written as code (:mod:`tasks.pyfunc_model`; its
                     artifacts the safetensors weights, config.json and serving.json, the
                     ``diffusion`` package as ``code_paths``, an explicit signature), registers a
                     version with lineage, digest and evaluation tags, and, as the very last step,
                     points the ``challenger`` alias at it
    promote          the challenger becomes ``champion`` only if it beats the current champion by
                     ``registry.margin`` on ``registry.metric``, judged on the same evaluation set
                     and seeds (``eval.key``), and passes ``registry.thresholds`` (the only
                     gate for the first champion). The decision and its numbers become tags on
                     both versions
    rollback         moves ``champion`` back to the previous holder
    resolve / load_version   ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → the
                     version, or the UNet with its weights checked against the registered digest
                     before a single tensor is parsed

The modules, in the order a version meets them:

    config      the ``registry`` config section; alias, tag and metric names
    session     MLflow clients with bounded HTTP retries; unreachable → RegistryUnavailable
    lineage     code version, lineage tags (the flow run's id passed in by flows/)
    pyfunc      the model logged as code (:mod:`tasks.pyfunc_model`) with its artifacts
    register    register_model: a new version, ``challenger`` last
    refs        parse_ref / resolve / load_version: model references in the registry
    gate        thresholds, margin and the champion's comparable value
    promotion   promote / rollback under the promotion lease; the champion history
"""

from tasks.registry.config import (
    CHALLENGER,
    CHAMPION,
    EVAL_KEY_TAG,
    HISTORY_TAG,
    LOWER_IS_BETTER,
    MODEL_NAME_RE,
    WEIGHTS_TAG,
    RegistryConfig,
    default_lock_dir,
    model_name_for,
)
from tasks.registry.gate import improvement
from tasks.registry.lineage import (
    REPO_DIR,
    REQUIRED_LINEAGE,
    code_version,
    lineage_from,
)
from tasks.registry.promotion import promote, rollback
from tasks.registry.pyfunc import PYFUNC_FILE
from tasks.registry.refs import load_version, parse_ref, resolve
from tasks.registry.register import register_model

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EVAL_KEY_TAG",
    "HISTORY_TAG",
    "LOWER_IS_BETTER",
    "MODEL_NAME_RE",
    "PYFUNC_FILE",
    "REPO_DIR",
    "REQUIRED_LINEAGE",
    "WEIGHTS_TAG",
    "RegistryConfig",
    "code_version",
    "default_lock_dir",
    "improvement",
    "lineage_from",
    "load_version",
    "model_name_for",
    "parse_ref",
    "promote",
    "register_model",
    "resolve",
    "rollback",
]
