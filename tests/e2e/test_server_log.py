"""The log reader the e2e shutdown checks rely on (no server: fixed log excerpts)."""

from __future__ import annotations

from tests.e2e.server_log import SHUTDOWN_MARK, engine_failures, split_at_shutdown

# Shape of the CI log where vLLM's own teardown logged EngineDeadError after a clean SIGTERM.
_SERVING = "(APIServer pid=1) INFO [api_server.py] Starting vLLM API server\nINFO: 200 OK\n"
_TEARDOWN = (
    f"(APIServer pid=1) INFO [launcher.py:254] {SHUTDOWN_MARK}\n"
    "(APIServer pid=1) ERROR [async_llm.py] AsyncLLM output_handler failed.\n"
    "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
    "(APIServer pid=1) INFO [launcher.py:279] [shutdown] API server: engine client stopped\n"
)


def test_teardown_engine_dead_is_not_a_serving_failure() -> None:
    serving, shutdown = split_at_shutdown(_SERVING + _TEARDOWN)
    assert serving == _SERVING and shutdown == _TEARDOWN
    assert engine_failures(serving) == []
    assert len(engine_failures(shutdown)) == 2


def test_engine_death_while_serving_is_found() -> None:
    log = _SERVING + "ERROR EngineCore encountered a fatal error.\n" + _TEARDOWN
    serving, _ = split_at_shutdown(log)
    assert engine_failures(serving) == ["ERROR EngineCore encountered a fatal error."]


def test_no_shutdown_mark_means_all_of_it_is_serving() -> None:
    log = _SERVING + "vllm.v1.engine.exceptions.EngineDeadError\n"
    serving, shutdown = split_at_shutdown(log)
    assert shutdown == "" and len(engine_failures(serving)) == 1
