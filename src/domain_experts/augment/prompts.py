"""Prompt templates of the augmentation strategies, and the parsers that read the generators' replies back.

A QA row is shown to the generator, and read back from it, in one line-oriented format:

    Context: ...        (only when the data has a context column)
    Question: ...
    Answer: yes
    Explanation: ...    (only when the data has an explanation column)

Templates are `str.format` strings. Replace one through `AugmentConfig.templates`; `TEMPLATE_FIELDS` lists the
fields each strategy fills in (a template may use any subset of them).
"""

import hashlib
import re
import string


# strategy -> the task it belongs to
STRATEGIES = {"rewrite": "qa", "new_pairs": "qa", "paraphrase": "text"}

TEMPLATE_FIELDS = {
    # `pair`: the source row in the QA format; `format`: the reply format with placeholders; `labels`: "yes or no".
    "rewrite": {"pair", "question", "answer", "explanation", "context", "labels", "format"},
    # `examples`: the seed rows in the QA format, separated by blank lines; `answer`: the label asked for.
    "new_pairs": {"examples", "answer", "labels", "format"},
    "paraphrase": {"text"},
}

DEFAULT_TEMPLATES = {
    "rewrite": (
        "Here is a question with its answer.\n\n{pair}\n\n"
        "Rewrite it. Ask the same question in different words, so that the answer is still \"{answer}\", and explain "
        "the answer in your own words. Reply in exactly this format, and nothing else:\n\n{format}"
    ),
    "new_pairs": (
        "Here are examples of questions with their answers.\n\n{examples}\n\n"
        "Write one new question of the same kind, about a different topic, whose answer is \"{answer}\". "
        "Reply in exactly this format, and nothing else:\n\n{format}"
    ),
    "paraphrase": (
        "Paraphrase the following text: keep its meaning, facts and structure, change the wording.\n\n{text}\n\n"
        "Reply with the paraphrased text only."
    ),
}

QA_FIELDS = ("context", "question", "answer", "explanation")  # in the order they are written
_FIELD_LINE = re.compile(
    r"^[ \t>#*_-]*(context|question|answer|explanation)[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE
)
# A first line of chatter: "Sure! ...", "Here is the paraphrased text:", "Paraphrased version:".
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course)\b[^\n]*|(?:here|below)\b[^\n]*:|[^\n]{0,40}paraphrase[^\n]*:)"
    r"[ \t]*(?:\n|$)",
    re.IGNORECASE,
)


def template_hash(template: str) -> str:
    """A short stable id of a template's text, kept in every generated row's provenance."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def check_template(strategy: str, template: str) -> None:
    """Raise `ValueError` when `template` is not a valid `str.format` template for `strategy`."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"The {strategy!r} template is not a valid format string ({error}); write literal braces "
                         f"as '{{{{' and '}}}}'.") from None
    unknown = sorted(fields - TEMPLATE_FIELDS[strategy])
    if unknown:
        raise ValueError(f"The {strategy!r} template uses unknown fields {unknown}; it may use "
                         f"{sorted(TEMPLATE_FIELDS[strategy])}.")


def format_qa(row: dict[str, str | None]) -> str:
    """`row` (keys among `QA_FIELDS`) in the QA format; fields that are missing or `None` are left out."""
    return "\n".join(f"{name.capitalize()}: {row[name]}" for name in QA_FIELDS if row.get(name) is not None)


def qa_reply_format(fields: tuple[str, ...], labels: list[str]) -> str:
    """The reply format with placeholders, e.g. `Question: <question>\\nAnswer: <yes or no>`."""
    placeholders = {"answer": f"<{join_labels(labels)}>"}
    return "\n".join(f"{name.capitalize()}: {placeholders.get(name, f'<{name}>')}" for name in fields)


def join_labels(labels: list[str]) -> str:
    """`["yes", "no", "maybe"]` -> `"yes, no or maybe"`."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


SINGLE_LINE_FIELDS = ("question", "answer")


def parse_qa(reply: str) -> dict[str, str]:
    """The fields of the first QA pair in `reply`: each field line starts a field that runs until the next one.

    A question or an answer is one line (what follows it on other lines is chatter); an explanation or a context may
    run over several. Markdown decoration (`**Question:**`, `- Answer:`) is tolerated; a field seen a second time
    ends the pair (the generator went on to write another one). Fields with empty values are left out.
    """
    matches = list(_FIELD_LINE.finditer(reply))
    fields: dict[str, str] = {}
    for match, following in zip(matches, matches[1:] + [None]):
        name = match.group(1).lower()
        if name in fields:
            break
        value = reply[match.end() : following.start() if following else len(reply)].strip()
        if name in SINGLE_LINE_FIELDS:
            value = value.split("\n", 1)[0]
        value = value.strip("*_").strip().strip('"').strip()
        if value:
            fields[name] = value
    return fields


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label `answer` states ("Yes." and "yes, because ..." state "yes"), or `None`."""
    words = re.findall(r"\w+", answer.lower())
    for label in labels:
        label_words = re.findall(r"\w+", label.lower())
        if label_words and words[: len(label_words)] == label_words:
            return label
    return None


def parse_text(reply: str) -> str:
    """A paraphrase without the chatter small models put around it ("Sure! Here is the paraphrased text:")."""
    text = reply.strip()
    while True:
        stripped = _PREAMBLE.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
