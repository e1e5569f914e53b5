"""Test cases of the quality benchmark, shared by kvscope (benchmarks/quality.py) and kvpress (kvpress_runner.py).

Pure Python plus a tokenizer: the cases are built once, in kvscope's environment, and handed to kvpress's runner as
token ids in JSON, so both tools see exactly the same tokens.

- `passkey_cases(tok, lengths, depths, keys_per_cell)`: a 5-digit key hidden at a relative depth of real prose, the
  question after it, the chat template applied, the assistant's answer begun with "The pass key is". The whole prompt
  (template included) is within a few tokens of the target length.
- `perplexity_ids(tok, tokens)`: the first `tokens` tokens of the same prose, no template (plain language modelling).

The prose (`STORY`) is original text written for this benchmark and released into the public domain (CC0): a story
with recurring people and places, so that earlier context helps predict later text, and without any digits, so the
only number in a passkey prompt is the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

STORY = """\
The harbour town of Caldmere sat at the mouth of a grey river, where the water slowed and spread before it met the \
sea. Its houses were built of dark stone, and their roofs were weighted with slate against the winter gales. Above \
the town, on a ridge of black rock, stood the lighthouse that Elsa Marrow had kept for most of her life. She was not \
born to the work. Her father had been a cooper, and her mother had mended nets on the quay, but when old Tobias Wren \
grew too stiff to climb the stairs, it was Elsa who carried the oil up for him, and in time the keeping passed to her.

Every evening she climbed the hundred and twelve steps with a lantern in one hand and a tin of oil in the other. \
She trimmed the wick, polished the great lens with a soft cloth, and wound the clockwork that turned the light. \
When the beam began its slow sweep across the water, she sat at the small table by the window and wrote the weather \
in a ledger bound in green leather. Wind from the west, rain in the night, a heavy swell by morning. The ledger went \
back further than anyone in Caldmere could remember, and the oldest pages were written in a hand so cramped and \
faded that only Tobias could still read them.

The fishermen trusted the light more than they trusted the almanac. When the fog came down the river and lay on the \
harbour like wet wool, Elsa rang the bell as well, a long stroke and then two short ones, over and over until the \
boats were in. On those nights she did not sleep at all. She drank strong tea, kept the fire going in the little \
stove, and listened for the creak of oars and the voices of the men calling to one another as they felt their way \
between the rocks. In the morning the wives would leave bread and smoked fish at the foot of the tower, and nobody \
ever said a word about it.

Tobias Wren still lived in the cottage below the ridge, with a one-eyed cat and a garden full of leeks. He had \
opinions about everything, and most of them concerned the sea. He said the tides had grown lazy, that the gulls were \
bolder than they used to be, and that no lens made in the city could match the one he had brought over from the \
island of Skarra as a young man. Elsa listened to all of it. On Sundays she brought him the ledger, and he read her \
entries aloud in his slow, rasping voice, correcting her spelling and nodding when the figures pleased him.

In the spring a young man named Hollis Crane arrived in Caldmere with a case of instruments and a letter from the \
harbour board. He had been sent to survey the channel, which had been shifting for years, and to decide whether the \
old light should be replaced by a modern beacon that would need no keeper. He took a room above the chandler's shop \
and spent his days in a rowing boat with a lead line and a notebook, measuring the depth of the water and marking \
the sandbanks on a chart that grew more crowded every week.

Elsa did not like him at first. He asked too many questions, and he wrote down every answer as if he expected to be \
lied to. He wanted to know how often the clockwork failed, how much oil the lamp burned in a winter month, and how \
many nights each year the fog was thick enough to need the bell. She answered him shortly and went on with her work. \
But he came back the next day, and the day after that, and by the end of the month he had stopped writing things \
down and had started to help her carry the oil.

It was Hollis who noticed that the channel was moving east. He showed Elsa his chart one evening, spreading it across \
the table in the lamp room and holding the corners down with her tea cups. The deep water, which had once run close \
beneath the lighthouse, now curved away toward the far shore, and a long bar of sand had grown where the fishing \
boats used to turn. If the light stayed where it was, he said, it would guide the boats straight onto that bar. \
Elsa looked at the chart for a long time without speaking. Then she took the ledger from its shelf and opened it at \
the oldest pages.

