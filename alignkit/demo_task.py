"""The `alignkit demo` task: begin or end a reply with the exact wording the user asks for.

Each prompt asks for one short sentence about an everyday topic and adds one instruction that
code can check exactly (the "verifiable instructions" idea of IFEval, arXiv 2311.07911):

    start_word  'Describe owls in one sentence. Begin your reply with the word "Truly".'
    end_phrase  'Write one sentence about tea. End your reply with the exact phrase "Good luck!"'

Why this task. SmolLM2-135M-Instruct writes a fluent sentence about the topic but mostly
ignores the instruction: with greedy decoding it ends with the asked phrase on ~2% of prompts
and starts with the asked word on ~30%. Doing what the user explicitly asked for is a
behaviour a user notices, and a judge of a few lines decides it without a reward model, so
the before/after numbers are exact, reproducible and cheap. The word or phrase to use comes
from the prompt and differs between prompts, so there is no fixed string to memorise: the
model has to read the instruction and copy from it to the right place.

Why the judge is honest (`judge`). Besides the instruction itself it demands a usable reply,
because a model trained against a bare "starts with X" check learns to write "Truly truly
truly ..." (we saw exactly that in a prototype run). A reply passes only if it also
  * has at least MIN_WORDS words of its own besides the asked word or phrase,
  * is finished: ends with ".", "!", "?" or a closing quote (a reply cut off at the
    generation limit is not),
  * is not degenerate: no word three times in a row, no four-word sequence twice, and at
    least half of its words distinct (replies of 8+ words),
  * does not parrot the instruction (no four consecutive words of it, e.g. "the first word of
    your reply must be ...").
It does not check that the sentence is true or on topic; `mentions_topic` is a separate,
cruder check reported beside the score to show replies still talk about the topic.

Train / held-out split. Topics, words and phrases are each split once, by a fixed rule that
does not depend on the run's seed, into disjoint train and held-out lists. A held-out prompt
therefore never shares its topic, nor the word or phrase it asks for, with any training
prompt; only the wordings of the request and instruction templates are shared (they are the
task).

Preference pairs (`build_pairs`) are built from the model's own greedy reply r to the request
without the instruction (the base model ignores the instruction anyway):
    fix       chosen = r with the word put in front / the phrase appended (`satisfy`),
              rejected = r.
    misplace  chosen = the same fixed reply, rejected = r with the word or phrase at the wrong
              end (the failure "Good luck! The sun is ... " we saw after naive training).
Both sides are the model's own words, so a pair differs only where the instruction matters.

Everything here is pure Python and deterministic for a given seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CONSTRAINTS = ("start_word", "end_phrase")
PAIR_KINDS = ("fix", "misplace", "plain")
MIN_WORDS = 3  # a reply must keep at least this many words of its own to pass

# Everyday topics a 135M chat model can write a sentence about. Written for this demo.
_TOPICS = (
    "cats",
    "dogs",
    "the ocean",
    "coffee",
    "the moon",
    "bicycles",
    "rain",
    "libraries",
    "volcanoes",
    "chess",
    "bread",
    "trees",
    "music",
    "winter",
    "the sun",
    "elephants",
    "trains",
    "honey",
    "mountains",
    "rivers",
    "computers",
    "gardening",
    "pizza",
    "owls",
    "deserts",
    "soccer",
    "clocks",
    "bridges",
    "penguins",
    "tea",
    "forests",
    "apples",
    "bananas",
    "chocolate",
    "cheese",
    "rice",
    "soup",
    "pancakes",
    "strawberries",
    "carrots",
    "tomatoes",
    "oranges",
    "lemons",
    "potatoes",
    "horses",
    "cows",
    "sheep",
    "rabbits",
    "frogs",
    "bees",
    "butterflies",
    "dolphins",
    "whales",
    "sharks",
    "tigers",
    "lions",
    "bears",
    "wolves",
    "foxes",
    "eagles",
    "parrots",
    "turtles",
    "snakes",
    "spiders",
    "ants",
    "camels",
    "giraffes",
    "zebras",
    "monkeys",
    "kangaroos",
    "snow",
    "thunderstorms",
    "rainbows",
    "clouds",
    "the wind",
    "autumn",
    "spring",
    "summer",
    "sunsets",
    "stars",
    "planets",
    "comets",
    "lakes",
    "islands",
    "beaches",
    "caves",
    "waterfalls",
    "glaciers",
    "jungles",
    "meadows",
    "flowers",
    "roses",
    "sunflowers",
    "mushrooms",
    "cactuses",
    "ferns",
    "books",
    "newspapers",
    "pencils",
    "paintings",
    "photography",
    "poetry",
    "movies",
    "theaters",
    "museums",
    "schools",
    "hospitals",
    "airports",
    "cars",
    "buses",
    "ships",
    "airplanes",
    "rockets",
    "helicopters",
    "skateboards",
    "kites",
    "balloons",
    "candles",
    "lamps",
    "mirrors",
    "windows",
    "doors",
    "chairs",
    "tables",
    "beds",
    "pillows",
    "blankets",
    "umbrellas",
    "hats",
    "shoes",
    "gloves",
    "scarves",
    "watches",
    "phones",
    "cameras",
    "radios",
    "keyboards",
    "robots",
    "the internet",
    "email",
    "maps",
    "calendars",
    "kitchens",
    "ovens",
    "refrigerators",
    "bakeries",
    "markets",
    "restaurants",
    "picnics",
    "birthdays",
    "holidays",
    "weddings",
    "friendship",
    "laughter",
    "sleep",
    "dreams",
    "exercise",
    "running",
    "swimming",
    "hiking",
    "camping",
    "fishing",
    "dancing",
    "singing",
    "cooking",
    "reading",
    "writing",
    "drawing",
    "knitting",
    "pottery",
    "puzzles",
    "board games",
    "video games",
    "basketball",
    "tennis",
    "baseball",
    "golf",
    "cycling",
    "yoga",
    "skiing",
    "surfing",
    "sailing",
    "guitars",
    "pianos",
    "violins",
    "drums",
    "trumpets",
    "orchestras",
    "jazz",
    "farms",
    "tractors",
    "barns",
    "gardens",
    "parks",
    "playgrounds",
    "zoos",
    "aquariums",
    "castles",
    "pyramids",
    "lighthouses",
    "windmills",
    "towers",
    "cities",
    "villages",
    "streets",
    "fountains",
    "statues",
    "coins",
    "stamps",
    "diamonds",
    "gold",
    "silver",
    "iron",
    "glass",
    "paper",
    "wood",
    "stone",
    "sand",
    "salt",
    "sugar",
    "milk",
    "eggs",
    "butter",
    "noodles",
    "sandwiches",
    "cookies",
    "cakes",
    "ice cream",
    "popcorn",
    "peanuts",
    "grapes",
    "cherries",
    "pineapples",
    "watermelons",
    "coconuts",
    "avocados",
    "onions",
    "garlic",
    "pepper",
    "cinnamon",
    "vanilla",
    "lavender",
    "bamboo",
    "oak trees",
    "pine trees",
    "seashells",
    "coral reefs",
    "octopuses",
    "jellyfish",
    "crabs",
    "lobsters",
    "ducks",
    "swans",
    "flamingos",
    "peacocks",
    "hummingbirds",
    "crows",
    "pigeons",
)

# Words for `start_word` (sentence openers that read naturally before a comma).
_WORDS = (
    "Indeed",
    "Certainly",
    "Well",
    "Honestly",
    "Interestingly",
    "Surprisingly",
    "Absolutely",
    "Sure",
    "Actually",
    "Basically",
    "Clearly",
    "Naturally",
    "Remarkably",
    "Notably",
    "Undoubtedly",
    "Truly",
)

# Phrases for `end_phrase`.
_PHRASES = (
    "Have a nice day!",
    "That is all.",
    "Thanks for asking!",
    "I hope this helps.",
    "Stay curious!",
    "The end.",
    "See you soon!",
    "Enjoy!",
    "Good luck!",
    "Best wishes.",
    "Have fun!",
    "Until next time.",
    "Keep learning!",
    "Cheers!",
    "Take care.",
    "Happy reading!",
)

_REQUESTS = (
    "Write one sentence about {topic}.",
    "Tell me one interesting fact about {topic}.",
    "Describe {topic} in one sentence.",
    "Write a short sentence about {topic}.",
)

_INSTRUCTIONS = {
    "start_word": (
        'Begin your reply with the word "{phrase}".',
        'Start your reply with the word "{phrase}".',
        'The first word of your reply must be "{phrase}".',
    ),
    "end_phrase": (
        'End your reply with the exact phrase "{phrase}"',
        'Finish your reply with the exact words "{phrase}"',
        'Your reply must end with the phrase "{phrase}"',
    ),
}

_SPLIT_SEED = 20240917  # fixed: the train/held-out split must not move with the run's seed
_CLOSE = (".", "!", "?", '"', "\u201d")
_I_WORDS = ("I", "I'm", "I've", "I'd", "I'll")


def _split(items: tuple) -> tuple[tuple, tuple]:
    """Fixed half/half split: (train, held-out)."""
    order = list(items)
    random.Random(_SPLIT_SEED).shuffle(order)
    return tuple(order[1::2]), tuple(order[0::2])


TRAIN_TOPICS, HELDOUT_TOPICS = _split(_TOPICS)
TRAIN_WORDS, HELDOUT_WORDS = _split(_WORDS)
TRAIN_PHRASES, HELDOUT_PHRASES = _split(_PHRASES)


@dataclass(frozen=True)
class DemoPrompt:
    """One prompt: a request about `topic` plus one instruction (`constraint`, `phrase`)."""

    topic: str
    request: str  # the request alone, e.g. "Write one sentence about cats."
    constraint: str  # one of CONSTRAINTS
    instruction: str  # the instruction as shown to the model
    phrase: str  # the word to begin with, or the phrase to end with

    @property
    def text(self) -> str:
        """The user message: request, then instruction."""
        return f"{self.request} {self.instruction}"

    def messages(self) -> list[dict]:
        """Chat messages for the model (no system message: the chat template adds its default)."""
        return [{"role": "user", "content": self.text}]

    def plain_messages(self) -> list[dict]:
        """The request without the instruction: what pair replies are generated from, and the
        prompt of the no-instruction side check."""
        return [{"role": "user", "content": self.request}]


def _make(n: int, seed: int, topics: tuple, words: tuple, phrases: tuple) -> list[DemoPrompt]:
    """n distinct prompts; constraints alternate; topics drawn without repeats until used up."""
    if n < 0 or n > len(topics) * len(_REQUESTS) * 3 * min(len(words), len(phrases)):
        raise ValueError(f"cannot make {n} distinct prompts from {len(topics)} topics")
    rng = random.Random(seed)
    out: list[DemoPrompt] = []
    seen: set[str] = set()
    pool: list[str] = []
    while len(out) < n:
        if not pool:
            pool = list(topics)
            rng.shuffle(pool)
        topic = pool.pop()
        constraint = CONSTRAINTS[len(out) % len(CONSTRAINTS)]
        phrase = rng.choice(words if constraint == "start_word" else phrases)
        item = DemoPrompt(
            topic,
            rng.choice(_REQUESTS).format(topic=topic),
            constraint,
            rng.choice(_INSTRUCTIONS[constraint]).format(phrase=phrase),
            phrase,
        )
        if item.text not in seen:
            seen.add(item.text)
            out.append(item)
    return out


def train_prompts(n: int, seed: int = 0) -> list[DemoPrompt]:
    """n training prompts (train topics, words and phrases only), deterministic for `seed`."""
    return _make(n, seed, TRAIN_TOPICS, TRAIN_WORDS, TRAIN_PHRASES)


def heldout_prompts(n: int = 200, seed: int = 0) -> list[DemoPrompt]:
    """n evaluation prompts from the held-out topics, words and phrases; half of each constraint.

    Disjoint from every `train_prompts` output for any seed (no shared topic, word or phrase).
    The default seed is the demo's fixed benchmark; keep it fixed when comparing runs."""
    return _make(n, seed + 1_000_003, HELDOUT_TOPICS, HELDOUT_WORDS, HELDOUT_PHRASES)


