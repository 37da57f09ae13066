"""A multi-host testbed on one Linux machine: network namespaces for a Ray head and two Ray
workers, an S3 server, MLflow, Prefect and a Prefect worker (the driver).

    python -m infra.testbed up|down|status|logs [HOST]|run HOST -- ARGV...

From Python (e.g. the ``testbed`` pytest fixture in tests/testbed/conftest.py)::

    tb = Testbed(); tb.up(); tb.run_on("driver", ["python", "-c", "..."]); tb.down()

Needs root (``ip netns``) and the pipeline's virtualenv. See infra/README.md, "Testbed".
"""

from infra.testbed.core import (
    BUCKET,
    DEPLOYMENT,
    DEPLOYMENTS,
    GENERATE_DEPLOYMENT,
    HOSTS,
    POOL,
    PREPROCESS_DEPLOYMENT,
    RAY_HOSTS,
    ROOT,
    TRAIN_DEPLOYMENT,
    Testbed,
    TestbedError,
    addr,
    unavailable_reason,
)

__all__ = ["BUCKET", "DEPLOYMENT", "DEPLOYMENTS", "GENERATE_DEPLOYMENT", "HOSTS", "POOL",
           "PREPROCESS_DEPLOYMENT", "RAY_HOSTS", "ROOT", "TRAIN_DEPLOYMENT", "Testbed",
           "TestbedError", "addr", "unavailable_reason"]