The cramped writing was hard to follow, but Tobias had taught her the shapes of the letters, and together she and \
Hollis worked through the entries by lamplight. They found that the channel had moved before. Long ago, in the time \
of Tobias's grandfather, the deep water had run along the eastern shore, and the keepers had hung a second lamp on a \
post at the end of the old stone pier to mark the turn. Then, over many years, the river had swung back toward the \
west, and the post had been left to rot. Nobody alive had seen it lit. Elsa realised that the river was simply \
returning to a path it had taken before.

Hollis wanted to write to the harbour board at once. A new beacon on the eastern shore, he said, with a steady \
electric light, would solve the problem for good. Elsa said nothing, but the next morning she walked down to the end \
of the old pier and found the stump of the post still there, black and soft with age, an iron ring rusted into the \
stone beside it. She stood there while the tide came in around her boots, and she thought about the men who had \
climbed out along that pier in the dark to light a lamp that nobody remembered.

Tobias, when they told him, laughed until he coughed. He said he had always known the river would come back, that \
rivers were like cats and went where they pleased, and that the harbour board could keep its electric beacon. Then \
he went into his shed and came out with a lantern wrapped in sacking, a squat brass thing with red glass in one side \
and green in the other. It had hung on the old post, he said, when he was a boy. His grandfather had given it to \
him, and he had kept it oiled for sixty years without knowing why.

They lit the brass lantern on the first night of autumn. Hollis had fixed a new post into the iron ring, and Elsa \
carried the lantern out along the pier herself, with half the town watching from the quay. When the flame caught \
behind the red glass, a cheer went up from the fishermen, and someone began to ring the chapel bell. Tobias watched \
from a chair that two of the boys had carried down for him, wrapped in a blanket, the one-eyed cat asleep on his \
knees. He did not say anything at all, which for Tobias was a kind of speech.

The harbour board sent its reply in the winter. The letter thanked Hollis for his careful survey and informed him \
that the board could not at present afford a new beacon, electric or otherwise. The old light was to remain, and \
the keeper was to be paid a small additional sum for the care of the lamp on the pier. Elsa read the letter twice \
and then put it in the back of the ledger, between the last written page and the cover. She said it was the most \
sensible thing the board had done in living memory, and Hollis agreed with her.

Hollis stayed in Caldmere through that winter and the next. He said he was finishing his chart, but the chart had \
been finished for months, and everyone in town knew it. He mended the clockwork when it jammed, he learned to ring \
the fog bell in the proper rhythm, and he sat with Tobias in the evenings, listening to stories about storms and \
wrecks and the island of Skarra, where the cliffs were so high that the gulls nested in clouds. Some of the stories \
were true. Tobias never said which ones, and Hollis never asked.

The great storm came in the third winter, on a night when the wind turned without warning and drove the sea into the \
river mouth. Three boats were still out. Elsa lit the tower lamp early and wound the clockwork tight, while Hollis ran \
down to the pier to tend the brass lantern. The waves were breaking over the stones, and twice he was nearly swept \
away, but he reached the post and kept the flame alive with his own body between it and the wind. The boats saw the \
red light and then the white, found the turn, and came in one after another through the gap in the sandbar.

In the morning the town came out to look at the damage. Roofs had lost their slates, a wall had fallen on the quay, \
and the chandler's sign was found halfway up the hill in a field of turnips. But every boat was safe, and every man \
had come home. Elsa wrote the storm into the ledger in her plain, careful hand: wind from the south and then the \
east, the sea in the river mouth, three boats in by the pier light. Then she added a line she had never written \
before. She wrote the name of the man who had kept the lamp, and she underlined it.

Tobias Wren died in the spring, quietly, in his chair by the window, with the cat on his knees and the garden just \
beginning to show green. The whole town walked behind his coffin to the chapel on the hill. Afterwards Elsa took the \
ledger down to his cottage and sat for a while at his table, reading the oldest pages to herself, the ones that only \
he had been able to read easily. She found that she could read them now without any trouble at all, and she did not \
know whether to be glad of that or sorry.

