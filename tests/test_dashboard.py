"""The shipped monitoring files: the Grafana dashboard is valid for the schema version it declares
and every metric it queries is one the exporter serves (after a real run: the shared monitored
run of tests/monitored.py); the provisioning files and monitoring/prometheus.yml point at the
driver's default port and at Ray's service-discovery file."""

import json
import os
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import METRICS_PORT
from cluster.telemetry.metrics import PHASES, SNAPSHOT_FILE
from monitored import REQUIRE_ENV, monitored_run
from raytools import REPO

pytestmark = [pytest.mark.xdist_group("monitored"), pytest.mark.ray]  # one worker makes the shared run (tests/monitored.py), with Ray

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "alexnet-towers.json"

# Grafana's classic dashboard model, transcribed from its CUE kind (grafana/grafana,
# kinds/dashboard/dashboard_kind.cue, schemaVersion 36 and later): the constraints on the parts this
# dashboard uses. Targets are the datasource's (open objects); ours are Prometheus queries.
_DATASOURCE_REF = {"type": "object", "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
                   "additionalProperties": False}
_GRID_POS = {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
    "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
    "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0},
    "static": {"type": "boolean"}}}
_FIELD_CONFIG = {"type": "object", "required": ["defaults", "overrides"], "properties": {
    "defaults": {"type": "object", "properties": {
        "unit": {"type": "string"}, "decimals": {"type": "number"}, "min": {"type": "number"},
        "max": {"type": "number"}, "custom": {"type": "object"},
        "color": {"type": "object", "required": ["mode"], "properties": {"mode": {"type": "string"}}},
        "thresholds": {"type": "object", "required": ["mode", "steps"], "properties": {
            "mode": {"enum": ["absolute", "percentage"]},
            "steps": {"type": "array", "items": {"type": "object", "required": ["color"]}}}}}},
    "overrides": {"type": "array", "items": {"type": "object", "required": ["matcher", "properties"]}}}}
_PANEL = {"type": "object", "required": ["type", "options", "fieldConfig", "transformations"], "properties": {
    "type": {"type": "string", "minLength": 1}, "id": {"type": "integer", "minimum": 0},
    "title": {"type": "string"}, "description": {"type": "string"}, "transparent": {"type": "boolean"},
    "datasource": _DATASOURCE_REF, "gridPos": _GRID_POS,
    "targets": {"type": "array", "items": {"type": "object"}}, "repeat": {"type": "string"},
    "repeatDirection": {"enum": ["h", "v"]}, "maxPerRow": {"type": "integer"}, "interval": {"type": "string"},
    "options": {"type": "object"}, "fieldConfig": _FIELD_CONFIG,
    "transformations": {"type": "array", "items": {"type": "object", "required": ["id", "options"],
                                                   "properties": {"id": {"type": "string"}}}}}}
_ROW = {"type": "object", "required": ["type", "id", "panels", "collapsed"], "properties": {
    "type": {"const": "row"}, "collapsed": {"type": "boolean"}, "title": {"type": "string"},
    "datasource": _DATASOURCE_REF, "gridPos": _GRID_POS, "id": {"type": "integer", "minimum": 0},
    "panels": {"type": "array", "items": _PANEL}, "repeat": {"type": "string"}}}
_VARIABLE = {"type": "object", "required": ["type", "name", "hide"], "properties": {
    "type": {"enum": ["query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"]},
    "name": {"type": "string", "minLength": 1}, "label": {"type": "string"}, "hide": {"enum": [0, 1, 2]},
    "skipUrlSync": {"type": "boolean"}, "description": {"type": "string"},
    "query": {"type": ["string", "object"]}, "datasource": _DATASOURCE_REF}}
_ANNOTATION = {"type": "object", "required": ["name", "datasource", "enable", "iconColor"], "properties": {
    "name": {"type": "string"}, "datasource": _DATASOURCE_REF, "enable": {"type": "boolean"},
    "hide": {"type": "boolean"}, "iconColor": {"type": "string"}, "type": {"type": "string"}}}
