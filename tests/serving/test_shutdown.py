"""SIGTERM: the server stops taking requests, finishes those in flight, then stops its engines."""

import json
import signal

import httpx
from server_process import SMALL_ENGINE, start_server, stop_server

NUM_TOKENS = 40


def test_sigterm_finishes_in_flight_streams():
    server = start_server(*SMALL_ENGINE)
    try:
        body = {"prompt": "Once upon a time", "stream": True, "max_tokens": NUM_TOKENS, "ignore_eos": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                server.process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data:")]
        chunks = [json.loads(line[5:]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once shut down cleanly, so the exit status says SIGTERM.
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        log = server.log()
        assert log.index("Shutting down") < log.index("engines stopped")
    finally:
        stop_server(server)
        server.log_path.unlink(missing_ok=True)