Hollis and Elsa were married the following summer, in the same chapel, on a day so clear that the island of Skarra \
could be seen on the horizon, a thin blue line that most people in Caldmere had only heard about. They lived in the \
cottage below the ridge, because it was closer to the tower than Elsa's old room above the net loft, and because the \
leeks needed someone to look after them. The one-eyed cat decided, after some thought, that it would allow them to \
stay.

The two lights burned side by side for many years after that, the white beam sweeping from the ridge and the red \
lamp steady on the pier. Children grew up in Caldmere who had never known the harbour without them. When the river \
began, very slowly, to swing back toward the west, it was Elsa who noticed first, reading the soundings that Hollis \
still took every spring from his little rowing boat. She did not write to the harbour board. She only opened the \
ledger, turned back to the oldest pages, and began to read.
"""

SYSTEM_NOTE = None  # the model's own default system prompt, from its chat template
INSTRUCTION = ("There is a pass key hidden inside a long story below. Find it and remember it. "
               "I will ask you for the pass key afterwards.")
QUESTION = "What is the pass key? Answer with the five-digit number."
ANSWER_PREFIX = "The pass key is"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# Multi-key variant (RULER's "niah_multikey" idea): several doors, each with its own key, hidden at different depths;
# the question asks for one door's key. The other keys are distractors: a method that keeps "the numbers" without
# knowing which one is asked for has to keep all of them, and a model that mixes them up fails.
LABELS = ["red door", "blue door", "green door", "white door", "black door", "yellow door", "grey door", "brown door"]
MULTI_INSTRUCTION = ("There are several pass keys hidden inside a long story below, each for a different door. "
                     "Find them and remember them. I will ask you for one of them afterwards.")
MULTI_NEEDLE = "The pass key of the {label} is {key}. Remember it. {key} is the pass key of the {label}."
MULTI_QUESTION = "What is the pass key of the {label}? Answer with the five-digit number."
MULTI_ANSWER_PREFIX = "The pass key of the {label} is"
LENGTH_TOLERANCE = 0.03  # a prompt is within this fraction of its target length (typically within a few tokens)


@dataclass
class PasskeyCase:
    case_id: str
    target_length: int
    depth: float  # asked-for relative depth of the needle in the story text
    key: str
    input_ids: list[int] = field(repr=False)
    needle_start: int  # token index where the needle sentence begins
    needle_end: int  # token index just after it
    haystack_start: int  # token index of the first story token
    haystack_end: int  # token index just after the last story token
    distractors: list[dict] = field(default_factory=list)  # multi-key: {label, key, depth, needle_start} of the others
    label: str | None = None  # multi-key: the door asked for

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def actual_depth(self) -> float:
        """Where the needle really sits: story tokens before it / all story tokens."""
        story = (self.haystack_end - self.haystack_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.haystack_start) / max(1, story)

    def to_json(self) -> dict:
        return asdict(self) | {"length": self.length, "actual_depth": round(self.actual_depth, 4)}


def paragraphs() -> list[list[str]]:
    """The story as paragraphs of sentences."""
    out = []
    for para in STORY.split("\n\n"):
        text = " ".join(para.split())
        if text:
            out.append(re.split(r"(?<=[.!?])\s+", text))
    return out


def sentences() -> list[tuple[str, bool]]:
    """(sentence, ends_a_paragraph) in story order."""
    return [(s, i == len(p) - 1) for p in paragraphs() for i, s in enumerate(p)]


def story_text() -> str:
    return "\n\n".join(" ".join(p) for p in paragraphs())


def _join(items: list[tuple[str, bool]]) -> str:
    text = ""
    for i, (s, para_end) in enumerate(items):
        text += s
        if i < len(items) - 1:
            text += "\n\n" if para_end else " "
    return text


def _filler(count: int, offset: int) -> list[tuple[str, bool]]:
    """`count` sentences of the story starting at sentence `offset`, wrapping around (a paragraph break at the wrap)."""
    sents = sentences()
    items = []
    for i in range(count):
        s, end = sents[(offset + i) % len(sents)]
        if (offset + i + 1) % len(sents) == 0:
            end = True
        items.append((s, end))
    return items


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_parts(tok, answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
    """Template text before and after the user's message (assistant turn opened, answer prefix included)."""
    marker = "\u0000MSG\u0000"
    full = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False)
    before, after = full.split(marker)
    return before, after + answer_prefix


