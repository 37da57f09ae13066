"""The preprocessing stage: raw images → a versioned, training-ready Parquet dataset.

Sources (``data.source``):

- ``digits``: scikit-learn's embedded 8×8 digits, labels kept.
- an image folder (local, ``file://`` or ``s3://``): PNG / JPEG / WebP / BMP files; the first
  level of sub-folders names the class (the ImageFolder convention), files directly in the root
  are unlabelled. Hidden files and folders (``.name``) are ignored.
- Parquet (a ``.parquet`` file or a folder of them) with an image column holding encoded bytes,
  either plain binary or the Hugging Face ``{bytes, path}`` struct, and an optional label
  column (integers, with class names from the Hugging Face metadata when present, or strings).

The modules, in the order the stage runs them:

- :mod:`tasks.preprocess.listing`: finding the files under a source; the :class:`Listing`
  (keys, sizes, stamps) and the dataset version it fingerprints to (:func:`version_of`).
- :mod:`tasks.preprocess.sources`: :func:`list_source`, which tells the source kinds apart and
  lists the digits and image folders.
- :mod:`tasks.preprocess.parquet_source`: listing and checking a Parquet source.
- :mod:`tasks.preprocess.parts`: decoding the listing on Ray Data into one run's part files
  (the decoder itself, which Ray workers run, is :mod:`tasks.decode`).
- :mod:`tasks.preprocess.stage`: :func:`preprocess`, the stage from listing to committed
  manifest, and its :class:`PreprocessResult`.
"""

from tasks.preprocess.listing import FINGERPRINT_VERSION, Listing, version_of
from tasks.preprocess.sources import list_source
from tasks.preprocess.stage import Echo, PreprocessResult, preprocess

__all__ = [
    "FINGERPRINT_VERSION",
    "Echo",
    "Listing",
    "PreprocessResult",
    "list_source",
    "preprocess",
    "version_of",
]
