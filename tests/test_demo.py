"""The demo and the command line run end to end (tiny size)."""

import os

import numpy as np

from veil import cli
from veil.demo import german_credit_data, load_reference


def test_demo_runs_tiny(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--max-steps", "300", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "eight_schools" in text and "german_credit" in text and "k-hat" in text
    assert out.exists() and os.path.getsize(out) > 10_000


def test_german_credit_data_and_reference_agree_in_shape():
    x, y = german_credit_data()
    assert x.shape == (1000, 25) and y.shape == (1000,)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 1.0} and int(y.sum()) == 700  # good
    np.testing.assert_allclose(np.asarray(x[:, :24]).mean(0), 0.0, atol=1e-5)
    ref = load_reference("german_credit")
    assert len(ref["mean"]) == 25 and ref["max_split_rhat"] < 1.01
