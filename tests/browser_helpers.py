"""Helpers shared by the dashboard's browser tests."""

from __future__ import annotations

import time
from typing import Any

# Full cards show an instance's depth in its .depth; compact cards (many instances) show
# one .cell per instance with the depth as its text and in data-depth.
_DEPTHS = """
    const out = {};
    for (const node of document.querySelectorAll('.instance')) {
      out[node.dataset.instance] = node.querySelector('.depth').textContent;
    }
    for (const node of document.querySelectorAll('.cell')) {
      out[node.dataset.instance] = node.dataset.depth;
    }
    return out;
"""


def depths(driver: Any) -> dict[str, str]:
    """The queue depth each instance card or cell shows, by instance id."""
    result: dict[str, str] = driver.execute_script(_DEPTHS)
    return result


# Samples points along every arrow (in viewport coordinates, like the cards' rects) and
# reports an arrow that passes behind a card other than its two ends, one that is mostly
# hidden, and a label whose centre lies on a card.
_EDGE_CHECK = """
    const cards = [...document.querySelectorAll('#columns .stage, #columns .endpoint')]
      .map((node) => [node, node.getBoundingClientRect()]);
    const name = (node) => node.dataset.stage || node.dataset.node;
    const within = (p, r) => p.x > r.left + 1 && p.x < r.right - 1 && p.y > r.top + 1 && p.y < r.bottom - 1;
    const node = (n) => document.querySelector(`.stage[data-stage="${CSS.escape(n)}"]`) ||
      document.querySelector(`[data-node="${CSS.escape(n)}"]`);
    const problems = [];
    const paths = document.querySelectorAll('#edges path[data-edge]');
    for (const path of paths) {
      const [from, to] = path.dataset.edge.split('->');
      const ends = [node(from), node(to)];
      const ctm = path.getScreenCTM(), length = path.getTotalLength(), n = 60;
      const samples = [];
      for (let i = 1; i < n; i++) samples.push(path.getPointAtLength(length * i / n).matrixTransform(ctm));
      for (const [card, rect] of cards) {
        if (ends.includes(card)) continue;
        const hidden = samples.filter((p) => within(p, rect)).length;
        if (hidden) problems.push(`${path.dataset.edge}: ${hidden}/${samples.length} points behind ${name(card)}`);
      }
      const visible = samples.filter((p) => !cards.some(([, rect]) => within(p, rect))).length;
      if (visible < samples.length * 0.8) {
        problems.push(`${path.dataset.edge}: only ${visible}/${samples.length} points visible`);
      }
    }
    for (const text of document.querySelectorAll('#edges text')) {
      const r = text.getBoundingClientRect();
      const centre = { x: r.left + r.width / 2, y: r.top + r.height / 2 };
      for (const [card, rect] of cards) {
        if (within(centre, rect)) problems.push(`label ${text.textContent} on ${name(card)}`);
      }
    }
    return { edges: paths.length, problems };
"""


def hidden_edges(driver: Any) -> list[str]:
    """What _EDGE_CHECK finds wrong with the arrows now drawn (none drawn is wrong too)."""
    result: dict[str, Any] = driver.execute_script(_EDGE_CHECK)
    problems: list[str] = result["problems"]
    return problems if result["edges"] else ["no edges drawn"]


# Whether the page scrolls sideways, and where every stage card and endpoint is across.
_FIT = """
    const doc = document.documentElement, graph = document.getElementById('graph');
    const rects = [...document.querySelectorAll('#columns .stage, #columns .endpoint')].map((node) => {
      const r = node.getBoundingClientRect();
      return { name: node.dataset.stage || node.dataset.node, left: r.left, right: r.right };
    });
    return {
      scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, innerWidth: window.innerWidth,
      graphScrollWidth: graph.scrollWidth, graphClientWidth: graph.clientWidth,
      transform: getComputedStyle(document.getElementById('graph-inner')).transform,
      rows: document.querySelectorAll('#columns > .row').length,
      nodes: rects,
    };
"""


def fit_problems(driver: Any) -> tuple[list[str], dict[str, Any]]:
    """What keeps the dashboard from fitting its window across (and the measurements).

    The page must not scroll sideways (``scrollWidth`` within the viewport without its
    scrollbar, so within ``window.innerWidth`` too), the graph must not scroll inside
    itself, and every stage card and endpoint must lie inside the viewport.
    """
    fit: dict[str, Any] = driver.execute_script(_FIT)
    problems = []
    if fit["scrollWidth"] > fit["clientWidth"] or fit["clientWidth"] > fit["innerWidth"]:
        problems.append(
            f"the page scrolls sideways: scrollWidth {fit['scrollWidth']} > "
            f"clientWidth {fit['clientWidth']} (innerWidth {fit['innerWidth']})"
        )
    if fit["graphScrollWidth"] > fit["graphClientWidth"]:
        problems.append(
            f"the graph scrolls sideways: {fit['graphScrollWidth']} > {fit['graphClientWidth']}"
        )
    for node in fit["nodes"]:
        if node["left"] < 0 or node["right"] > fit["clientWidth"]:
            problems.append(
                f"{node['name']} lies outside the viewport: {node['left']:.0f}..{node['right']:.0f}"
                f" of 0..{fit['clientWidth']}"
            )
    return problems, fit


def wait_until_fits(driver: Any, timeout: float = 15) -> dict[str, Any]:
    """Wait for the dashboard to fit its window with every arrow visible (a new window
    size is laid out a frame or two later), then assert it; returns the measurements."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not fit_problems(driver)[0] and not hidden_edges(driver):
            break
        time.sleep(0.1)
    problems, fit = fit_problems(driver)
    assert problems == [], (problems, fit)
    assert hidden_edges(driver) == []
    return fit
