"""Deployment files for the pipeline, and the multi-host testbed (``python -m infra.testbed``)."""
