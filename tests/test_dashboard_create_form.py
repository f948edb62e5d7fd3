"""The dashboard's form that creates an experiment, in real headless Chromium against a live scheduler:
built from the API's OpenAPI schema (so it cannot drift from it), a 422 shown next to its field, and
a valid form creating the experiment. Helpers: tests/dashboard_fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboard_fixtures import count, expect, launch_chromium, login, open_page, screenshot, start_scheduler
from services.scheduler.schemas import ExperimentSpec


# the module's fixtures: a live scheduler, Debian's Chromium (one per module) and a fresh page of it
scheduler = pytest.fixture(start_scheduler)
browser = pytest.fixture(scope="module")(launch_chromium)
page = pytest.fixture(open_page)


def test_create_form_shows_422_next_to_the_field(scheduler, page, tiny_model_dir, request):
    page.goto("/#/new")
    page.wait_for_selector('main[data-loaded="true"][data-page="create"]')
    login(page)
    page.fill("#field-name", "from-the-form")
    page.fill("#field-model", str(tiny_model_dir))
    for field, value in {"chunk_size": "16", "k": "32", "num_selections": "2", "train_batch_size": "4", "iters_per_select": "1"}.items():
        page.fill(f"#field-{field}", value)
    page.click("#create-submit")
    error = page.wait_for_selector('.field[data-field="k"] .field-error')
    assert "k=32" in error.inner_text()
    assert count(page, ".field-error") == 1
    assert page.get_attribute("#field-k", "aria-invalid") == "true"
    assert "error-k" in page.get_attribute("#field-k", "aria-describedby")
    assert page.is_visible("#form-errors")
    screenshot(page, "create-422", request)

    # a 422 raised by the service (model directory) lands next to the model field, the old error goes
    page.fill("#field-k", "4")
    page.fill("#field-model", str(tiny_model_dir.parent / "no-such-model"))
    page.click("#create-submit")
    page.wait_for_selector('.field[data-field="model"] .field-error')
    assert count(page, ".field-error") == 1 and count(page, '.field[data-field="k"] .field-error') == 0

    # a valid form creates the experiment and opens its page
    page.fill("#field-model", str(tiny_model_dir))
    page.click("#create-submit")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    assert "from-the-form" in page.inner_text("#exp-title")
    assert scheduler.app.state.experiments.list(None, 0, 10)[1] == 1


def _create_body_schema(doc: dict) -> dict:
    """The JSON schema of POST /api/v1/experiments' body in an OpenAPI document, its $ref resolved."""
    schema = doc["paths"]["/api/v1/experiments"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = schema["$ref"]
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_create_form_is_built_from_the_openapi_schema(scheduler, page, tiny_model_dir):
    """The form cannot drift from the API: one input per property of the body schema (ExperimentSpec),
    enums as selects with exactly the enum's options, the API's defaults prefilled; submitted with only
    the required fields filled, it creates an experiment whose config is the API's defaults."""
    doc = page.request.get(f"{scheduler.url}/openapi.json").json()
    schema = _create_body_schema(doc)
    props, required = schema["properties"], set(schema["required"])
    assert {"weight_decay", "reuse_rollouts", "keep_last_checkpoints", "keep_best_checkpoints", "priority", "max_grad_norm", "scoring_dtype"} <= set(props)
    page.goto("/#/new")
    page.wait_for_selector('main[data-loaded="true"][data-page="create"]')
    login(page)
    assert page.locator("#create-form .field[data-field]").evaluate_all("fs => fs.map(f => f.dataset.field)") == list(props)
    for name, prop in props.items():
        control = page.locator(f"#field-{name}")
        expect(control).to_have_count(1)
        assert page.locator(f'#create-form label[for="field-{name}"]').count() == 1, name
        assert (control.get_attribute("aria-required") == "true") == (name in required), name
        if "enum" in prop:
            assert control.evaluate("el => el.tagName") == "SELECT", name
            assert control.locator("option").evaluate_all("os => os.map(o => o.value)") == [str(v) for v in prop["enum"]], name
        if prop.get("type") == "boolean":
            assert control.get_attribute("type") == "checkbox" and control.is_checked() == bool(prop.get("default")), name
        elif "default" in prop:
            value = control.input_value()
            assert (float(value) == prop["default"]) if prop.get("type") in ("integer", "number") else value == str(prop["default"]), (name, value)
        if prop.get("description"):
            expect(page.locator(f"#help-{name}")).to_have_count(1)
    assert page.locator("#field-mode option").evaluate_all("os => os.map(o => o.value)") == props["mode"]["enum"]

    # only the required fields without a value are left to fill
    empty = [name for name in props if page.locator(f"#field-{name}").get_attribute("type") == "text" and not page.input_value(f"#field-{name}")]
    filled = {"model": str(tiny_model_dir), "chunk_size": 16, "k": 4, "num_selections": 2, "train_batch_size": 4, "iters_per_select": 1}
    assert set(empty) - {"keep_last_checkpoints", "scoring_memory_budget"} == set(filled), empty  # optional, default None
    for name, value in filled.items():
        page.fill(f"#field-{name}", str(value))
    page.click("#create-submit")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    (exp,), total = scheduler.app.state.experiments.list(None, 0, 10)
    assert total == 1
    expected = ExperimentSpec(**filled, train_dataset="arith-train", val_dataset="arith-val").model_dump(mode="json")
    config = {key: exp.config[key] for key in expected}
    assert Path(config.pop("model")).resolve() == Path(expected.pop("model")).resolve()
    assert config == expected