@dataclass(frozen=True)
class Prompt:
    """The words of a prompt around the story: single key (the default) or multi-key."""
    instruction: str = INSTRUCTION
    question: str = QUESTION
    answer_prefix: str = ANSWER_PREFIX


def _build(tok, filler: list[tuple[str, bool]], inserts: list[tuple[int, str]], prompt: Prompt = Prompt()
           ) -> tuple[list[int], dict]:
    """Token ids of a prompt with needles inserted before filler sentences, plus token spans.

    `inserts`: (filler sentence index, needle text), the asked-for needle first. The prompt is tokenized in pieces
    (template head, instruction, story pieces, needles, question, template tail) so that every needle's span is exact;
    each piece starts at a whitespace/newline boundary, so the ids are those a user would get from tokenizing the
    pieces separately (the same ids are handed to kvpress). Spans: the asked-for needle's, plus `needle_starts` (each
    insert's start, in the order given)."""
    before, after = _chat_parts(tok, prompt.answer_prefix)
    head = _encode(tok, before + prompt.instruction + "\n\n")
    ids = list(head)
    starts = [0] * len(inserts)
    ends = [0] * len(inserts)
    cursor = 0
    for k, (order, (at, needle)) in enumerate(sorted(enumerate(inserts), key=lambda t: (t[1][0], t[0]))):
        piece = _join(filler[cursor:at])
        lead = " " if k else ""  # after a needle, the story goes on after a space
        if piece:
            ids += _encode(tok, lead + piece + " ")
            lead = ""
        starts[order] = len(ids)
        ids += _encode(tok, lead + needle)
        ends[order] = len(ids)
        cursor = at
    post = _join(filler[cursor:])
    if post:
        ids += _encode(tok, " " + post)
    haystack_end = len(ids)
    ids += _encode(tok, "\n\n" + prompt.question + after)
    spans = {"haystack_start": len(head), "needle_start": starts[0], "needle_end": ends[0],
             "haystack_end": haystack_end, "needle_starts": starts}
    return ids, spans


def _insert_index(tok, filler: list[tuple[str, bool]], depth: float) -> int:
    counts = [len(_encode(tok, " " + s)) for s, _ in filler]
    total = sum(counts)
    best, acc, best_err = 0, 0, float("inf")
    for i in range(len(filler) + 1):
        err = abs(acc / max(1, total) - depth)
        if err < best_err:
            best, best_err = i, err
        if i < len(filler):
            acc += counts[i]
    return best


