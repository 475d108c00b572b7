"""A client that hangs up in the middle of its request body is one info line in the server's
log, not a traceback: the real app under uvicorn on a loopback port (a tiny random model), a
raw socket that promises 1000 bytes, sends 20 and closes."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    import uvicorn
    from tests.helpers.serve_helpers import free_port
    from tests.helpers.tiny_runs import make_tiny_runs

    from edge_tune.commands.serve import open_serving, plan_serving
    from edge_tune.server.app import build_app
    from edge_tune.server.scheduler import Scheduler

    runs = make_tiny_runs(tmp_path_factory.mktemp("hangup"), default_gguf)
    plan = plan_serving([], str(runs["base"]))
    engine = open_serving(plan, n_ctx=64, threads=1, parallel=2)
    scheduler = Scheduler(engine)
    port = free_port()
    app = build_app(scheduler, ["base"], admin={"plan": plan, "loopback": True})
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info",
                                        access_log=False, lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 60
        while not srv.started:  # a condition, not a fixed wait
            assert time.monotonic() < end and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield port
    finally:
        srv.should_exit = True
        thread.join(30)
        scheduler.close()
        engine.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/adapters"])
def test_a_client_hanging_up_mid_body_is_one_info_line(server, caplog, path):
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n".encode() + b'{"model": "base", "me')
    said = f"POST {path}: the client hung up before sending the whole request body"
    end = time.monotonic() + 60
    while not any(said in r.getMessage() for r in caplog.records):
        assert time.monotonic() < end, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    hung = [r for r in caplog.records if said in r.getMessage()]
    assert len(hung) == 1 and hung[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], \
        [r.getMessage() for r in caplog.records]
