"""Gallery captions say where an image is from, its truth, the decision and whether it is right."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from covidcxr.audit.saliency import gallery_captions, plot_gallery


def test_captions_state_decision_and_correctness(tmp_path):
    table = pd.DataFrame({"source": ["site_a", "site_b", "site_b"], "label": ["covid", "normal", "covid"],
                          "target": [1, 0, 1], "probability": [0.93, 0.61, 0.2]})
    captions, correct = gallery_captions(table, threshold=0.5, positive="covid", negative="rest")
    assert captions[0] == "site_a · true covid\np=0.93 → covid ✓ right"
    assert captions[1] == "site_b · true normal\np=0.61 → covid ✗ wrong"
    assert captions[2].endswith("→ rest ✗ wrong")
    assert correct == [True, False, False]
    # the threshold is the run's, not 0.5
    assert gallery_captions(table, threshold=0.6, positive="covid", negative="rest")[1] == [True, False, False]
    assert gallery_captions(table, threshold=0.65, positive="covid", negative="rest")[1] == [True, True, False]
    images = np.zeros((3, 32, 32), dtype=np.float32)
    path = plot_gallery(images, images, images.astype(bool), captions, tmp_path / "gallery.png", correct=correct)
    with Image.open(path) as image:
        assert image.width >= 3 * 2.4 * 100
