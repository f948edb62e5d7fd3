"""Property-based API testing with schemathesis against the scheduler's own OpenAPI schema:
no 5xx, and every response conforms to the schema (status codes, bodies, content types, and
`ignored_auth`: an operation that declares a token refuses a request without one). Once per
operation, and once as stateful sequences that follow the links schemathesis infers between
operations (create an experiment, then read, cancel, resume or delete it; create a dataset,
then read it).

Left out, on purpose: /api/v1/events (an endless event stream), /readyz (answers 503 by
design when workers are down, as here) and `positive_data_acceptance` (a schema-valid
experiment is still refused with 422 when its model path or dataset does not exist on disk).
"""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from scheduler_fixtures import AUTH, emptied_database, experiment_body, make_settings
from services.scheduler.app import create_app


def _schema_of_app_with_one_experiment(tmp_path, database_url, model_dir):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as client:  # one real experiment so that some ids resolve
        assert client.post("/api/v1/experiments", json=experiment_body(model_dir)).status_code == 201
    return schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/api/v1/events").exclude(path="/readyz")


def test_api_conforms_to_its_schema(tmp_path, database_url, tiny_model_dir):
    schema = _schema_of_app_with_one_experiment(tmp_path, database_url, tiny_model_dir)
    failures, tested = {}, []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - collect every operation's failure, then report all
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures[operation.label] = str(exc)[:2000]
        tested.append(operation.label)
    assert len(tested) >= 12, tested
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


class FreshAppPerRun:
    """The ASGI app that schemathesis calls, forwarding to a scheduler made anew (fresh database and artifact
    store, one real experiment) for each state-machine run: a run's data then depends on nothing an earlier
    run stored, as Hypothesis requires to replay and shrink a sequence."""

    def __init__(self, tmp_path, database_url, model_dir):
        self.tmp_path, self.database_url, self.model_dir, self.runs, self.app = tmp_path, database_url, model_dir, 0, None

    def reset(self) -> None:
        self.runs += 1
        home = self.tmp_path / f"run-{self.runs}"
        url = f"sqlite:///{home / 'scheduler.db'}" if self.database_url.startswith("sqlite") else emptied_database(self.database_url)
        home.mkdir()
        self.app = create_app(make_settings(home, url))
        with TestClient(self.app, headers=AUTH) as client:
            assert client.post("/api/v1/experiments", json=experiment_body(self.model_dir)).status_code == 201

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def test_stateful_sequences_along_the_inferred_links_find_no_5xx(tmp_path, database_url, tiny_model_dir):
    target = FreshAppPerRun(tmp_path, database_url, tiny_model_dir)
    target.reset()
    schema = schemathesis.openapi.from_asgi("/openapi.json", target).exclude(path="/api/v1/events").exclude(path="/readyz")
    machine = schema.as_state_machine()
    links = [name for name in dir(machine) if "___20" in name]  # rules that follow a link from a 2xx response
    assert len(links) >= 20, links  # the schema's ids and names connect the operations

    class Workflow(machine):
        def setup(self):
            target.reset()

        def get_call_kwargs(self, case):
            return {"headers": AUTH}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, excluded_checks=[positive_data_acceptance], additional_checks=additional_checks)

    Workflow.run(
        settings=settings(max_examples=25, stateful_step_count=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    )
    assert target.runs > 1
