"""The web page: HTML checked with selectors (a tiny stdlib parser below), full page against the htmx
fragment, the form without JavaScript, the permalink, escaping, the charts and the CLI parity."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.charts import Point, breakdown_bar, breakdown_segments, line_chart
from app.cli import build_parser, workload_from_args
from app.estimator.estimate import describe, estimate
from app.forms import WorkloadForm, form_from_workload
from app.main import create_app
from app.units import GIB

# --- a tiny DOM with CSS selectors: tag, #id, .class, [attr] and [attr=value], descendants ---------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
COMPOUND = re.compile(r"([a-zA-Z][\w-]*)?((?:[#.][\w-]+|\[[\w-]+(?:=[^\]]*)?\])*)")


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None
    data: str = ""

    def text(self) -> str:
        return self.data + "".join(child.text() for child in self.children)

    def iter(self):
        for child in self.children:
            yield child
            yield from child.iter()

    def select(self, selector: str) -> list[Node]:
        parts = selector.split()
        return [node for node in self.iter() if _matches(node, parts[-1]) and _ancestors_match(node, parts[:-1])]

    def one(self, selector: str) -> Node:
        found = self.select(selector)
        assert len(found) == 1, f"{selector!r} matched {len(found)} elements"
        return found[0]


def _matches(node: Node, compound: str) -> bool:
    if node.tag == "#text":
        return False
    tag, rest = COMPOUND.fullmatch(compound).groups()
    if tag and node.tag != tag.lower():
        return False
    for part in re.findall(r"#[\w-]+|\.[\w-]+|\[[^\]]+\]", rest or ""):
        if part[0] == "#" and node.attrs.get("id") != part[1:]:
            return False
        if part[0] == "." and part[1:] not in node.attrs.get("class", "").split():
            return False
        if part[0] == "[":
            name, _, value = part[1:-1].partition("=")
            if name not in node.attrs or (value and node.attrs[name] != value.strip("\"'")):
                return False
    return True


def _ancestors_match(node: Node, parts: list[str]) -> bool:
    ancestor = node.parent
    for compound in reversed(parts):
        while ancestor is not None and not _matches(ancestor, compound):
            ancestor = ancestor.parent
        if ancestor is None:
            return False
        ancestor = ancestor.parent
    return True


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs}, parent=self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(Node("#text", data=data, parent=self.current))


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    return builder.root


def form_values(dom: Node) -> dict[str, str]:
    """What the browser would send for the form (text inputs, selects, checked boxes, textareas)."""
    values: dict[str, str] = {}
    for node in dom.one("form#workload-form").iter():
        name = node.attrs.get("name")
        if not name:
            continue
        if node.tag == "input" and (node.attrs.get("type") != "checkbox" or "checked" in node.attrs):
            values[name] = node.attrs.get("value", "")
        elif node.tag == "select":
            selected = [option for option in node.select("option") if "selected" in option.attrs]
            values[name] = (selected or node.select("option"))[0].attrs["value"]
        elif node.tag == "textarea":
            values[name] = node.text()
    return values


# --- fixtures ---------------------------------------------------------------------------------------

QLORA_T4_FORM = {"model": "meta-llama/Llama-2-7b-hf", "gpu": "nvidia-t4-16gb", "method": "qlora", "batch_size": "1",
                 "seq_len": "1024", "precision": "fp16", "optim": "paged_adamw_8bit"}
HX = {"HX-Request": "true"}


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(), raise_server_exceptions=False)


# --- the page and the fragment ----------------------------------------------------------------------

def test_the_page_has_one_form_that_htmx_posts_as_inputs_change(client):
    response = client.get("/")
    assert response.status_code == 200 and "HX-Request" in response.headers["vary"]
    dom = parse(response.text)
    form = dom.one("form#workload-form")
    assert form.attrs["method"] == "post" and form.attrs["action"] == "/" and form.attrs["hx-post"] == "/"
    assert form.attrs["hx-target"] == "#results"
    assert "input changed delay:300ms" in form.attrs["hx-trigger"] and "change" in form.attrs["hx-trigger"]
    assert len(dom.select("section#results")) == 1
    assert dom.one("#results .verdict-line").text().strip()
    for name in ("model", "config", "gpu", "num_gpus", "method", "quant_type", "lora_r", "lora_targets", "batch_size", "seq_len",
                 "grad_accum", "gradient_checkpointing", "optim", "precision", "attn"):
        assert form.select(f"[name={name}]"), name
    assert len(dom.select("datalist#model-list option")) >= 40


def test_the_page_has_no_inline_script_or_style(client):
    dom = parse(client.get("/").text)
    scripts = dom.select("script")
    assert scripts and all(script.attrs.get("src", "").startswith("/static/") and not script.text().strip() for script in scripts)
    assert not dom.select("style")
    assert not [node.tag for node in dom.iter() if "style" in node.attrs or any(name.startswith("on") for name in node.attrs)]


def test_htmx_gets_only_the_results_fragment_and_the_permalink_in_hx_push_url(client):
    response = client.post("/", data=QLORA_T4_FORM, headers=HX)
    assert response.status_code == 200
    assert "HX-Request" in response.headers["vary"]
    assert response.text.lstrip().startswith("<section id=\"results\"")
    dom = parse(response.text)
    assert not dom.select("html") and not dom.select("form#workload-form")  # only the simulate button's form
    pushed = response.headers["hx-push-url"]
    assert pushed.startswith("/?") and parse_qs(urlsplit(pushed).query)["method"] == ["qlora"]
    assert dom.one("a#permalink").attrs["href"] == pushed


def test_a_history_restore_gets_the_whole_page(client):
    response = client.get("/", headers={**HX, "HX-History-Restore-Request": "true"})
    assert parse(response.text).select("html") and "hx-push-url" not in response.headers


def test_without_javascript_a_plain_post_returns_the_whole_page_with_the_answer(client, catalog):
    response = client.post("/", data=QLORA_T4_FORM)
    assert response.status_code == 200
    dom = parse(response.text)
    assert dom.select("html") and dom.select("form#workload-form")
    expected = estimate(WorkloadForm.model_validate(QLORA_T4_FORM).to_workload(), catalog)
    assert dom.one("#verdict").text() == describe(expected)
    assert describe(expected).startswith("Fits on NVIDIA T4 16 GB with")
    assert form_values(dom)["method"] == "qlora" and form_values(dom)["gpu"] == "nvidia-t4-16gb"


def test_the_permalink_restores_the_same_form_and_answer(client):
    posted = parse(client.post("/", data=QLORA_T4_FORM | {"batch_size": "3", "gradient_checkpointing": "false"}).text)
    restored = parse(client.get(posted.one("a#permalink").attrs["href"]).text)
    assert form_values(restored) == form_values(posted)
    assert form_values(restored)["batch_size"] == "3" and form_values(restored)["gradient_checkpointing"] == "false"
    assert restored.one("#verdict").text() == posted.one("#verdict").text()
    assert restored.one("#peak").text() == posted.one("#peak").text()


def _post_pairs(client: TestClient, pairs: list[tuple[str, str]]) -> Node:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return parse(client.post("/", content=urlencode(pairs), headers=headers).text)


def test_an_unchecked_box_stays_unchecked(client):
    # The form sends a hidden "false" before each checkbox; the last value wins.
    assert "checked" not in _post_pairs(client, [("gradient_checkpointing", "false")]).one("#f-gc").attrs
    checked = _post_pairs(client, [("gradient_checkpointing", "false"), ("gradient_checkpointing", "true")])
    assert "checked" in checked.one("#f-gc").attrs


def test_a_script_tag_in_a_pasted_config_is_shown_as_text(client):
    config = {"architectures": ["<script>alert('x')</script>"], "model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
              "vocab_size": 50257, "n_positions": 1024}
    response = client.post("/", data={"config": json.dumps(config), "method": "full", "gpu": "T4"})
    assert response.status_code == 200
    assert "<script>alert" not in response.text
    dom = parse(response.text)
    assert all(script.attrs.get("src") for script in dom.select("script"))
    assert json.loads(dom.one("textarea#f-config").text()) == config


def test_a_script_tag_as_the_config_name_is_refused_and_shown_as_text(client):
    """``_name_or_path`` names the model and goes into the exported train.py: it must be an id or a path
    (app.configcheck), so markup there is refused, and shown back escaped."""
    config = {"_name_or_path": "<script>alert('x')</script>", "model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
              "vocab_size": 50257, "n_positions": 1024}
    response = client.post("/", data={"config": json.dumps(config), "method": "full", "gpu": "T4"})
    assert response.status_code == 422
    assert "<script>alert" not in response.text
    dom = parse(response.text)
    assert "model.config._name_or_path" in [code.text() for code in dom.select(".issues li code")]
    assert "<script>alert('x')" in dom.one(".issues").text()
    assert all(script.attrs.get("src") for script in dom.select("script"))
    assert json.loads(dom.one("textarea#f-config").text()) == config


def test_a_script_tag_in_the_model_field_is_escaped_in_the_error(client):
    response = client.post("/", data={"model": "<script>alert(1)</script>"}, headers=HX)
    assert response.status_code == 422  # htmx is configured to swap 422 (meta htmx-config)
    assert "<script>alert(1)" not in response.text
    assert "unknown model" in parse(response.text).one(".issues").text()


@pytest.mark.parametrize(
    ("data", "field", "shown"),
    [
        ({"batch_size": "abc"}, "batch_size", "abc"),
        ({"batch_size": "0"}, "training.per_device_train_batch_size", "0"),
        ({"gpu": "T5000"}, "hardware.gpu", None),
        ({"config": "{not json"}, "config", None),  # the field of the pasted text (app.jsonlimits)
        ({"num_gpus": "0"}, "hardware.num_gpus", "0"),
        ({"lora_targets": "nope_proj"}, "lora.target_modules", None),
    ],
)
def test_bad_input_shows_the_field_and_keeps_what_was_typed(client, data, field, shown):
    response = client.post("/", data=data)
    assert response.status_code == 422
    dom = parse(response.text)
    assert field in [code.text() for code in dom.select(".issues li code")]
    if shown is not None:
        assert form_values(dom)[next(iter(data))] == shown
    assert "Traceback" not in response.text


def test_every_figure_is_labelled_gib_or_gb(client):
    dom = parse(client.post("/", data=QLORA_T4_FORM).text)
    figures = [node.text().strip() for node in dom.select(".figures dd")]
    byte_figures = [text for text in figures if re.search(r"\d\.\d", text)]
    assert byte_figures and all(re.search(r"\d (GiB|GB)$", text) for text in byte_figures), byte_figures
    cells = [node.text().strip() for node in dom.select("table.terms td.num")]
    assert cells and all(text.endswith((" GiB", " GB")) for text in cells)


def test_the_breakdown_bar_and_the_charts_are_inline_svg_with_the_limit(client):
    dom = parse(client.post("/", data=QLORA_T4_FORM).text)
    bar = dom.one("svg.breakdown")
    assert len(bar.select("rect.seg")) == len(dom.select("table.terms tbody tr")) and bar.select("line.limit")
    charts = dom.select("svg.sweep")
    assert len(charts) == 2 and all(chart.select("line.limit") for chart in charts)
    assert "usable 14.7 GiB" in bar.text()  # T4: 15,828,320,256 bytes = 14.74 GiB


def test_copy_as_api_call_and_cli_command(client):
    dom = parse(client.post("/", data=QLORA_T4_FORM).text)
    curl = dom.one("pre#curl-cmd").text()
    assert curl.startswith("curl -sS http://testserver/api/v1/estimate")
    body = json.loads(curl.split("<<'EOF'\n", 1)[1].rsplit("\nEOF", 1)[0])
    assert body == WorkloadForm.model_validate(QLORA_T4_FORM).workload_data()
    assert dom.one("pre#cli-cmd").text().startswith("vramplan estimate")
    assert dom.select("button.copy[data-copy=curl-cmd]") and dom.select("button.copy[data-copy=cli-cmd]")


def test_static_files_carry_cache_headers(client):
    dom = parse(client.get("/").text)
    hashed = dom.one("link[rel=stylesheet]").attrs["href"]
    assert re.fullmatch(r"/static/app\.css\?v=[0-9a-f]{12}", hashed)
    assert "immutable" in client.get(hashed).headers["cache-control"]
    assert client.get("/static/app.css").headers["cache-control"] == "public, max-age=3600"
    assert client.get("/static/htmx.min.js").status_code == 200 and client.get("/static/htmx-LICENSE").status_code == 200


# --- the form and the CLI speak one Workload --------------------------------------------------------

FORMS = [
    {},
    QLORA_T4_FORM,
    {"method": "full", "dtype": "bfloat16", "precision": "bf16", "gpu": "nvidia-a100-80gb", "num_gpus": "8", "strategy": "zero3"},
    {"method": "int8-lora", "lora_r": "8", "lora_targets": "q_proj,v_proj", "gradient_checkpointing": "false", "attn": "eager"},
    {"method": "inference", "batch_size": "8", "seq_len": "4096", "max_new_tokens": "256", "precision": "fp32"},
    {"method": "qlora", "quant_type": "fp4", "double_quant": "false", "grad_accum": "16"},
    {"config": json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}), "method": "lora"},
    {"method": "lora", "lora_targets": ""},
    {"method": "lora", "dora": "true", "lora_r": "32", "lora_targets": "q_proj,v_proj"},
    {"method": "qlora", "dora": "true"},
    {"extra": json.dumps({"lora": {"lora_alpha": 32}, "training": {"loss_implementation": "chunked_cross_entropy"}})},
]


@pytest.mark.parametrize("data", FORMS)
def test_copy_as_cli_command_builds_the_same_workload_as_the_form(tmp_path, data):
    form = WorkloadForm.model_validate(data)
    body = json.dumps(form.workload_data(), indent=2)
    if form.flags_suffice:
        argv = ["estimate", *form.cli_args()]
    else:
        command = form.cli_command(body)
        (tmp_path / "workload.json").write_text(command.split("<<'EOF'\n", 1)[1].rsplit("\nEOF", 1)[0])
        argv = ["estimate", "--workload", str(tmp_path / "workload.json")]
    assert workload_from_args(build_parser().parse_args(argv)) == form.to_workload()


@pytest.mark.parametrize("data", FORMS)
def test_a_workload_said_by_the_form_comes_back_to_the_same_form(data):
    form = WorkloadForm.model_validate(data)
    again = form_from_workload(form.to_workload())
    assert again is not None and again.to_workload() == form.to_workload()


# --- charts -----------------------------------------------------------------------------------------

def test_breakdown_bar_has_one_segment_per_nonzero_term_and_marks_usable_memory():
    terms = {"weights": 4 * GIB, "gradients": 0, "activations": 2 * GIB, "cuda_context": GIB // 2}
    svg = breakdown_bar(terms, usable_bytes=8 * GIB)
    assert svg.count('class="seg"') == 3 and "usable 8.0 GiB" in svg
    assert [segment.label for segment in breakdown_segments(terms)] == ["Weights", "Activations", "CUDA context"]


def test_line_chart_colours_points_by_fit_and_draws_the_limit():
    points = [Point(1, 4 * GIB, True), Point(2, 6 * GIB, True), Point(4, 10 * GIB, False)]
    svg = line_chart(points, usable_bytes=8 * GIB, current=2, x_label="micro-batch size")
    assert svg.count('class="fits"') == 2 and svg.count('class="over"') == 1
    assert 'class="limit"' in svg and "usable 8.0 GiB" in svg and "micro-batch size" in svg


def test_chart_text_is_escaped():
    svg = line_chart([Point(1, GIB, True)], usable_bytes=2 * GIB, current=1, x_label="<b>x</b>")
    assert "<b>" not in svg and "&lt;b&gt;" in svg


# --- plans and downloads ----------------------------------------------------------------------------

def _stub_planner(workload: Any) -> SimpleNamespace:
    """A planner with the planner issue's interface, answering one plan: the workload itself."""

    def plan(workload, catalog, *, margin=0.05, top=5):
        option = SimpleNamespace(workload=workload, estimate=estimate(workload, catalog), score=1.0, why="fastest that fits")
        rejection = SimpleNamespace(setup="full fine-tuning, adamw_torch", reason="needs 80.0 GiB; the T4 has 14.7 GiB usable",
                                    peak_bytes=80 * GIB)
        return SimpleNamespace(plans=[option], rejected=[rejection])

    def limits(workload, catalog, *, margin=0.0):
        return SimpleNamespace(max_micro_batch_size=6, max_seq_length=8192)

    def fixes(workload, catalog, *, margin=0.0):
        return [SimpleNamespace(change="turn on gradient checkpointing", saves_bytes=GIB, workload=workload,
                                estimate=estimate(workload, catalog))]

    return SimpleNamespace(plan=plan, limits=limits, fixes=fixes, PlanResult=object)


