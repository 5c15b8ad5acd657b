"""The UI's agent runner in a running server's process: the code interpreter contains an endless
loop and a 10 GB allocation while the server keeps answering. The model is the TEST-ONLY scripted
decoder (tests/serving/scripted_decoder.py)."""

import asyncio
import threading

import httpx
import pytest
from scripted_decoder import OBSERVATION_ID, ScriptedDecoderEngine, ServerThread

from glmserve.agent.glm_runner import GLMAgentRunner
from glmserve.agent.interpreter import CodeInterpreter
from glmserve.agent.runner import AgentRequest, AgentRunner
from glmserve.devtools import PRESETS_DIR
from glmserve.serving.registry import ModelRegistry, wrap_engines
from glmserve.serving.service import ChatService
from glmserve.tokenization.glm import load_glm_tokenizer

CHATGLM3_DIR = PRESETS_DIR / "chatglm3"
CODE = {"loop": "while True: pass", "bomb": "block = bytearray(10 * 2**30)"}


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_glm_tokenizer(CHATGLM3_DIR)

    def script(prompt_ids):
        text = tokenizer.decode(prompt_ids)
        if OBSERVATION_ID in prompt_ids:
            answer = "\nDone."
        else:
            answer = f"interpreter\n```python\n{CODE['bomb' if 'bomb' in text else 'loop']}\n```"
        return tokenizer.encode(answer, add_special_tokens=False) + [OBSERVATION_ID]

    engine = ScriptedDecoderEngine(tokenizer, script)
    interpreter = CodeInterpreter(timeout_s=8, memory_limit_bytes=2 * 2**30)
    runner = GLMAgentRunner(interpreter=interpreter)
    service = ChatService(ModelRegistry(wrap_engines({"scripted": (engine, tokenizer)})), max_queue=8)
    with ServerThread({"scripted": engine}) as server:
        yield server, runner, service
    interpreter.shutdown()


def run_agent(runner, service, content, conversation_id, out):
    async def collect():
        request = AgentRequest("code", conversation_id, [{"role": "user", "content": content}])
        return [s async for s in runner.run(service, request)]

    out[conversation_id] = asyncio.run(collect())


@pytest.mark.timeout(180)
def test_server_answers_while_code_loops_and_allocates(setup):
    server, runner, service = setup
    assert isinstance(runner, AgentRunner) and runner.modes == ("tool", "code")
    results: dict = {}
    workers = [
        threading.Thread(target=run_agent, args=(runner, service, "spin " + name, name, results))
        for name in ("loop", "bomb")
    ]
    for worker in workers:
        worker.start()
    answers = 0
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        while any(w.is_alive() for w in workers) or answers == 0:
            body = {"messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.get("/health").status_code == 200
            answers += 1
    for worker in workers:
        worker.join()
    loop_steps, bomb_steps = results["loop"], results["bomb"]
    assert [s.kind for s in loop_steps][:2] == ["code", "error"] and "interrupted" in loop_steps[1].content
    assert any(s.kind == "error" and "MemoryError" in s.content for s in bomb_steps)
    assert loop_steps[-1].kind == bomb_steps[-1].kind == "text"
    runner.forget("loop")
    assert {t.name for t in runner.list_tools()} == {"get_current_time", "calculator", "python"}
