"""The MODEL.yaml contract (`covidcxr.evaluate.foreign_model`): validated fields, confined paths, ONNX and TorchScript.

The models are built with plain torch (`tests/foreign_models.py`, no covidcxr code) and
exported in a temporary folder; each test takes a second or two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.foreign_model import load_foreign_model, read_foreign_spec
from foreign_models import LogitOnly, corner_reader, export_onnx, export_torchscript, lung_reader

YAML = """name: {name}
format: {format}
path: {path}
input: {input}
output: {output}
"""


def _write(folder, name="m", format="onnx", path="m.onnx", input="{height: 64, width: 64, channels: 1, range: [0, 1]}",
           output="{kind: probability, positive_index: 0, positive_label: covid, embedding: embedding}", extra=""):
    file = folder / f"{name}.yaml"
    file.write_text(YAML.format(name=name, format=format, path=path, input=input, output=output) + extra)
    return file


def _images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    export_onnx(lung_reader(), folder / "m.onnx")
    export_torchscript(lung_reader(), folder / "m.pt")
    export_onnx(LogitOnly(lung_reader()), folder / "logit.onnx", outputs=("logit",))
    return folder


def test_onnx_and_torchscript_give_the_plain_torch_numbers(exported) -> None:
    images = _images()
    with torch.no_grad():
        probability, embedding = lung_reader()(torch.from_numpy(images[:, None]))
    onnx = load_foreign_model(_write(exported))
    script = load_foreign_model(_write(exported, name="s", format="torchscript", path="m.pt", output="{kind: probability, embedding: 1}"))
    for model in (onnx, script):
        p, e = model.outputs(images)
        np.testing.assert_allclose(p, probability.numpy()[:, 0], atol=1e-5)
        np.testing.assert_allclose(e, embedding.numpy(), atol=1e-5)
        np.testing.assert_allclose(model.embed(images), embedding.numpy(), atol=1e-5)
    assert onnx.fingerprint() != script.fingerprint()
    # a logit output goes through the sigmoid
    logit = load_foreign_model(_write(exported, name="l", path="logit.onnx", output="{kind: logit}"))
    np.testing.assert_allclose(logit.predict(images), probability.numpy()[:, 0], atol=1e-5)
    # ... and a probability model that returns logits is refused with the field to change
    wrong = load_foreign_model(_write(exported, name="w", path="logit.onnx", output="{kind: probability}"))
    with pytest.raises(CovidCXRError, match="output.kind"):
        wrong.predict(images * 0 + 1)


def test_input_contract_range_mean_std_and_channels(exported) -> None:
    model = load_foreign_model(_write(exported, input="{height: 64, width: 64, channels: 1, range: [-1, 1]}"))
    x = model.model_inputs(np.full((2, 64, 64), 0.25, np.float32))
    assert x.shape == (2, 1, 64, 64) and np.allclose(x, -0.5)
    model = load_foreign_model(_write(exported, name="ms", input="{height: 64, width: 64, channels: 1, mean: 0.5, std: 0.25}"))
    assert np.allclose(model.model_inputs(np.ones((1, 64, 64), np.float32)), 2.0)
    # three channels against a one-channel ONNX input: the field is named
    with pytest.raises(CovidCXRError, match="input.channels"):
        load_foreign_model(_write(exported, name="c3", input="{height: 64, width: 64, channels: 3, mean: [0.4, 0.5, 0.6], std: [0.2, 0.2, 0.2]}"))
    with pytest.raises(CovidCXRError, match="input.height"):
        load_foreign_model(_write(exported, name="h", input="{height: 128, width: 64}"))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"format": "keras"}, "field 'format'"),
        ({"input": "{height: 64, width: 64, range: [0, 1], mean: 0.5, std: 0.2}"}, "range or mean/std"),
        ({"input": "{height: 64, width: 64, std: 0.2}"}, "mean and std go together"),
        ({"output": "{kind: odds}"}, "field 'output.kind'"),
        ({"extra": "preprocess: {lungs: maybe}\n"}, "field 'preprocess.lungs'"),
        ({"extra": "preprocess: {size: 128}\n"}, "preprocess.size"),
        ({"extra": "colour: blue\n"}, "field 'colour'"),
        ({"name": "../escape"}, "field 'name'"),
    ],
)
def test_bad_fields_are_named(exported, change, needle) -> None:
    fields = {"name": "bad"} | change
    file = _write(exported, **{k: v for k, v in fields.items() if k != "name"}, name="bad") if fields["name"] == "bad" else None
    if file is None:  # a bad name: write the YAML by hand (it names the file too)
        file = exported / "badname.yaml"
        file.write_text(YAML.format(name=fields["name"], format="onnx", path="m.onnx", input="{height: 64, width: 64}", output="{kind: probability}"))
    with pytest.raises(CovidCXRError, match="--model .*" + needle.replace("(", r"\(").replace(")", r"\)")):
        read_foreign_spec(file)


def test_model_path_is_confined_to_the_yaml_folder(exported, tmp_path) -> None:
    inner = tmp_path / "models"
    inner.mkdir()
    for path, needle in (("../m.onnx", "outside the YAML's folder"), (str(exported / "m.onnx"), "absolute path"), ("missing.onnx", "no file")):
        with pytest.raises(CovidCXRError, match=f"field 'path'.*{needle}"):
            load_foreign_model(_write(inner, path=path))
    (inner / "link.onnx").symlink_to(exported / "m.onnx")  # a symlink out of the folder is outside too
    with pytest.raises(CovidCXRError, match="outside the YAML's folder"):
        load_foreign_model(_write(inner, path="link.onnx"))
    (inner / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CovidCXRError, match="TorchScript"):
        load_foreign_model(_write(inner, name="junk", format="torchscript", path="junk.pt", output="{kind: probability}"))
    with pytest.raises(CovidCXRError, match="ONNX file's outputs"):
        load_foreign_model(_write(exported, name="emb", output="{kind: probability, embedding: features}"))


def test_corner_reader_scores_the_corner() -> None:
    """The plain-torch helper itself: a bright top-right corner raises the score, the lungs do not."""
    blank = torch.zeros(1, 1, 64, 64)
    corner = blank.clone()
    corner[..., 0:11, 40:64] = 1.0
    lungs = blank.clone()
    lungs[..., 26:38, 14:50] = 1.0
    model = corner_reader()
    assert model(corner)[0] > 0.99 > model(lungs)[0] + 0.9
    assert lung_reader()(lungs)[0] > 0.99 > lung_reader()(corner)[0] + 0.9


def test_a_runtime_refusal_is_a_sentence_naming_the_model(tmp_path) -> None:
    """An ONNX file taking float64 fed covidcxr's float32: the error names the file, not an onnxruntime traceback."""

    class Doubles(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x.mean(dim=(1, 2, 3)))

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Doubles(), (torch.zeros(1, 1, 64, 64, dtype=torch.float64),), str(tmp_path / "m.onnx"), input_names=["image"],
                          dynamic_axes={"image": {0: "n"}}, dynamo=False)
    model = load_foreign_model(_write(tmp_path, output="{kind: probability}"))
    with pytest.raises(CovidCXRError, match=r"m\.onnx refused a float32 input"):
        model.predict(_images(2))
