"""GLM-4-9B-Chat prompts as token ids, following the chat_template of its tokenizer_config.json.

    [gMASK]<sop>
    <|system|>\n{tools text}                   if tools are given (content None in the template)
    <|role|>{metadata}\n{content}              per message with content
    <|assistant|>                               with add_generation_prompt

Role tokens are inserted by id; the text between two special tokens is encoded as one run, as
transformers encodes the rendered template, so the ids equal that rendering's wherever message
text holds no special-token strings (in ours such text stays text). The tools text is the
template's text as written, which is also THUDM's Python formatting ("\n\n## name\n\n{json}");
transformers renders templates with trim_blocks, which drops the first "\n" after each
`{% if tool['type'] == ... %}` tag. Tool calls are `<|assistant|>{name}\n{arguments JSON}`,
their results `<|observation|>\n{result}` (THUDM's GLM-4 openai_api_server).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from glmserve.chat.chatglm import Encode, Turn, glm_turns

# Generation ends at <|endoftext|> (eos) and at the start of a turn that is not the model's.
GLM4_STOP_TOKENS = ("<|user|>", "<|observation|>")

TOOLS_HEADER = (
    "\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n"
    "\n"
    "# 可用工具"
)
FUNCTION_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
# Built-in tools of GLM-4 All Tools, by type: the text the template writes for each.
BUILTIN_TOOL_TEXTS = {
    "python": (
        "\n"
        "\n"
        "## python\n"
        "\n"
        "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    ),
    "simple_browser": (
        "\n"
        "\n"
        "## simple_browser\n"
        "\n"
        "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n"
        "\n"
        "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n"
        "\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    ),
    "cogview": (
        "\n"
        "\n"
        "## cogview\n"
        "\n"
        "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    ),
}


def glm4_prompt(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None,
    add_generation_prompt: bool,
    encode: Encode,
    special_ids: Mapping[str, int],
) -> list[int]:
    """Prompt ids after the `[gMASK]<sop>` prefix."""
    turns = glm_turns(messages, glm4_tool_call)
    if tools:  # as THUDM's server: a system item holding only the tools, first
        turns = [Turn("system", "", tools=list(tools)), *turns]
    ids: list[int] = []
    for turn in turns:
        if turn.tools:
            ids += [special_ids["<|system|>"], *encode(tools_text(turn.tools))]
        if turn.content:
            ids += [special_ids[f"<|{turn.role}|>"], *encode(f"{turn.metadata}\n{turn.content}")]
    if add_generation_prompt:
        ids.append(special_ids["<|assistant|>"])
    return ids


def tools_text(tools: Sequence[Mapping]) -> str:
    """The system text listing the tools: OpenAI function tools, or GLM-4's built-in ones by type."""
    text = TOOLS_HEADER
    for tool in tools:
        kind = tool.get("type")
        if kind == "function":
            function = tool["function"]
            text += f"\n\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}"
            text += FUNCTION_SUFFIX
        elif kind in BUILTIN_TOOL_TEXTS:
            text += BUILTIN_TOOL_TEXTS[kind]
        else:
            raise ValueError(
                f"unsupported tool type {kind!r} (supported: function, {', '.join(BUILTIN_TOOL_TEXTS)})"
            )
    return text


def glm4_tool_call(name: str, arguments: dict) -> str:
    """What GLM-4 writes after `<|assistant|>{name}\n`: the arguments as JSON."""
    return json.dumps(arguments, ensure_ascii=False)