# ----------------------------------------------------------------------------- judging


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def is_complete(response: str) -> bool:
    """The reply ends like a finished sentence: ".", "!", "?" or a closing quote. Generation
    that hit its token limit usually stops mid-sentence."""
    return response.strip().endswith(_CLOSE)


def is_degenerate(response: str) -> bool:
    """Repetition that no fluent reply has: a word three times in a row, a four-word sequence
    twice, or (8+ words) fewer than half of the words distinct."""
    w = _tokens(response)
    if any(w[i] == w[i + 1] == w[i + 2] for i in range(len(w) - 2)):
        return True
    grams = [tuple(w[i : i + 4]) for i in range(len(w) - 3)]
    if len(grams) != len(set(grams)):
        return True
    return len(w) >= 8 and len(set(w)) < len(w) / 2


def echoes_instruction(item: DemoPrompt, response: str) -> bool:
    """The reply repeats four consecutive words of the instruction (the asked word or phrase
    itself excluded), e.g. 'Truly, the first word of your reply must be "Truly".'"""
    ins = _tokens(item.instruction.replace(item.phrase, " | "))
    r = " " + " ".join(_tokens(response)) + " "
    return any(" " + " ".join(ins[i : i + 4]) + " " in r for i in range(len(ins) - 3))


def follows(item: DemoPrompt, response: str) -> bool:
    """The instruction alone: the first word is `phrase` (then a non-letter), or the reply ends
    with `phrase` exactly (case and punctuation as given). Whitespace around is ignored."""
    r = response.strip()
    if item.constraint == "start_word":
        return r.startswith(item.phrase) and not r[len(item.phrase) :][:1].isalnum()
    if item.constraint == "end_phrase":
        return r.endswith(item.phrase)
    raise ValueError(f"unknown constraint {item.constraint!r}; expected one of {CONSTRAINTS}")


