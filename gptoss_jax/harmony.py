"""gpt-oss's harmony chat format: the prompt, and the model's reply read back into messages as its tokens come.

A reply (the tokens after a prompt ending `<|start|>assistant`) is a sequence of messages

    [<|start|>ROLE] HEADER <|message|> TEXT (<|end|> | <|return|> | <|call|>)

where the first message's role is the prompt's last one, the header names the channel (`<|channel|>analysis`:
the reasoning; `final`: the answer; `commentary`: tool calls), optionally a recipient (`to=functions.NAME`) and a
content type (`<|constrain|>json`). `<|return|>` ends the reply, `<|call|>` ends it with a tool call, and
`<|end|>` ends one message (the reply, if it was the final answer).
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime

START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                         "<|return|>", "<|call|>", "<|constrain|>")


def prompt(user: str, reasoning_effort: str = "medium", today: datetime.date | None = None) -> str:
  """One user turn under gpt-oss's default system message, ending where the assistant's reply begins."""
  return conversation([{"role": "user", "content": user}], reasoning_effort, today)


def conversation(messages: list[dict[str, str]], reasoning_effort: str = "medium",
                 today: datetime.date | None = None) -> str:
  """A chat ({"role": "system" | "user" | "assistant", "content": ...} in order) under gpt-oss's default system
  message, ending where the assistant's next reply begins: a "system" message's text becomes the developer
  message's instructions, each assistant turn a final answer."""
  today = today or datetime.date.today()
  system = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
            f"Current date: {today.isoformat()}\n\nReasoning: {reasoning_effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.")
  out = [f"{START}system{MESSAGE}{system}{END}"]
  for m in messages:
    if m["role"] == "system":
      out.append(f"{START}developer{MESSAGE}# Instructions\n\n{m['content']}{END}")
    elif m["role"] == "assistant":
      out.append(f"{START}assistant{CHANNEL}final{MESSAGE}{m['content']}{END}")
    else:
      out.append(f"{START}{m['role']}{MESSAGE}{m['content']}{END}")
  return "".join(out) + f"{START}assistant"


@dataclasses.dataclass
class Message:
  role: str
  channel: str = ""
  recipient: str = ""
  content_type: str = ""
  text: str = ""
  ended_by: str = ""  # END, RETURN or CALL; "" while the message is still coming (or was cut off)


def parse_header(header: str, role: str = "") -> Message:
  """A message header (the text between `<|start|>` and `<|message|>`, special tokens written out) into its
  role, channel, recipient and content type. `role` is given when the header has none (a reply's first
  message: its role ends the prompt)."""
  content_type = ""
  if CONSTRAIN in header:
    header, _, constraint = header.partition(CONSTRAIN)
    content_type = CONSTRAIN + constraint.strip()
  channel = ""
  if CHANNEL in header:
    header, _, after = header.partition(CHANNEL)
    channel, *rest = after.split() or [""]
    header = " ".join([header, *rest])
  words = header.split()
  if not role:
    role = words.pop(0) if words else ""
  recipient = next((w[len("to="):] for w in words if w.startswith("to=")), "")
  others = [w for w in words if not w.startswith("to=")]
  if others and not content_type:  # a content type may also stand as a plain word (`... json<|message|>`)
    content_type = others[-1]
  return Message(role, channel, recipient, content_type)


class ReplyParser:
  """Reads a reply token by token: `push` returns the text a token adds to the current message; `messages`
  holds the finished ones, `current` the one being written (None between messages), `done` says the reply
  has ended (`<|return|>`, `<|call|>`, or `<|end|>` of the final answer)."""

  def __init__(self, encoding, role: str = "assistant"):
    self._encoding = encoding
    self._special = {encoding.encode_single_token(t): t for t in (START, MESSAGE, END, RETURN, CALL)}
    self._role = role  # the next message's role when its header has none
    self._header: list[int] = []
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    self.messages: list[Message] = []
    self.current: Message | None = None
    self.done = False

  def push(self, token: int) -> str:
    if self.done:
      raise ValueError("the reply has ended")
    special = self._special.get(token)
    if self.current is None:  # in a header
      if special == START:
        self._header, self._role = [], ""
      elif special == MESSAGE:
        self.current = parse_header(self._encoding.decode(self._header), self._role)
      else:
        self._header.append(token)
      return ""
    if special in (END, RETURN, CALL):
      self.current.text += self._utf8.decode(b"", final=True)
      self.current.ended_by = special
      self.messages.append(self.current)
      self.done = special != END or self.current.channel == "final"
      self.current, self._header, self._role = None, [], ""
      return ""
    added = self._utf8.decode(self._encoding.decode_single_token_bytes(token))
    self.current.text += added
    return added

  def final(self) -> Message | None:
    """The final answer (finished or cut off), if the reply got to it."""
    return next((m for m in [*self.messages, self.current] if m is not None and m.channel == "final"), None)
