"""What a user sees of a store's runs in the MLflow UI, checked in a real browser.

Run by `make mlflow-ui-check` (`jobs/mlflow_ui_check.py`) as `run_ui_check(UiCheckConfig(...))`.

Design:
- The store is served as `make mlflow-ui` serves it (`mlflow server` over the sqlite file, with
  `--artifacts-destination` when proxied artifacts moved, e.g. an S3 demo's copy of its bucket), on a
  free loopback port (`local_services.mlflow_server`).
- What the pages must show is read first from that server's REST API: the experiment, its training runs
  (runs with a `stage` param, as hart-train logs its config) and their dataset inputs, the newest run
  with `eval/` metrics, that run's `per_category.json` tables (hart-evaluate's `log_table`), and the
  checkpoint models with the metrics logged against them (ranked by the first one through the API). A store
  that lacks one of them fails that check without opening its page, naming what is missing.
- Then headless Chromium (playwright driving the system's browser: nothing is downloaded) opens the UI,
  in a fresh browser context per check (empty local storage: a first visit; only the assistant side
  panel is kept closed, for readable screenshots), and waits for text in the rendered page:
  (a) the experiment link this project prints (`tracking.experiment_ui_url`) opens the model-training
      view: the runs list, its "Runs" side-bar entry current, none of the GenAI view's entries. The bare
      `#/experiments/<id>` is opened too and where it lands is reported, not checked: MLflow 3.17 opens
      it in the view the browser last chose, GenAI on a first visit, whatever the experiment's tags say.
  (b) the runs table's Dataset column shows `name (digest)` of each training run's dataset input (the
      newest `--max-runs` training runs; the data it trained on, not its evaluation prompt set);
  (c) the run page's metrics table lists every `eval/` metric of the run with the value the API has;
  (d) the artifact view renders each per_category.json as a table: its columns, its rows (one per
      category) and the file's values (numbers as the UI rounds them, to 10 significant digits);
  (e) the experiment's Models view lists the newest `--max-runs` checkpoint models (type
      `hart-checkpoint`, trainer/checkpoint_models.py), each in its row with every metric logged against
      it in its metric's column (the columns the UI builds from a metric's key and dataset). MLflow 3.17.2's
      tab sorts only by creation time (its sort-by-metric menu is switched off in the released UI): the
      ranking is the API's (`search_logged_models` ordered by the first metric), printed with the result.
      The browser page is wide enough for all of those columns: the table renders only the columns in view.
  (f) the System metrics tab of the newest training run with `system/` metrics shows each node's series
      (trainer/system_metrics.py: `system/<node>/<metric>`, one node per Ray node that hosted a worker):
      for every node the run's tags name, a section headed `system/<node>` holding its charts, one of them
      its CPU utilisation.
- Each check saves a screenshot into `--out` and prints PASS or FAIL with what it saw; any failure
  exits 1, a setup problem (no store, no browser, the server not starting) exits 2.

Length: over 400 lines because each of its six checks is a page's selectors and what they must show, read
in one place beside the expectations they test; they share the browser set-up and the store reading.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from trainer.checkpoint_models import CHECKPOINT_MODEL_TYPE
from trainer.local_services import mlflow_server
from trainer.system_metrics import NODE_TAG_PREFIX, metric_key
from trainer.tracking import DATASET_CONTEXT_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING_VIEW, experiment_ui_url

# Headless and quiet on a closed network: without the background-networking flags Chromium keeps
# opening connections (updates, sync, field trials) that the network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The assistant side panel opens itself on a first visit and covers a third of the page.
CLOSED_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
GENAI_ENTRIES = ("Sessions", "Judges", "Evaluation runs")  # side-bar entries of the GenAI view only
LOWER_IS_BETTER = ("fid", "kid")  # figures ranked ascending
VIEWPORT = {"width": 1600, "height": 1000}


class CheckFailed(Exception):
    """A check saw something else than expected; the message says what."""


class SetupProblem(Exception):
    """Nothing to check: no store, no browser, no experiment, or the server did not start."""


@dataclass
class Expected:
    """What the UI should show, from the server's REST API."""

    experiment_id: str
    experiment_name: str
    kind_tag: str | None
    training: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (run id, run name, "name (digest)")
    eval_run: tuple[str, str] | None = None  # (run id, run name) of the newest run with eval/ metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, dict] = field(default_factory=dict)  # per_category.json path -> {"columns", "data"}
    checkpoint_models: list[CheckpointModelView] = field(default_factory=list)  # newest first
    ranking: tuple[str, list[str]] | None = None  # (metric column, model names best first) from the API
    system_run: tuple[str, str] | None = None  # (run id, run name) of the newest training run with system/ metrics
    system_nodes: dict[str, list[str]] = field(default_factory=dict)  # node -> its system/<node>/ metric keys


