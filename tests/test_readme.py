"""Every ``python`` code block of README.md runs, in order, in one namespace (a later block may
use what an earlier one made, as a reader following the page would)."""

import pathlib
import re

import matplotlib.pyplot as plt
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 2


@pytest.mark.filterwarnings("ignore:.*progress.*")
def test_readme_blocks_run():
    namespace: dict = {}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"README.md python block {i} failed: {type(e).__name__}: {e}") from e
    plt.close("all")
