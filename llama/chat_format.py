"""The chat prompt formats: a Dialog turned into prompt tokens.

Llama 2 (and Code Llama) wrap turns in [INST] ... [/INST]; Llama 3 gives
each message a header of special tokens. `llama.family` says which a model uses.
"""

from typing import List, Literal, Sequence, TypedDict

from llama.tokenizer import Tokenizer, check_encodable

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def has_special_tags(dialog: Sequence[Message]) -> bool:
    """True when a message's content holds one of the format's own tags."""
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def check_dialog(dialog: Sequence[Message]) -> None:
    """Raise ValueError unless `dialog` is one the format can encode.

    That is: a non-empty list of {"role", "content"} messages, an optional
    system message first, then user and assistant turns alternating,
    starting and ending with the user.
    """
    if not isinstance(dialog, (list, tuple)) or len(dialog) == 0:
        raise ValueError("a dialog must be a non-empty list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
        if not isinstance(msg["content"], str):
            raise ValueError(f"message {i}: 'content' must be a str, got {type(msg['content']).__name__}")
        check_encodable(msg["content"], f"message {i}'s content")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if len(turns) == 0:
        raise ValueError("a dialog needs a user message after the system message")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            offset = len(dialog) - len(turns)
            raise ValueError(
                f"message {i + offset} has role {msg['role']!r} where {expected!r} was expected: "
                "after an optional 'system' message, roles must alternate "
                "'user', 'assistant', 'user', ..."
            )
    if turns[-1]["role"] != "user":
        raise ValueError("the last message of a dialog must have role 'user'")


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Message]) -> List[int]:
    """Prompt tokens for `dialog`, exactly as Meta's reference builds them.

    A leading system message is folded into the first user message. Each
    finished (user, assistant) pair is one BOS ... EOS sequence; the last user
    message is left open for the model's answer.
    """
    check_dialog(dialog)
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + list(dialog[2:])
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(
            f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
            bos=True,
            eos=True,
        )
    tokens += tokenizer.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return tokens


def encode_header_llama3(tokenizer, role: str) -> List[int]:
    """<|start_header_id|>{role}<|end_header_id|> and the blank line after it."""
    return (
        [tokenizer.special_tokens["<|start_header_id|>"]]
        + tokenizer.encode(role, bos=False, eos=False)
        + [tokenizer.special_tokens["<|end_header_id|>"]]
        + tokenizer.encode("\n\n", bos=False, eos=False)
    )


def encode_dialog_llama3(tokenizer, dialog: Sequence[Message], *, strip_content: bool) -> List[int]:
    """Prompt tokens for `dialog` in Meta's Llama 3 chat format.

    <|begin_of_text|>, then each message as its header, its content and
    <|eot_id|>, then an open assistant header for the answer. The content is
    stripped of surrounding whitespace with `strip_content` (Meta's Llama 3.0
    code does; its llama-models, the reference for 3.1 and later, encodes it
    as given). Special-token text inside a message is encoded as plain text.
    The dialog is checked as for Llama 2 (`check_dialog`).
    """
    check_dialog(dialog)
    tokens = [tokenizer.bos_id]
    for message in dialog:
        content = message["content"].strip() if strip_content else message["content"]
        tokens += encode_header_llama3(tokenizer, message["role"])
        tokens += tokenizer.encode(content, bos=False, eos=False)
        tokens.append(tokenizer.special_tokens["<|eot_id|>"])
    return tokens + encode_header_llama3(tokenizer, "assistant")