@dataclass(frozen=True)
class CheckpointModelView:
    """A checkpoint's logged model as the Models view should list it."""

    model_id: str
    name: str
    step: int
    metrics: tuple[tuple[str, str, str, float], ...]  # (key, dataset name, dataset digest, value), "" = no dataset


def read_expected(client, experiment_name: str, max_runs: int) -> Expected:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise SetupProblem(f"no experiment {experiment_name!r} in the store (it has {names})")
    expected = Expected(experiment.experiment_id, experiment.name, experiment.tags.get(EXPERIMENT_KIND_TAG))
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    for run in [r for r in runs if "stage" in r.data.params][:max_runs]:
        labels = [f"{d.dataset.name} ({d.dataset.digest})" for d in run.inputs.dataset_inputs
                  if {t.key: t.value for t in d.tags}.get(DATASET_CONTEXT_TAG) != "evaluation"]
        expected.training.append((run.info.run_id, run.info.run_name, labels))
    evaluated = next((r for r in runs if any(k.startswith("eval/") for k in r.data.metrics)), None)
    if evaluated is not None:
        expected.eval_run = (evaluated.info.run_id, evaluated.info.run_name)
        expected.eval_metrics = {k: v for k, v in evaluated.data.metrics.items() if k.startswith("eval/")}
        logged = json.loads(evaluated.data.tags.get("mlflow.loggedArtifacts", "[]"))
        paths = sorted(a["path"] for a in logged
                       if a.get("type") == "table" and a["path"].endswith("per_category.json"))
        with tempfile.TemporaryDirectory(prefix="hart-ui-check-") as tmp:
            for path in paths:
                local = client.download_artifacts(evaluated.info.run_id, path, tmp)
                expected.tables[path] = json.loads(Path(local).read_text())
    read_checkpoint_models(client, expected, max_runs)
    read_system_metrics(expected, [r for r in runs if "stage" in r.data.params])
    return expected


def read_system_metrics(expected: Expected, training_runs) -> None:
    """The newest training run with per-node system metrics: its nodes (from the run's node tags, so a node
    that logged no series is reported missing) and each node's metric keys."""
    for run in training_runs:
        nodes = sorted(key.removeprefix(NODE_TAG_PREFIX) for key in run.data.tags if key.startswith(NODE_TAG_PREFIX))
        if nodes:
            expected.system_run = (run.info.run_id, run.info.run_name)
            expected.system_nodes = {node: sorted(k for k in run.data.metrics if k.startswith(metric_key(node, "")))
                                     for node in nodes}
            return


def read_checkpoint_models(client, expected: Expected, max_models: int) -> None:
    """The experiment's newest checkpoint models with their metrics (of a key logged more than once on a
    dataset, the first the API lists, as the Models view's cell shows it), and their ranking by the first
    metric (higher first, or lower for distances: FID, KID)."""
    found = client.search_logged_models([expected.experiment_id], order_by=[{"field_name": "creation_time",
                                                                             "ascending": False}], max_results=200)
    for model in [m for m in found if m.model_type == CHECKPOINT_MODEL_TYPE][:max_models]:
        shown: dict[tuple[str, str, str], float] = {}
        for metric in model.metrics or []:
            shown.setdefault((metric.key, metric.dataset_name or "", metric.dataset_digest or ""), metric.value)
        expected.checkpoint_models.append(CheckpointModelView(
            model.model_id, model.name, int(model.params.get("step", -1)),
            tuple((*where, value) for where, value in sorted(shown.items()))))
    first = next((m.metrics[0] for m in expected.checkpoint_models if m.metrics), None)
    if first is not None:
        key, dataset_name, digest, _ = first
        order = {"field_name": f"metrics.{key}", "ascending": key.rsplit("/", 1)[-1] in LOWER_IS_BETTER,
                 **({"dataset_name": dataset_name, "dataset_digest": digest} if dataset_name else {})}
        ranked = client.search_logged_models([expected.experiment_id], order_by=[order], max_results=200)
        names = [m.name for m in ranked if m.model_type == CHECKPOINT_MODEL_TYPE
                 and any(x.key == key for x in m.metrics or [])]
        expected.ranking = (metric_label(key, dataset_name, digest), names)


