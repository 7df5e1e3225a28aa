"""Helpers shared by the dashboard's browser tests."""

from __future__ import annotations

from typing import Any

_DEPTHS = """
    const out = {};
    for (const node of document.querySelectorAll('.instance')) {
      out[node.dataset.instance] = node.querySelector('.depth').textContent;
    }
    return out;
"""


def depths(driver: Any) -> dict[str, str]:
    """The queue depth each instance card shows, by instance id."""
    result: dict[str, str] = driver.execute_script(_DEPTHS)
    return result
