import numpy as np

from edgetransfer.data import normalize
from edgetransfer.golden import load_golden
from edgetransfer.manifest import read_manifest
from edgetransfer.parity import ATOL, RTOL
from edgetransfer.runtime import OnnxClassifier


def test_golden_vectors_are_self_consistent(digits_export):
    index, cases = load_golden(digits_export / "golden")
    assert len(cases) == 5 and index["input_shape"] == [1, 3, 32, 32]
    # one case per class first
    assert len({c["label"] for c in index["cases"]}) == 5
    p = read_manifest(digits_export).preprocessing
    ort_model = OnnxClassifier(digits_export / "model.onnx")
    for pixels, x, logits in cases:
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(normalize(pixels, p)[None], x)
        np.testing.assert_allclose(ort_model.logits(x), logits, rtol=RTOL, atol=ATOL)
    npy = np.load(digits_export / "golden" / "00.logits.npy")
    np.testing.assert_array_equal(npy, cases[0][2])