def judge(item: DemoPrompt, response: str) -> bool:
    """True iff `response` follows the instruction and is a usable reply (see module docstring):
    `follows`, at least MIN_WORDS own words, `is_complete`, not `is_degenerate`, and not
    `echoes_instruction`."""
    r = response.strip()
    if not follows(item, r):
        return False
    own = r[len(item.phrase) :] if item.constraint == "start_word" else r[: len(r) - len(item.phrase)]
    return (
        len(_tokens(own)) >= MIN_WORDS and is_complete(r) and not is_degenerate(r) and not echoes_instruction(item, r)
    )


# ----------------------------------------------------------------------------- pairs


def satisfy(item: DemoPrompt, response: str) -> str:
    """The smallest edit of `response` that follows the instruction (the chosen reply).

    start_word: 'Word, ' + the reply with its first letter lower-cased (kept for "I ..." and
    words with inner capitals such as "SmolLM"); end_phrase: the reply + ' ' + phrase."""
    r = response.strip()
    if item.constraint == "start_word":
        first = r.split()[0] if r.split() else ""
        keep = first in _I_WORDS or sum(c.isupper() for c in first) > 1
        return f"{item.phrase}, {r if keep else r[:1].lower() + r[1:]}"
    if item.constraint == "end_phrase":
        return f"{r} {item.phrase}"
    raise ValueError(f"unknown constraint {item.constraint!r}; expected one of {CONSTRAINTS}")


