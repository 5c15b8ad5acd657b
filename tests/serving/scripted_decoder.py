"""A TEST-ONLY stand-in for AsyncEngine: a "scripted decoder" that ignores the model and emits a
fixed ChatGLM3-format token sequence through the real tokenizer, so the server's tool-call path
can be tested end to end (random-weight checkpoints only produce random text). Never served to
users: it lives under tests/ and is plugged in with create_app(engines={name: (engine, engine.tokenizer)})."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace

import uvicorn
from server_process import free_port, wait_for

from glmserve.engine.outputs import StreamOutput
from glmserve.serving.app import create_app
from glmserve.serving.settings import ServeSettings

OBSERVATION_ID = 64797  # ChatGLM3's <|observation|>: where a real model stops after a call


class ScriptedDecoderEngine:
    def __init__(self, tokenizer, script: Callable[[list[int]], list[int]]):
        self.script = script  # prompt ids -> the ids to emit (the last one is the stop token)
        self.prompts: list[list[int]] = []
        self.tokenizer = tokenizer
        model_config = SimpleNamespace(extra={"model_type": "chatglm"}, architecture="ChatGLMModel",
                                       vocab_size=65024, generation_config={})  # fmt: skip
        self.engine = SimpleNamespace(
            max_model_len=8192,
            kv_cache_tokens=8192,
            block_manager=SimpleNamespace(num_free_blocks=1, num_blocks=1),
            model_config=model_config,
        )

    def stats(self) -> dict:
        return {}

    def shutdown(self, timeout_s: float = 10.0) -> None:
        pass

    async def generate(self, request_id, prompt_ids, params, lora=None):
        self.prompts.append(list(prompt_ids))
        tokenizer, ids = self.tokenizer, self.script(list(prompt_ids))
        text = ""
        for n, token_id in enumerate(ids, start=1):
            is_stop = n == len(ids)
            # Decode the whole prefix each time, as an incremental detokenizer would, so deltas
            # follow the real SentencePiece spacing.
            full = tokenizer.decode(ids[: n - 1 if is_stop else n])
            delta, text = full[len(text) :], full
            yield StreamOutput(
                request_id,
                [token_id],
                delta,
                finish_reason="stop" if is_stop else None,
                stop_reason=token_id if is_stop else None,
                num_prompt_tokens=len(prompt_ids),
            )


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a thread of the test process."""

    def __init__(self, engines: dict[str, ScriptedDecoderEngine]):
        served = {name: (engine, engine.tokenizer) for name, engine in engines.items()}
        app = create_app(ServeSettings(no_ui=True), engines=served)
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert wait_for(lambda: self.server.started, timeout_s=30), "server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
