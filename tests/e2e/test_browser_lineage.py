"""The lineage as a person walks it: a real ``mlflow server``, one pass, and headless Chromium
rendering the version pages. Each lineage link must be in the rendered description and lead to
the page it names: from a transferred adapter version to its source version, both bases and
its migration run; from the deprecated base to its successors and the adapters carried off it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from db import list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import run_once
from migrator.registry import VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.fixtures.browser import Browser, RenderedPage
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import Story

pytestmark = [pytest.mark.browser, pytest.mark.mlflow_server, pytest.mark.e2e, pytest.mark.slow]


def _page(ref: VersionRef) -> str:
    return f"#/models/{ref.name}/versions/{ref.version}"


def _title_of(href: str, run_ids: set[str]) -> str:
    """The title the UI gives the page a lineage link names."""
    path = unquote(href.split("?", 1)[0])
    if "/runs/" in path:
        run_id = path.rsplit("/", 1)[-1]
        assert run_id in run_ids, (href, run_ids)
        return f"Run {run_id} - MLflow"
    name, version = path.removeprefix("#/models/").split("/versions/")
    return f"{name} v{version} - MLflow"


def _matches(link: str, wanted: str) -> bool:
    return link == wanted or link.startswith(wanted + "?")


def _expect(page: RenderedPage, text: str, *wanted: str) -> set[str]:
    """A block of the description that says ``text`` links every ``wanted`` page; returns the
    links found."""
    blocks = page.blocks_with(text)
    for block in blocks:
        found = {link for w in wanted for link in block.links if _matches(link, w)}
        if all(any(_matches(link, w) for link in found) for w in wanted):
            return found
    shown = [(b.text[:80], b.links) for b in page.blocks]
    raise AssertionError(f"{page.url}: no block saying {text!r} links {wanted}; blocks: {shown}")


def _follow(browser: Browser, base_url: str, links: set[str], runs: set[str]) -> None:
    """Each link opens the page it names."""
    for href in sorted(links):
        target = browser.render(f"{base_url}/{href}")
        assert target.title == _title_of(href, runs), (href, target.title)


def test_lineage_links_walk_both_ways_in_the_ui(
    browser: Browser,
    mlflow_server: MlflowServer,
    server_registry: MlflowRegistry,
    unique: str,
    tmp_path: Path,
) -> None:
    registry = server_registry
    settings = load_settings(
        data_dir=tmp_path / "data", tracking_uri=mlflow_server.url, similarity_rank=8
    )
    url = settings.database_url.get_secret_value()
    ensure_sqlite_parent(url)
    migrations.upgrade(url)
    story = Story(tmp_path / "story", registry, base_name=f"{unique}-enc")
    story.register_v1_with_adapters()
    story.register_successors()
    ctx = build_context(settings, registry)
    for _ in range(3):  # a pass the loaded server timed out ends early; the next one resumes
        if not run_once(ctx).unavailable:
            break
    with session_scope(ctx.sessions) as session:
        results = {
            j.adapter_version.ref: VersionRef.parse(j.result_ref)
            for j in list_jobs(session=session)
            if j.result_ref
        }
    assert len(results) == 3, results
    v1, v2, other = story.refs["v1"], story.refs["v2"], story.refs["other"]
    source = story.refs["styleA"]
    moved = results[str(source)]
    run_id = registry.get_version(moved).run_id
    assert run_id is not None
    experiment = registry.client.get_run(run_id).info.experiment_id
    runs = {run_id}

    adapter_page = browser.render(f"{mlflow_server.url}/{_page(moved)}")
    assert adapter_page.title == _title_of(_page(moved), runs)
    links = _expect(adapter_page, "made without training from", _page(source))
    links |= _expect(adapter_page, "from base", _page(v1))
    links |= _expect(adapter_page, "to base", _page(v2))
    links |= _expect(adapter_page, "migration run", f"#/experiments/{experiment}/runs/{run_id}")
    _follow(browser, mlflow_server.url, links, runs)

    base_page = browser.render(f"{mlflow_server.url}/{_page(v1)}")
    links = _expect(base_page, "superseded by", _page(v2), _page(other))
    for name in ("styleA", "plainB", "kohyaC"):
        adapter, result = story.refs[name], results[str(story.refs[name])]
        links |= _expect(base_page, "registered as", _page(adapter), _page(v2), _page(result))
        links |= _expect(base_page, "skipped", _page(adapter), _page(other))
    _follow(browser, mlflow_server.url, links, runs)
