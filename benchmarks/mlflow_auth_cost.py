r"""What one request costs a basic-auth MLflow server: anonymous (refused, 401) against logged in.

    .venv/bin/python -m infra.testbed up
    .venv/bin/python -m infra.testbed run driver -- "$PWD/.venv/bin/python" \
        "$PWD/benchmarks/mlflow_auth_cost.py"

Uses the calling host's MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD (the testbed's driver has
them). Ten ``experiments/search`` requests each way, twice, interleaved; prints the medians.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
import urllib.error
import urllib.request


def request(uri: str, headers: dict) -> float:
    t0 = time.perf_counter()
    with contextlib.suppress(urllib.error.HTTPError):  # the anonymous 401
        urllib.request.urlopen(urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers),
            timeout=60).read()
    return time.perf_counter() - t0


def main() -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    login = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
    auth = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
    for _ in range(2):
        for name, headers in (("anonymous (401)", {}), ("logged in", auth)):
            times = sorted(request(uri, headers) for _ in range(10))
            print(f"{name:16s} median {times[5]:.3f} s  (10 requests: {sum(times):.2f} s)")


if __name__ == "__main__":
    main()