def metric_column_id(key: str, dataset_name: str, digest: str) -> str:
    """The Models view's column id of a metric (the UI's `metrics.` + JSON of key and dataset)."""
    spec = {"metricKey": key, **({"datasetName": dataset_name, "datasetDigest": digest} if dataset_name and digest else {})}
    return "metrics." + json.dumps(spec, separators=(",", ":"), ensure_ascii=False)


def metric_label(key: str, dataset_name: str, digest: str) -> str:
    return f"{key} on {dataset_name} (#{digest})" if dataset_name else key


# --------------------------------------------------------------------------------------
# The checks: each opens its page in a fresh context, saves a screenshot, returns what it saw
# --------------------------------------------------------------------------------------


def rendered(page, locator, what: str, timeout_ms: int) -> None:
    """Wait until `locator` is in the page; a CheckFailed naming `what` and the page's URL when it never is."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # optional: only this check needs it

    try:
        locator.first.wait_for(timeout=timeout_ms)
    except PlaywrightTimeout:
        raise CheckFailed(f"{what} not shown within {timeout_ms / 1000:.0f} s on {page.url}") from None


def check_model_training_view(page, base: str, expected: Expected, timeout_ms: int) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # optional: only this check needs it

    url = experiment_ui_url(base, expected.experiment_id)
    page.goto(url)
    try:  # the UI settles on a view by rewriting the URL with its workflowType
        page.wait_for_function("() => location.hash.includes('workflowType=')", timeout=timeout_ms)
    except PlaywrightTimeout:
        raise CheckFailed(f"{url} did not settle on a view (now {page.url})") from None
    landed = page.url
    runs_page = f"/experiments/{expected.experiment_id}/runs"
    if runs_page not in landed or f"workflowType={MODEL_TRAINING_VIEW}" not in landed:
        raise CheckFailed(f"{url} landed on {landed}, not the experiment's runs in the model-training view")
    rendered(page, page.locator('a[aria-current="page"]', has_text="Runs"), "the side bar's current 'Runs' entry",
             timeout_ms)
    rendered(page, page.get_by_text("Run Name", exact=True), "the runs list ('Run Name' column)", timeout_ms)
    genai = [name for name in GENAI_ENTRIES if page.get_by_role("link", name=name, exact=True).count()]
    if genai:
        raise CheckFailed(f"{url} shows the GenAI view's side-bar entries {genai}")
    return f"{url} shows the runs list, 'Runs' current in the side bar, no GenAI entries"


def bare_link_view(page, base: str, expected: Expected, timeout_ms: int) -> str:
    """Where `#/experiments/<id>` lands on a first visit (reported, not checked)."""
    url = f"{base}/#/experiments/{expected.experiment_id}"
    page.goto(url)
    page.wait_for_function("() => location.hash.includes('workflowType=')", timeout=timeout_ms)
    page.get_by_text(expected.experiment_name, exact=True).first.wait_for(timeout=timeout_ms)
    view = "model-training" if f"workflowType={MODEL_TRAINING_VIEW}" in page.url else "GenAI"
    return f"{url} opened the {view} view ({page.url.split('#', 1)[1]})"


def check_dataset_column(page, base: str, expected: Expected, timeout_ms: int) -> str:
    if not expected.training:
        raise CheckFailed(f"experiment {expected.experiment_name!r} has no training runs (runs with a 'stage' param)")
    unlogged = [name for _, name, labels in expected.training if not labels]
    if unlogged:
        raise CheckFailed(f"training runs without a dataset input in the store: {unlogged}")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # optional: only this check needs it

    page.goto(experiment_ui_url(base, expected.experiment_id))
    rendered(page, page.get_by_role("columnheader", name="Dataset"), "the runs table's Dataset column", timeout_ms)
    rendered(page, page.locator(f'[role="row"][row-id="{expected.training[0][0]}"]'),
             f"the row of run {expected.training[0][1]}", timeout_ms)
    missing = []
    for run_id, name, labels in expected.training:
        for label in labels:
            row = page.locator(f'[role="row"][row-id="{run_id}"]').filter(has_text=label)
            try:
                row.first.wait_for(timeout=5000)  # the table is there: its cells follow within moments
            except PlaywrightTimeout:  # report what the row shows instead
                shown = " | ".join(page.locator(f'[role="row"][row-id="{run_id}"]').all_inner_texts()) or "no row"
                missing.append(f"{name}: expected {label!r}, the table shows {shown!r}")
    if missing:
        raise CheckFailed("Dataset column: " + "; ".join(missing))
    return "Dataset column: " + ", ".join(f"{name} -> {', '.join(labels)}" for _, name, labels in expected.training)


def check_eval_metrics(page, base: str, expected: Expected, timeout_ms: int) -> str:
    if expected.eval_run is None:
        raise CheckFailed(f"no run of experiment {expected.experiment_name!r} has eval/ metrics in the store")
    run_id, name = expected.eval_run
    page.goto(f"{base}/#/experiments/{expected.experiment_id}/runs/{run_id}?workflowType={MODEL_TRAINING_VIEW}")
    rendered(page, page.get_by_text(re.compile(r"^Metrics \(\d+\)$")), "the run page's metrics table", timeout_ms)
    search = page.get_by_placeholder("Search metrics")
    if search.count():
        search.first.fill("eval/")
    first_eval = page.get_by_role("cell", name=re.compile(r"^eval\/"))  # "/" escaped: playwright sends /source/
    rendered(page, first_eval, "an eval/ metric in the metrics table", timeout_ms)
    rows = page.locator('[role="row"]').evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=cell]')).map(c => c.innerText.trim()))")
    shown = {cells[0]: cells[1] for cells in rows if len(cells) >= 2}
    absent = [key for key in sorted(expected.eval_metrics) if key not in shown]
    wrong = [f"{key}: {shown[key]} (API {value})" for key, value in expected.eval_metrics.items()
             if key in shown and not close(shown[key], value)]
    first_eval.first.scroll_into_view_if_needed()
    if absent or wrong:
        raise CheckFailed(f"run {name}'s page: eval metrics not listed {absent}, other values {wrong}")
    return f"run {name}'s page lists its {len(expected.eval_metrics)} eval/ metrics with the API's values"


def close(text: str, value: float) -> bool:
    try:
        return math.isclose(float(text), value, rel_tol=1e-6, abs_tol=1e-12)
    except ValueError:
        return False


def check_table(page, base: str, expected: Expected, timeout_ms: int, path: str | None = None) -> str:
    if path is None:
        raise CheckFailed("the run with eval/ metrics has no per_category.json table artifact" if expected.eval_run
                          else "no run with eval/ metrics, so no per_category.json table")
    run_id, name = expected.eval_run
    table = expected.tables[path]
    columns, rows = [str(c) for c in table["columns"]], table["data"]
    page.goto(f"{base}/#/experiments/{expected.experiment_id}/runs/{run_id}/artifacts/{quote(path)}"
              f"?workflowType={MODEL_TRAINING_VIEW}")
    rendered(page, page.get_by_text(path, exact=True), f"the artifact view of {path}", timeout_ms)
    rendered(page, page.get_by_role("checkbox", name="View as table", checked=True), "'View as table' (checked)",
             timeout_ms)
    rendered(page, page.locator('[role="columnheader"]'), "a table header", timeout_ms)
    headers = [text.strip() for text in page.locator('[role="columnheader"]').all_inner_texts()]
    shown = {cells[0]: cells for cells in page.locator('[role="row"]').evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=cell]')).map(c => c.innerText.trim()))") if cells}
    problems = [f"column {column!r} not shown" for column in columns if column not in headers]
    for row in rows:
        cells = shown.get(str(row[0]))
        if cells is None:
            problems.append(f"no row {row[0]!r}")
            continue
        by_column = dict(zip(headers, cells))
        problems += [f"{row[0]}/{column}: {by_column.get(column)!r}, file {value!r}"
                     for column, value in zip(columns, row)
                     if column in by_column and not same_value(by_column[column], value)]
    if problems:
        raise CheckFailed(f"{path} of run {name} is not rendered as its table: {problems}")
    return f"{path} of run {name} renders as a table: columns {columns}, {len(rows)} rows with the file's values"


def check_models_view(page, base: str, expected: Expected, timeout_ms: int) -> str:
    if not expected.checkpoint_models:
        raise CheckFailed(f"experiment {expected.experiment_name!r} has no checkpoint models ({CHECKPOINT_MODEL_TYPE})")
    if not any(model.metrics for model in expected.checkpoint_models):
        raise CheckFailed("no checkpoint model has a metric logged against it: nothing ranks them (evaluate at a "
                          "checkpoint step, or hart-evaluate --run-id with the checkpoint's --step)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # optional: only this check needs it

    page.goto(f"{base}/#/experiments/{expected.experiment_id}/models?workflowType={MODEL_TRAINING_VIEW}")
    rendered(page, page.get_by_role("columnheader", name="Model name"), "the Models view's table ('Model name')",
             timeout_ms)
    problems = []
    for model in expected.checkpoint_models:
        rows = page.locator(f'[role="row"][row-id="{model.model_id}"]')  # a row's pinned and scrolled parts
        try:
            rows.filter(has_text=model.name).first.wait_for(timeout=5000)  # the table is there: rows follow
        except PlaywrightTimeout:
            problems.append(f"{model.name}: not listed")
            continue
        # the cells' col-id attributes hold the column id HTML-escaped (`&quot;`), the headers' do not
        cells = rows.evaluate_all("rows => rows.flatMap(r => Array.from(r.querySelectorAll('[col-id]'))"
                                  ".map(c => [c.getAttribute('col-id'), c.innerText.trim()]))")
        by_column: dict[str, list[str]] = {}
        for column, text in cells:
            by_column.setdefault(html.unescape(column), []).append(text)
        for key, dataset_name, digest, value in model.metrics:
            shown = by_column.get(metric_column_id(key, dataset_name, digest), [])
            if not any(close(text, value) for text in shown):
                problems.append(f"{model.name} {metric_label(key, dataset_name, digest)}: "
                                f"{shown or 'no cell'} (API {value})")
    if problems:
        raise CheckFailed("Models view: " + "; ".join(problems))
    ranked = f"; ranked by {expected.ranking[0]}: {', '.join(expected.ranking[1])}" if expected.ranking else ""
    return (f"Models view lists {len(expected.checkpoint_models)} checkpoint models with "
            f"{sum(len(m.metrics) for m in expected.checkpoint_models)} metric values{ranked}")


def check_system_metrics(page, base: str, expected: Expected, timeout_ms: int) -> str:
    if expected.system_run is None:
        raise CheckFailed(f"no training run of experiment {expected.experiment_name!r} has per-node system metrics "
                          f"(tracking.system_metrics_interval_s > 0 on a run that trained)")
    run_id, name = expected.system_run
    silent = [node for node, keys in expected.system_nodes.items() if metric_key(node, "cpu_utilization_percentage") not in keys]
    if silent:
        raise CheckFailed(f"run {name}: nodes {silent} are tagged but have no cpu_utilization_percentage series")
    page.goto(f"{base}/#/experiments/{expected.experiment_id}/runs/{run_id}/system-metrics"
              f"?workflowType={MODEL_TRAINING_VIEW}")
    rendered(page, page.get_by_text("System metrics"), "the run's System metrics tab", timeout_ms)
    for node, keys in expected.system_nodes.items():  # a section per node, its charts' legends name the keys
        section = metric_key(node, "")[:-1]  # the heading shows it, then the number of charts in an element of its own
        rendered(page, page.get_by_text(section, exact=True), f"node {node}'s section ({section})", timeout_ms)
        rendered(page, page.get_by_text(metric_key(node, "cpu_utilization_percentage")),
                 f"node {node}'s CPU utilisation chart", timeout_ms)
    return (f"run {name}'s System metrics tab charts {len(expected.system_nodes)} nodes: "
            + ", ".join(f"{node} ({len(keys)} series)" for node, keys in expected.system_nodes.items()))


def models_viewport(expected: Expected) -> dict[str, int]:
    """Wide enough for every metric column of the checked models (the table renders the columns in view)."""
    columns = {metric[:3] for model in expected.checkpoint_models for metric in model.metrics}
    return {"width": max(VIEWPORT["width"], 1800 + 200 * len(columns)), "height": VIEWPORT["height"]}


def same_value(text: str, value) -> bool:
    """A rendered cell against the file's value: numbers to the UI's 10 significant digits."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isclose(float(text), value, rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return False
    return text == str(value)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UiCheckConfig:
    store: str = "runs/mlflow.db"  # the sqlite file of the runs
    artifacts: str = ""  # where proxied (mlflow-artifacts:/) artifacts now live
    experiment: str = "hart-demo"
    out: str = "runs/mlflow-ui-check"  # folder of the screenshots
    browser: str = "/usr/bin/chromium"  # Chromium executable
    max_runs: int = 6  # newest training runs whose Dataset cell is checked; newest checkpoint models in the Models view
    timeout_s: float = 60.0  # wait for each expected text


