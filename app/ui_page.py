"""How the chat reads: math in answers, and the page's own keyboard help.

Gradio's Chatbot renders Markdown (tables, highlighted code with a copy button) and
KaTeX between the delimiters it is given; it matches them as plain strings, so with
`$` as a delimiter "it costs $5 and $10" turns into math. Answers are drawn through
`math_chat`, which rewrites only the spans that read as math by Pandoc's rule (a `$`
followed by a non-space, a closing `$` after a non-space and not before a digit, on
one line, outside code) into `\\(...\\)`, one of the delimiters the page renders.
Prices, shell variables in code and `$$...$$` blocks are left as they are; what is
stored is the model's own text.
"""
from __future__ import annotations

import re

import gradio as gr
from gradio.components.chatbot import TextMessage

LATEX = [{"left": "$$", "right": "$$", "display": True},
         {"left": "\\[", "right": "\\]", "display": True},
         {"left": "\\(", "right": "\\)", "display": False}]
MAX_MARKUP = 200_000  # characters: a longer message is shown as it is (no math rewrite)

# spans left alone: fenced code, inline code, display math and math already delimited
_KEEP = re.compile(r"(?ms)^[ \t]*(?P<fence>```|~~~).*?(?:^[ \t]*(?P=fence)[ \t]*$|\Z)"
                   r"|(?P<ticks>`+).+?(?P=ticks)"
                   r"|\$\$.+?\$\$|\\\(.+?\\\)|\\\[.+?\\\]")
_INLINE = re.compile(r"(?<![\\$])\$(?![\s$])((?:\\.|[^$\\\n]){1,2000}?)(?<![\s\\])\$(?![\d$])")

SHORTCUTS = ("**Keys:** Enter sends · Shift+Enter new line · Esc stops the answer · "
             "Ctrl+Shift+O new chat · paste or drop files into the message box")


def math_markup(text: str) -> str:
    """`text` with each Pandoc-style `$...$` span outside code written as `\\(...\\)`."""
    if "$" not in text or len(text) > MAX_MARKUP:
        return text
    out, at = [], 0
    for keep in _KEEP.finditer(text):
        out += [_INLINE.sub(r"\\(\1\\)", text[at:keep.start()]), keep.group(0)]
        at = keep.end()
    out.append(_INLINE.sub(r"\\(\1\\)", text[at:]))
    return "".join(out)


def math_chat(chatbot: gr.Chatbot) -> gr.Chatbot:
    """`chatbot`, its answers rendering inline math written `$...$` and leaving prices alone
    (and `\\(...\\)`, `\\[...\\]`, `$$...$$`). Wrapped, not subclassed: Gradio writes a .pyi
    stub beside the module of every Component subclass."""
    chatbot.latex_delimiters = LATEX
    drawn = chatbot.postprocess

    def postprocess(value):
        data = drawn(value)
        for message in data.root:
            if message.role == "assistant":
                for part in message.content:
                    if isinstance(part, TextMessage):
                        part.text = math_markup(part.text)
        return data

    chatbot.postprocess = postprocess
    for message in chatbot.value or []:  # a value given to the constructor, drawn already
        if message.get("role") == "assistant":
            for part in message.get("content") or []:
                if part.get("type") == "text":
                    part["text"] = math_markup(part["text"])
    return chatbot
