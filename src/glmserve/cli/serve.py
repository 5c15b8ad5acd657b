"""`glmserve serve`: its flags are generated from ServeSettings, so each setting is declared once
(name, type, default, help) and gets a `--flag` and a `GLMSERVE_FLAG` environment variable.

It builds the app (serving/) and mounts the web UI (ui/) with its agent runner (agent/) on it: the
one place these layers are wired together. Registered on the main typer app with
`app.command()(serve)`; alone: `python -m glmserve.cli.serve`.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from glmserve.serving.settings import ENV_PREFIX, ServeSettings


def serve(**options: Any) -> None:
    """Serve models over HTTP: the OpenAI API (/v1/...), the classic ChatGLM API (POST /,
    /chatglm, /<name>), /health and /metrics.

    SIGTERM or Ctrl-C stops taking requests, lets those in flight finish, then stops the engines.
    """
    settings = _settings(options)
    try:
        settings.check_exposure()
        app = build_app(settings, agent_runner=_agent_runner(settings) if _wants_agent(settings) else None)
    except (ValueError, RuntimeError) as error:  # bad names, missing model paths
        _fail(str(error))
    _run(app, settings)


def build_app(settings: ServeSettings, engines: Any = None, agent_runner: Any = None) -> Any:
    """The API app with the web UI at /ui unless --no-ui; an agent runner (agent/glm_runner.py) adds
    the UI's Tool / Code Interpreter tabs. `engines` as for serving.app.create_app."""
    from glmserve.serving.app import create_app  # fastapi and friends: only when serving

    app = create_app(settings, engines)
    if not settings.no_ui:
        from glmserve.ui import mount_ui  # imports gradio: only when the UI is on

        mount_ui(app, settings, app.state.model_names, agent_runner)
    return app


def _wants_agent(settings: ServeSettings) -> bool:
    if settings.no_ui:
        return False
    if not settings.may_run_code:
        typer.echo(
            f"warning: no Tool / Code Interpreter tabs: {settings.host} is served without API keys, "
            "and they run code on this machine",
            err=True,
        )
    return settings.may_run_code


def _agent_runner(settings: ServeSettings) -> Any:
    """The UI's Tool / Code Interpreter tabs; hidden when the code interpreter's packages are missing.
    The Code Interpreter tab needs the sandbox, or --allow-unsandboxed-code: said here, once."""
    try:
        from glmserve.agent.glm_runner import GLMAgentRunner
        from glmserve.agent.interpreter import CodeInterpreter, SandboxUnavailable
    except ImportError as error:  # jupyter_client / ipykernel
        typer.echo(f"warning: no Tool / Code Interpreter tabs ({error})", err=True)
        return None
    try:
        interpreter = CodeInterpreter(allow_unsandboxed=settings.allow_unsandboxed_code)
    except SandboxUnavailable as error:
        typer.echo(f"warning: no Code Interpreter tab: {error}", err=True)
        return GLMAgentRunner(interpreter=None)
    if interpreter.status.is_sealed:
        typer.echo(f"Code Interpreter: {interpreter.status.describe()}", err=True)
    else:
        typer.echo(f"warning: the Code Interpreter runs code UNSEALED (--allow-unsandboxed-code): "
                   f"{interpreter.status.detail}", err=True)  # fmt: skip
    return GLMAgentRunner(interpreter=interpreter)


def _run(app: Any, settings: ServeSettings) -> None:
    import uvicorn

    from glmserve.serving.logs import logging_config

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )


def _settings(options: dict[str, Any]) -> ServeSettings:
    given = {name: value for name, value in options.items() if value is not None and value != ()}
    given = {name: value.value if isinstance(value, enum.Enum) else value for name, value in given.items()}
    try:
        return ServeSettings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "settings"
        _fail(f"{flag}: {first['msg']}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


# -- flags from the settings' fields -------------------------------------------------------------


def _cli_type(name: str, annotation: Any) -> Any:
    """The type typer parses: the field's own without None (every flag may be left out); a
    Literal becomes a str Enum, which every typer version shows and checks as choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _cli_type(name, inner)
    if typing.get_origin(annotation) is typing.Literal:
        return enum.Enum(name.title().replace("_", ""), {v: v for v in typing.get_args(annotation)}, type=str)
    return annotation


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    decls = [flag, *([extra["short"]] if "short" in extra else [])]
    cli_type = _cli_type(name, field.annotation)
    default = None if field.is_required() or field.default_factory else field.default
    if name == "kv_cache_memory":
        cli_type, default = str, str(default)  # also takes sizes like 512MiB
    option = typer.Option(
        *decls, help=field.description, envvar=ENV_PREFIX + name.upper(), metavar=extra.get("metavar")
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[cli_type | None, option], default=default
    )


serve.__signature__ = inspect.Signature([_parameter(n, f) for n, f in ServeSettings.model_fields.items()])


if __name__ == "__main__":
    typer.run(serve)