def run_ui_check(config: UiCheckConfig) -> int:
    """0: every check passed; 1: one failed. SetupProblem when the store, the browser or the server is missing."""
    store = Path(config.store).resolve()
    if not store.is_file():
        raise SetupProblem(f"no MLflow store at {store}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SetupProblem("needs the playwright package (pip install playwright) and Chromium "
                           "(apt-get install chromium); no browser download") from None
    if not Path(config.browser).is_file():
        raise SetupProblem(f"no Chromium at {config.browser} (apt-get install chromium, or --browser PATH)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the table downloads
    from mlflow.tracking import MlflowClient

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ("--artifacts-destination", str(Path(config.artifacts).resolve())) if config.artifacts else ()
    with contextlib.ExitStack() as stack:
        log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hart-ui-check-"))) / "server.log"
        try:
            base = stack.enter_context(mlflow_server(f"sqlite:///{store}", log, extra))
        except RuntimeError as exc:
            raise SetupProblem(f"{exc}: {log.read_text()[-2000:]}") from None
        expected = read_expected(MlflowClient(tracking_uri=base), config.experiment, config.max_runs)
        print(f"[ui-check] MLflow UI at {base} over {store}; experiment {expected.experiment_name!r} "
              f"(id {expected.experiment_id}, {EXPERIMENT_KIND_TAG}={expected.kind_tag})", flush=True)
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=config.browser, args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        print(f"[ui-check] Chromium {browser.version}, headless; screenshots in {out}", flush=True)
        results = run_checks(browser, base, expected, out, int(config.timeout_s * 1000))
    failed = [title for title, ok in results if not ok]
    print(f"[ui-check] {len(results) - len(failed)} of {len(results)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def run_checks(browser, base: str, expected: Expected, out: Path, timeout_ms: int) -> list[tuple[str, bool]]:
    """Each check in a fresh page; prints PASS/FAIL with what it saw and returns (title, passed) pairs."""
    checks = [("a-model-training-view", "(a) experiment link opens the model-training view", check_model_training_view),
              ("b-dataset-column", "(b) runs table Dataset column", check_dataset_column),
              ("c-eval-metrics", "(c) run page eval/ metrics", check_eval_metrics)]
    for path in expected.tables or [None]:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", path.removesuffix(".json")).strip("-") if path else ""
        checks.append((f"d-table-{slug}".rstrip("-"), f"(d) per-category table {path or ''}".rstrip(),
                       functools.partial(check_table, path=path)))
    checks.append(("e-models-view", "(e) Models view lists the checkpoint models with their metrics", check_models_view))
    checks.append(("f-system-metrics", "(f) System metrics tab charts each node's series", check_system_metrics))
    results = []
    for shot, title, check in checks:
        screenshot = out / f"{shot}.png"
        viewport = models_viewport(expected) if check is check_models_view else VIEWPORT
        try:
            text = run_in_fresh_page(browser, screenshot, lambda page: check(page, base, expected, timeout_ms), viewport)
            ok = True
        except CheckFailed as failure:
            ok, text = False, str(failure)
        except Exception as exc:  # noqa: BLE001 - anything else (a selector error, a crashed page) fails that check
            ok, text = False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        results.append((title, ok))
        print(f"[ui-check] {'PASS' if ok else 'FAIL'} {title}: {text}  [{screenshot}]", flush=True)
    screenshot = out / "a0-bare-experiment-link.png"
    try:
        note = run_in_fresh_page(browser, screenshot, lambda page: bare_link_view(page, base, expected, timeout_ms))
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        note = f"where the bare experiment link lands is unknown: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    print(f"[ui-check] note: {note}  [{screenshot}]", flush=True)
    return results


def run_in_fresh_page(browser, screenshot: Path, body, viewport: dict[str, int] = VIEWPORT) -> str:
    """`body(page)` in a new context (a first visit), then a screenshot of what the page shows, also on failure."""
    context = browser.new_context(viewport=viewport)
    context.add_init_script(CLOSED_ASSISTANT)
    page = context.new_page()
    try:
        return body(page)
    finally:
        try:
            page.screenshot(path=str(screenshot))
        finally:
            context.close()

