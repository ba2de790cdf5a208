"""Screening of an upload: the one implementation lives in `covidcxr.preprocess.screening`.

Training (`covidcxr.preprocess.cache`) and inference (`covidcxr.serve.predictor`) refuse
the same inputs for the same reasons, so the checks have one owner, the preprocessing;
this module keeps the names the service has always imported.
"""

from covidcxr.preprocess.screening import (  # noqa: F401 (re-exported names)
    __all__,
    ASPECT_REFUSE,
    ASPECT_WARN,
    BLANK_STD,
    COLOUR_DISTANCE,
    COLOUR_REFUSE,
    COLOUR_WARN,
    DEFAULT_SERVICE_MAX_PIXELS,
    InputInfo,
    InputWarning,
    LUNG_AREA_PLAUSIBLE,
    LUNG_BALANCE_PLAUSIBLE,
    MAX_LEVELS_GRAPHIC,
    MIN_SIDE_REFUSE,
    MIN_SIDE_WARN,
    OPACITY_CUT_HEIGHT_RATIO,
    RADIOGRAPH_MODALITIES,
    colour_fraction,
    inspect_input,
    opacity_cut_warnings,
    screen_pixels,
    segmentation_warnings,
)
