"""Inference for people: ``covidcxr predict``, the FastAPI service with its web page, ONNX export.

* `covidcxr.serve.predictor.Predictor`: one image -> probability, decision at the run's
  threshold, lung-mask and Grad-CAM overlays, warnings (the one code path of both the CLI
  and the service, and the preprocessing of training);
* `covidcxr.serve.app.create_app`: ``POST /predict``, ``GET /model``, ``GET /health`` and
  the upload page at ``/``, hardened for any upload;
* `covidcxr.serve.onnx_export.export_onnx`: the classifier and lung U-Net as ONNX, with
  the measured agreement with PyTorch; `covidcxr.serve.engines` runs either.

Not for medical use: nothing here is a diagnosis.
"""