DASHBOARD_SCHEMA = {"type": "object", "required": ["title", "schemaVersion", "panels", "editable", "graphTooltip"],
                    "properties": {
    "id": {"type": ["integer", "null"]}, "uid": {"type": "string", "minLength": 8, "maxLength": 40},
    "title": {"type": "string"}, "description": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "timezone": {"type": "string"}, "editable": {"type": "boolean"}, "graphTooltip": {"enum": [0, 1, 2]},
    "time": {"type": "object", "required": ["from", "to"]}, "fiscalYearStartMonth": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 11},
    "liveNow": {"type": "boolean"}, "refresh": {"type": ["string", "boolean"]},
    "schemaVersion": {"type": "integer", "minimum": 36, "maximum": 65535}, "version": {"type": "integer", "minimum": 0},
    "panels": {"type": "array", "items": {"anyOf": [_ROW, _PANEL]}},
    "templating": {"type": "object", "properties": {"list": {"type": "array", "items": _VARIABLE}}},
    "annotations": {"type": "object", "properties": {"list": {"type": "array", "items": _ANNOTATION}}},
    "links": {"type": "array"}}}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported_names(tmp_path_factory, tiny_demo) -> set[str]:
    """Every sample name the exporter served at the end of a real run, metric families without
    samples yet (GPU gauges on a CPU run, bad samples) included: histograms' _bucket, _sum and
    _count, counters' _total."""
    run = monitored_run(tmp_path_factory.mktemp("monitored"), tiny_demo)
    assert run.returncode == 0, run.output[-3000:]
    names = set()
    for family in text_string_to_metric_families((run.run_dir / SNAPSHOT_FILE).read_text()):
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def all_panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets, variable queries, annotations."""
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_dashboard_matches_grafanas_schema(dashboard):
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)


def test_dashboard_follows_the_rules_of_its_schema_version(dashboard):
    version = dashboard["schemaVersion"]
    assert 36 <= version <= 41, version  # the rules below are those of Grafana 9.3 (36) to 11 (39-41)
    panels = all_panels(dashboard)
    # 36: every datasource is a reference {type, uid}, never a name
    refs = [p["datasource"] for p in panels if "datasource" in p]
    refs += [t["datasource"] for p in panels for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs and all(isinstance(r, dict) and r.get("type") and r.get("uid") for r in refs), refs
    for p in panels:
        legend = p["options"].get("legend") if p["type"] != "row" else None
        if legend is not None:  # 37: a hidden legend is showLegend false, not displayMode "hidden"
            assert "showLegend" in legend and legend["displayMode"] in ("list", "table"), p["title"]
        if p["type"] == "table":  # 38: cells are styled by cellOptions, displayMode is gone
            custom = p["fieldConfig"]["defaults"].get("custom", {})
            assert "displayMode" not in custom and "cellOptions" in custom, p["title"]
            # 39: the renamed transformation takes refIdToStat; ours are plain merge/organize
            assert {t["id"] for t in p["transformations"]} <= {"merge", "organize", "reduce"}, p["title"]


def test_panels_have_unique_ids_distinct_queries_and_do_not_overlap(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    assert {p["type"] for p in panels} <= {"row", "timeseries", "stat", "table"}
    cells = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_every_metric_the_dashboard_queries_is_exported(dashboard, exported_names):
    used = {name for expr in queries(dashboard) for name in re.findall(r"\balexnet_[a-z0-9_]+", expr)}
    assert used, "no alexnet_ metric in the dashboard"
    missing = sorted(used - exported_names)
    assert not missing, f"the dashboard queries metrics the exporter does not serve: {missing}"


def test_dashboard_shows_what_the_issue_asks_for(dashboard):
    exprs = "\n".join(queries(dashboard))
    for name in ("alexnet_images_per_second", "alexnet_train_loss", "alexnet_val_loss", "alexnet_train_error_ratio",
                 "alexnet_val_error_ratio", "alexnet_bubble_ratio", "alexnet_data_wait_seconds_total",
                 "alexnet_bad_samples_total", "alexnet_checkpoint_duration_seconds_sum", "alexnet_restarts_total",
                 "alexnet_process_resident_memory_bytes", "alexnet_actor_resident_memory_bytes",
                 "alexnet_actor_device_memory_allocated_bytes", "alexnet_decoded_images_per_second"):
        assert name in exprs, name
    # the time breakdown: one stacked panel per (stage, tower), every phase of cluster/telemetry/metrics.py
    stacked = [p for p in all_panels(dashboard)
               if p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"]
    assert len(stacked) == 1, [p["title"] for p in stacked]
    breakdown = stacked[0]
    assert breakdown["repeat"] == "tower"
    above = dashboard["panels"][:dashboard["panels"].index(breakdown)]
    row = [p for p in above if p["type"] == "row"][-1]  # the row it belongs to: repeated per stage
    assert row.get("repeat") == "stage", row
    assert sorted(re.search(r"alexnet_actor_(\w+)_seconds_total", t["expr"]).group(1)
                  for t in breakdown["targets"]) == sorted(PHASES)
    assert all('stage="$stage"' in t["expr"] and 'tower="$tower"' in t["expr"] for t in breakdown["targets"])


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    datasources = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    providers = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "alexnet-towers.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "${ALEXNET_DASHBOARDS}"


def test_prometheus_config_scrapes_the_driver_and_rays_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["alexnet"]["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_PORT}"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.path.exists(promtool):
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but promtool is missing: apt-get install prometheus")
        pytest.skip("no promtool (Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
