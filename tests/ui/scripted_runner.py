"""A test double for issue 7's agent loop: replays fixed steps, so the tabs can be tested now."""

from __future__ import annotations

from glmserve.agent.runner import AgentStep, ToolInfo

# A 1x1 red PNG, as a code interpreter's plot would arrive.
RED_PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


class ScriptedRunner:
    modes = ("tool", "code")

    def __init__(self):
        self.requests = []
        self.forgotten: list[str] = []

    def list_tools(self) -> list[ToolInfo]:
        return [ToolInfo("get_weather", "Weather of a city")]

    async def run(self, service, request):
        self.requests.append(request)
        if request.mode == "tool":
            yield AgentStep("tool_call", name="get_weather", arguments={"city": "Paris"})
            yield AgentStep("observation", '{"temperature_c": 21}', name="get_weather")
            yield AgentStep("text", "It is 21 °C in Paris.")
        else:
            yield AgentStep("code", "plot()")
            yield AgentStep("image", RED_PIXEL)
            yield AgentStep("error", "NameError: name 'plot2' is not defined")
            yield AgentStep("text", "Here is the plot.")

    def forget(self, conversation_id: str) -> None:
        self.forgotten.append(conversation_id)
