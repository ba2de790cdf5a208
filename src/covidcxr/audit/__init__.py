"""Shortcut audit of a trained run: does the model read the lungs, or the hospital?

Modules: `probe` (source predictability from embeddings), `ablation` (lungs blanked /
lungs only), `saliency` (Grad-CAM lung focus), `embedding` (t-SNE), `findings`
(plain-language findings), `run` (`audit_run`, what ``covidcxr audit RUN`` calls). This
package's ``__init__`` stays light (no torch import): the report reads audits through it.
"""

from covidcxr.rundir import RunDir

#: ``RUN/audit/`` holds what `covidcxr.audit.run.audit_run` writes (names owned by `covidcxr.rundir.RunDir`)
AUDIT_DIR = RunDir.AUDIT
AUDIT_FILE = RunDir.AUDIT_FILE
