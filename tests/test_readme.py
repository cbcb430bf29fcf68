"""Every ``python`` code block of README.md and of the user guide (docs/guide.md) runs, in order,
in one namespace per page (a later block may use what an earlier one made, as a reader
following the page would)."""

import pathlib
import re

import matplotlib.pyplot as plt
import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = {"README.md": 1, "docs/guide.md": 3}  # page -> fewest python blocks it holds


def _blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_has_python_blocks(page):
    assert len(_blocks(page)) >= PAGES[page]


@pytest.mark.filterwarnings("ignore:.*progress.*")
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_blocks_run(page):
    namespace: dict = {}
    for i, code in enumerate(_blocks(page)):
        try:
            exec(compile(code, f"{page} block {i}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"{page} python block {i} failed: {type(e).__name__}: {e}") from e
    plt.close("all")