def test_the_plan_table_fixes_and_limits_come_from_the_planner(client, monkeypatch):
    import app.web

    stub = _stub_planner(None)
    monkeypatch.setattr(app.web, "plan_setups", stub.plan)
    monkeypatch.setattr(app.web, "planner_limits", stub.limits)
    monkeypatch.setattr(app.web, "planner_fixes", stub.fixes)
    dom = parse(client.post("/", data=QLORA_T4_FORM | {"batch_size": "64"}).text)
    assert "Does not fit" in dom.one("#verdict").text()
    rows = dom.select("table.plans tbody tr")
    assert len(rows) == 1 and "fastest that fits" in rows[0].text()
    links = [a.attrs["href"] for a in rows[0].select("a")]
    assert any("plan=0" in href and "file=train.py" in href for href in links)
    opened = next(href for href in links if href.startswith("/?"))
    assert form_values(parse(client.get(opened).text))["method"] == "qlora"
    assert "turn on gradient checkpointing" in dom.one(".fixes").text()
    assert "the largest that fits is 6" in dom.text() and "8,192" in dom.text()
    assert "needs 80.0 GiB" in dom.one("details.rejected").text()


def test_the_real_planner_offers_fixes_and_plans_that_open_as_forms(client):
    dom = parse(client.post("/", data={"model": "meta-llama/Llama-2-7b-hf", "gpu": "nvidia-t4-16gb", "method": "full"}).text)
    assert dom.one("#verdict").text().startswith("Does not fit")
    fixes = dom.select(".fixes li")
    assert fixes and all(" GiB" in item.text() for item in fixes)
    rows = dom.select("table.plans tbody tr")
    assert rows
    opened = [a.attrs["href"] for a in rows[0].select("a") if a.attrs["href"].startswith("/?")]
    assert opened, "the best plan opens as a form"
    assert parse(client.get(opened[0]).text).one("#verdict").text().startswith("Fits on NVIDIA T4")
    applied = next(a.attrs["href"] for item in fixes for a in item.select("a"))
    assert parse(client.get(applied).text).select("#verdict")


