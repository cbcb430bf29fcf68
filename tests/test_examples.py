"""Every script in examples/ runs, at a tiny size (STYLE.md, habit 13)."""

import importlib.util
import pathlib

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--max-steps", "300"])
    assert capsys.readouterr().out.strip()


def test_there_are_examples():
    assert EXAMPLES