def _fit_length(tok, target_length: int, offset: int, build) -> tuple[list[int], dict]:
    """`build(filler)` (ids, spans) for the longest filler (story sentences from `offset`) whose prompt does not exceed
    the target."""
    per_sentence = 30  # a first guess; corrected from the measured length below
    count = max(1, target_length // per_sentence)
    for _ in range(8):
        filler = _filler(count, offset)
        ids, _ = build(filler)
        if abs(len(ids) - target_length) <= 40:
            break
        per_sentence = max(1.0, (len(ids) - 60) / count)
        count = max(1, count + round((target_length - len(ids)) / per_sentence))
    # fine-tune one sentence at a time: the longest prompt that does not exceed the target
    while len(ids) > target_length and count > 1:
        count -= 1
        filler = _filler(count, offset)
        ids, _ = build(filler)
    while True:
        trial = _filler(count + 1, offset)
        trial_ids, _ = build(trial)
        if len(trial_ids) > target_length:
            break
        count, filler, ids = count + 1, trial, trial_ids
    return build(filler)


def passkey_case(tok, target_length: int, depth: float, rep: int, seed: int = 0) -> PasskeyCase:
    """One case: deterministic in (target_length, depth, rep, seed)."""
    rng = random.Random(f"passkey/{seed}/{target_length}/{depth}/{rep}")
    key = str(rng.randint(10000, 99999))
    offset = rng.randrange(len(sentences()))
    needle = NEEDLE.format(key=key)
    ids, spans = _fit_length(tok, target_length, offset,
                             lambda f: _build(tok, f, [(_insert_index(tok, f, depth), needle)]))
    spans.pop("needle_starts")
    case_id = f"L{target_length}-d{round(depth * 100):02d}-r{rep}"
    return PasskeyCase(case_id=case_id, target_length=target_length, depth=depth, key=key, input_ids=ids, **spans)


def multikey_case(tok, target_length: int, depth: float, rep: int, doors: int = 4, seed: int = 0) -> PasskeyCase:
    """One multi-key case: `doors` needles (distinct doors and keys); the asked-for one at `depth`, the others at
    depths spread evenly over the rest of the story (random order of doors). Deterministic in its arguments."""
    if not 2 <= doors <= len(LABELS):
        raise ValueError(f"doors must be 2..{len(LABELS)}, got {doors}")
    rng = random.Random(f"multikey/{seed}/{target_length}/{depth}/{rep}/{doors}")
    labels = rng.sample(LABELS, doors)
    keys = [str(k) for k in rng.sample(range(10000, 100000), doors)]
    offset = rng.randrange(len(sentences()))
    # the others sit at the centres of `doors - 1` equal parts of the story, nudged off the asked-for depth
    others = [(i + 0.5) / (doors - 1) for i in range(doors - 1)]
    others = [d if abs(d - depth) >= 0.06 else (d + 0.06 if d >= depth else d - 0.06) for d in others]
    others = [min(0.98, max(0.02, d)) for d in others]
    depths = [depth] + others
    prompt = Prompt(MULTI_INSTRUCTION, MULTI_QUESTION.format(label=labels[0]),
                    MULTI_ANSWER_PREFIX.format(label=labels[0]))
    needles = [MULTI_NEEDLE.format(label=lb, key=k) for lb, k in zip(labels, keys)]

    def build(filler):
        at = [_insert_index(tok, filler, d) for d in depths]
        return _build(tok, filler, list(zip(at, needles)), prompt)

    ids, spans = _fit_length(tok, target_length, offset, build)
    starts = spans.pop("needle_starts")
    distractors = [{"label": lb, "key": k, "depth": round(d, 4), "needle_start": st}
                   for lb, k, d, st in zip(labels[1:], keys[1:], depths[1:], starts[1:])]
    case_id = f"M{doors}-L{target_length}-d{round(depth * 100):02d}-r{rep}"
    return PasskeyCase(case_id=case_id, target_length=target_length, depth=depth, key=keys[0], input_ids=ids,
                       distractors=distractors, label=labels[0], **spans)


def passkey_cases(tok, lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9), keys_per_cell: int = 2,
                  seed: int = 0, doors: int = 1) -> list[PasskeyCase]:
    """Single-key cases (`doors` 1) or multi-key cases with `doors` needles."""
    if doors == 1:
        return [passkey_case(tok, n, d, r, seed) for n in lengths for d in depths for r in range(keys_per_cell)]
    return [multikey_case(tok, n, d, r, doors, seed) for n in lengths for d in depths for r in range(keys_per_cell)]


def parse_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name[knob=value;knob=value]` -> (name, knobs): a kvscope policy or kvpress press with knobs other
    than its defaults (ablations). Values are int, float or text. Shared by both tools' runners."""
    if not spec.endswith("]"):
        return spec, {}
    name, _, items = spec[:-1].partition("[")
    knobs = {}
    for item in filter(None, items.split(";")):
        key, _, value = item.partition("=")
        knobs[key.strip()] = _number(value.strip())
    return name, knobs


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def answer_found(text: str, key: str) -> bool:
    """Scoring: the exact key appears in the generated text as a whole number (not inside a longer number)."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", text) is not None


def perplexity_ids(tok, tokens: int = 2048) -> list[int]:
    """The first `tokens` tokens of the story (plain text, no chat template), for teacher-forced perplexity."""
    ids = _encode(tok, story_text())
    if len(ids) < tokens:
        raise ValueError(f"the story has only {len(ids)} tokens; asked for {tokens}")
    return ids[:tokens]
