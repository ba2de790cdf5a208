"""Preprocessing: equalisation, lung segmentation, masking/cropping, resizing, and the cache.

The papers' first defence against shortcuts is to show the model nothing but lungs
(Tartaglione et al. 2020 §3.2; Ben Ahmed et al. 2021 §II.B).
"""
