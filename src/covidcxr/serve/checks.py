"""Screening of an upload: the one implementation lives in `covidcxr.preprocess.screening`.

Training (`covidcxr.preprocess.cache`) and inference (`covidcxr.serve.predictor`) refuse
the same inputs for the same reasons, so the checks have one owner, the preprocessing;
this module keeps the names the service has always imported.
"""

from covidcxr.preprocess.screening import *  # noqa: F401,F403 (re-exported names)
from covidcxr.preprocess.screening import __all__  # noqa: F401
