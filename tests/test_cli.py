"""The command line: ``veil --version``, ``veil fit FILE.py:model --data FILE``, bad input."""

import json
import math

import numpy as np
import pytest

from veil.cli import main

MODEL = '''
import numpyro, numpyro.distributions as dist

def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

def helper():
    return 1
'''


@pytest.fixture
def files(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    y = np.random.default_rng(0).normal(1.5, 1.0, 30)
    (tmp_path / "d.json").write_text(json.dumps({"y": y.tolist()}))
    np.savez(tmp_path / "d.npz", y=y)
    (tmp_path / "d.csv").write_text("y\n" + "\n".join(map(str, y)) + "\n")
    return tmp_path, y


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("veil ")


@pytest.mark.parametrize("ext", ["json", "npz", "csv"])
def test_fit_a_model_file_on_a_data_file(files, ext, capsys):
    # Conjugate: mu | y ~ N(sum(y) / (n + 1/100), 1 / (n + 1/100)). The fitted Gaussian is
    # exact up to the fit's own noise (~0.01 sd); the mean of 4000 written draws adds a
    # Monte-Carlo error of sd/63, so 0.1 sd is > 5 combined standard errors.
    path, y = files
    out = path / f"draws_{ext}.csv"
    code = main(["fit", f"{path / 'm.py'}:model", "--data", str(path / f"d.{ext}"), "--no-progress",
                 "--out", str(out), "--family", "meanfield"])
    text = capsys.readouterr().out
    assert code == 0 and "Verdict: OK to use." in text
    draws = np.loadtxt(out, delimiter=",", skiprows=1)
    assert out.read_text().splitlines()[0] == "mu" and draws.shape == (4000,)
    prec = len(y) + 1e-2
    assert abs(draws.mean() - y.sum() / prec) < 0.1 / math.sqrt(prec)
    assert abs(draws.std() * math.sqrt(prec) - 1.0) < 0.05


@pytest.mark.parametrize(
    "argv, match",
    [
        (["fit", "m.py"], "FILE.py:NAME"),
        (["fit", "nowhere.py:model"], "No model file"),
        (["fit", "{p}/m.py:modle"], "defines no function 'modle'; it defines: helper, model"),
        (["fit", "{p}/m.py:model", "--data", "{p}/missing.json"], "No data file"),
        (["fit", "{p}/m.py:model", "--data", "{p}/text.json"], "'y' .* is not numeric"),
        (["fit", "{p}/m.py:model", "--data", "{p}/d.json", "--out", "x.txt"], "must end in .csv or .nc"),
        (["demo", "--out", "/nonexistent/dir/x.png"], "folder /nonexistent/dir does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_fit(files, argv, match, capsys):
    path, _ = files
    (path / "text.json").write_text(json.dumps({"y": "1.0 2.0"}))
    code = main([a.format(p=path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert __import__("re").search(match, err), err