def test_inference_shows_no_plan_table(client):
    dom = parse(client.post("/", data={"method": "inference"}).text)
    assert dom.select("#verdict") and not dom.select("table.plans")


def test_downloads_link_the_exported_files_of_the_workload_on_screen(client):
    dom = parse(client.post("/", data=QLORA_T4_FORM).text)
    links = {a.text(): a.attrs["href"] for a in dom.select("a.download")}
    assert "train.py" in links
    script = client.get(links["train.py"])
    assert script.status_code == 200 and "attachment" in script.headers["content-disposition"]
    compile(script.text, "train.py", "exec")
    assert client.get(links["all as .zip"]).headers["content-type"] == "application/zip"


def test_export_of_a_bad_form_is_a_plain_422(client):
    response = client.get("/export?batch_size=0&file=train.py")
    assert response.status_code in (422, 503) and "Traceback" not in response.text


def test_the_dora_box_asks_for_dora_and_says_so_in_the_cli_command(client):
    page = client.get("/", params={"method": "lora", "dora": "true"}).text
    assert 'id="f-dora"' in page and "checked" in page.split('id="f-dora"', 1)[1].split(">", 1)[0]
    form = WorkloadForm.model_validate({"method": "lora", "dora": "true"})
    assert form.to_workload().lora.use_dora and ("--dora",) in form.cli_flags()
    assert not WorkloadForm.model_validate({"method": "lora"}).to_workload().lora.use_dora