def misplace(item: DemoPrompt, response: str) -> str:
    """The word or phrase at the wrong end: 'reply Word.' / 'Phrase reply' (a rejected reply)."""
    r = response.strip()
    if item.constraint == "start_word":
        return f"{r} {item.phrase}."
    if item.constraint == "end_phrase":
        return f"{item.phrase} {r}"
    raise ValueError(f"unknown constraint {item.constraint!r}; expected one of {CONSTRAINTS}")


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt as chat messages and two completions (no end-of-turn
    token: append the tokenizer's one when tokenizing)."""

    messages: list
    chosen: str
    rejected: str
    kind: str  # one of PAIR_KINDS


def usable_reply(item: DemoPrompt, response: str) -> bool:
    """A reply worth editing into a chosen one: finished, fluent, MIN_WORDS+ words, and not
    already following the instruction (then there is nothing to prefer)."""
    r = response.strip()
    return len(_tokens(r)) >= MIN_WORDS and is_complete(r) and not is_degenerate(r) and not follows(item, r)


def build_pairs(
    items: list[DemoPrompt], responses: list[str], kinds: tuple[str, ...] = ("fix", "misplace")
) -> list[Pair]:
    """Preference pairs from the model's own replies; one pair of each kind in `kinds` per item.

    `responses[i]` is the model's greedy reply r to `items[i].plain_messages()` (the request
    without the instruction). Items whose reply is not `usable_reply` are skipped.

      fix       instructed prompt: chosen = satisfy(r), rejected = r.
      misplace  instructed prompt: chosen = satisfy(r), rejected = misplace(r).
      plain     prompt without the instruction: chosen = r, rejected = satisfy(r); teaches
                not to add words nobody asked for (off by default: the side check showed no
                such spill-over without it).
    """
    unknown = set(kinds) - set(PAIR_KINDS)
    if unknown:
        raise ValueError(f"unknown pair kinds {sorted(unknown)}; expected some of {PAIR_KINDS}")
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    out: list[Pair] = []
    for item, response in zip(items, responses):
        if not usable_reply(item, response):
            continue
        r = response.strip()
        fixed = satisfy(item, r)
        if "fix" in kinds:
            out.append(Pair(item.messages(), fixed, r, "fix"))
        if "misplace" in kinds:
            out.append(Pair(item.messages(), fixed, misplace(item, r), "misplace"))
        if "plain" in kinds:
            out.append(Pair(item.plain_messages(), r, fixed, "plain"))
    return out


# ----------------------------------------------------------------------------- side checks


def _stem(word: str) -> str:
    w = word.lower()
    if w in ("wolves", "scarves"):  # wolf, scarf
        return w[:-3]
    if w.endswith("ies"):
        return w[:-3]
    if w.endswith("ves"):
        return w[:-1]
    if w.endswith(("oes", "ches", "shes", "xes", "ses")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def mentions_topic(item: DemoPrompt, response: str) -> bool:
    """Crude on-topic check: the reply contains the topic's last word with a plural ending cut
    off ("libraries" -> "librar", "cats" -> "cat"), case-insensitive. Reported, not scored."""
    return _stem(item.topic.split()[-1]) in response.lower()


def adds_unasked(response: str) -> bool:
    """For a reply to a request *without* an instruction: True if it nonetheless starts with one
    of the demo's words (then a non-letter) or ends with one of its phrases. Checks that
    training taught following instructions, not always decorating replies."""
    r = response.strip()
    return any(r.startswith(w) and not r[len(w) :][:1].isalnum() for w in _WORDS) or r.endswith(_PHRASES)


FIELDS = ("topic", "request", "constraint", "instruction", "phrase")


def records(items: list) -> list[dict]:
    """Prompt records for alignkit's data tools and online recipes: the user message as `prompt`
    and the item's fields as columns, which `reward` reads back."""
    return [{"prompt": item.text, **{f: getattr(item, f) for f in FIELDS}} for item in items]


def reward(prompts, completions, **columns) -> list[float]:
    """The demo task as a reward spec (`alignkit.demo_task:reward`): 1.0 when `judge` passes the
    reply, else 0.0, for prompt records written by `records`."""
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise ValueError(
            f"alignkit.demo_task:reward needs the columns {', '.join(missing)} (prompt records from "
            "alignkit.demo_task.records)"
        )
    items = [DemoPrompt(*vals) for vals in zip(*(columns[f] for f in FIELDS))]
    return [float(judge(item, c)) for item, c in zip(items, completions)]
