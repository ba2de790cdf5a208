"""covidcxr: chest X-ray classifiers for COVID-19 and pneumonia, and the truth about them.

NOT FOR MEDICAL USE. covidcxr is a research toolkit. Its models are trained on small,
multi-source collections and are known to learn the hospital, the scanner or text
markers instead of the lungs; its audit exists to show when they do. No output of this
package is a diagnosis.

The data flows one way (see DESIGN.md):
sources -> manifest -> splits -> preprocess -> train -> evaluate/audit -> report/serve.
"""

__version__ = "0.1.0"

MEDICAL_USE_BANNER = (
    "covidcxr is a research tool, NOT FOR MEDICAL USE: its outputs are not diagnoses."
)
