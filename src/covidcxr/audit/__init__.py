"""Shortcut audit of a trained run: does the model read the lungs, or the hospital?

Modules: `probe` (source predictability from embeddings), `ablation` (lungs blanked /
lungs only), `intensity` (intensity-window perturbation outside the lungs), `saliency` (Grad-CAM lung
focus), `embedding` (t-SNE), `findings` (plain-language findings and the verdict:
``no_skill``, ``shortcut``, ``warning`` or ``ok``), `run` (`audit_run`, what
``covidcxr audit RUN`` calls). Confounders beyond the source (view, sex, age band) live in
`covidcxr.evaluate.subgroups`. This
package's ``__init__`` stays light (no torch import): the report reads audits through it.
"""

from covidcxr.rundir import RunDir

#: ``RUN/audit/`` holds what `covidcxr.audit.run.audit_run` writes (names owned by `covidcxr.rundir.RunDir`)
AUDIT_DIR = RunDir.AUDIT
AUDIT_FILE = RunDir.AUDIT_FILE
