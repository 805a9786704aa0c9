"""The `alignkit demo` task: follow a verifiable formatting instruction.

Each prompt asks for one short sentence about an everyday topic and adds one formatting
instruction that code can check exactly (the "verifiable instructions" idea of IFEval,
arXiv 2311.07911):

    lowercase   "... Your entire reply must be in lowercase letters."
    uppercase   "... Write your whole reply in capital letters."
    quotes      "... Wrap your entire reply in double quotation marks."
    end_phrase  '... End your reply with the exact phrase "Good luck!"'

Why this task. SmolLM2-135M-Instruct writes a fine sentence about the topic but ignores the
instruction: with greedy decoding it follows it on ~0% of prompts (measured: every reply
starts with a capital letter, none is quoted, none ends with the asked phrase). Following a
user's explicit formatting instruction is a behaviour a user notices and cares about, and a
judge in a few lines of Python decides it without a reward model, so the before/after numbers
are exact, reproducible and cheap. Lowercase and uppercase are both in the mix, so a model
that just changes every reply's case in one direction cannot score on both: the instruction
has to be read.

Why the judge is honest. `judge` checks only the instruction, plus a floor against
degenerate replies: a reply must keep at least three words of its own (besides the required
phrase or quotes), so "The end." or '""' do not pass. It does not check that the sentence is
good or on topic; `mentions_topic` is a separate, cruder check used to show the replies still
talk about the topic after training (a guard against reward hacking, not part of the score).

Train / held-out split. Topics are split once, by a fixed rule that does not depend on the
seed, into disjoint train and held-out lists; the `end_phrase` phrases are split the same way.
So a held-out prompt never shares its topic, nor its required phrase, with any training
prompt; the request and instruction wordings are shared (they are the "task").

Preference pairs (`preference_pair`): rejected = the model's own reply that breaks the
instruction; chosen = the same reply minimally edited by `satisfy` so that it follows it
(lower-cased, upper-cased, wrapped in quotes, or with the phrase appended). Both sides are
the model's own words, so the pair differs only where the instruction matters.

Everything here is pure Python and deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ALL_CONSTRAINTS = ("lowercase", "uppercase", "quotes", "end_phrase", "start_word")
CONSTRAINTS = ("lowercase", "uppercase", "quotes", "end_phrase")

# Everyday topics a 135M chat model can write a sentence about. Written for this demo.
_TOPICS = (
    "cats", "dogs", "the ocean", "coffee", "the moon", "bicycles", "rain", "libraries", "volcanoes",
    "chess", "bread", "trees", "music", "winter", "the sun", "elephants", "trains", "honey",
    "mountains", "rivers", "computers", "gardening", "pizza", "owls", "deserts", "soccer", "clocks",
    "bridges", "penguins", "tea", "forests", "apples", "bananas", "chocolate", "cheese", "rice",
    "soup", "pancakes", "strawberries", "carrots", "tomatoes", "oranges", "lemons", "potatoes",
    "horses", "cows", "sheep", "rabbits", "frogs", "bees", "butterflies", "dolphins", "whales",
    "sharks", "tigers", "lions", "bears", "wolves", "foxes", "eagles", "parrots", "turtles",
    "snakes", "spiders", "ants", "camels", "giraffes", "zebras", "monkeys", "kangaroos", "snow",
    "thunderstorms", "rainbows", "clouds", "the wind", "autumn", "spring", "summer", "sunsets",
    "stars", "planets", "comets", "lakes", "islands", "beaches", "caves", "waterfalls", "glaciers",
    "jungles", "meadows", "flowers", "roses", "sunflowers", "mushrooms", "cactuses", "ferns",
    "books", "newspapers", "pencils", "paintings", "photography", "poetry", "movies", "theaters",
    "museums", "schools", "hospitals", "airports", "cars", "buses", "ships", "airplanes",
    "rockets", "helicopters", "skateboards", "kites", "balloons", "candles", "lamps", "mirrors",
    "windows", "doors", "chairs", "tables", "beds", "pillows", "blankets", "umbrellas", "hats",
    "shoes", "gloves", "scarves", "watches", "phones", "cameras", "radios", "keyboards", "robots",
    "the internet", "email", "maps", "calendars", "kitchens", "ovens", "refrigerators", "bakeries",
    "markets", "restaurants", "picnics", "birthdays", "holidays", "weddings", "friendship",
    "laughter", "sleep", "dreams", "exercise", "running", "swimming", "hiking", "camping",
    "fishing", "dancing", "singing", "cooking", "reading", "writing", "drawing", "knitting",
    "pottery", "puzzles", "board games", "video games", "basketball", "tennis", "baseball",
    "golf", "cycling", "yoga", "skiing", "surfing", "sailing", "guitars", "pianos", "violins",
    "drums", "trumpets", "orchestras", "jazz", "farms", "tractors", "barns", "gardens", "parks",
    "playgrounds", "zoos", "aquariums", "castles", "pyramids", "lighthouses", "windmills",
    "towers", "cities", "villages", "streets", "fountains", "statues", "coins", "stamps",
    "diamonds", "gold", "silver", "iron", "glass", "paper", "wood", "stone", "sand", "salt",
    "sugar", "milk", "eggs", "butter", "noodles", "sandwiches", "cookies", "cakes", "ice cream",
    "popcorn", "peanuts", "grapes", "cherries", "pineapples", "watermelons", "coconuts",
    "avocados", "onions", "garlic", "pepper", "cinnamon", "vanilla", "lavender", "bamboo",
    "oak trees", "pine trees", "seashells", "coral reefs", "octopuses", "jellyfish", "crabs",
    "lobsters", "ducks", "swans", "flamingos", "peacocks", "hummingbirds", "crows", "pigeons",
)

# Phrases for `end_phrase`; split train/held-out like the topics.
_PHRASES = (
    "Have a nice day!", "That is all.", "Thanks for asking!", "I hope this helps.", "Stay curious!",
    "The end.", "See you soon!", "Enjoy!", "Good luck!", "Best wishes.", "Have fun!",
    "Until next time.", "Keep learning!", "Cheers!", "Take care.", "Happy reading!",
)

# Openers for `start_word`; split like the topics.
_OPENERS = (
    "Indeed", "Certainly", "Well", "Honestly", "Interestingly", "Surprisingly", "Absolutely",
    "Sure", "Actually", "Basically", "Clearly", "Naturally", "Remarkably", "Notably",
    "Undoubtedly", "Truly",
)

_REQUESTS = (
    "Write one sentence about {topic}.",
    "Tell me one interesting fact about {topic}.",
    "Describe {topic} in one sentence.",
    "Write a short sentence about {topic}.",
)

_INSTRUCTIONS = {
    "lowercase": (
        "Your entire reply must be in lowercase letters, with no capital letters at all.",
        "Use only lowercase letters in your reply.",
        "Do not use any capital letters in your reply.",
    ),
    "uppercase": (
        "Your entire reply must be in capital letters.",
        "Write your whole reply in uppercase letters.",
        "Use only capital letters in your reply.",
    ),
    "quotes": (
        "Wrap your entire reply in double quotation marks.",
        "Put your whole reply inside double quotes.",
        "Enclose your entire reply in double quotation marks.",
    ),
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
_OPEN_QUOTES = ('"', "\u201c")
_CLOSE_QUOTES = ('"', "\u201d")
MIN_WORDS = 3  # a reply must keep at least this many words of its own to pass


def _split(items: tuple, heldout_every: int = 2) -> tuple[tuple, tuple]:
    order = list(items)
    random.Random(_SPLIT_SEED).shuffle(order)
    held = tuple(x for i, x in enumerate(order) if i % heldout_every == 0)
    train = tuple(x for i, x in enumerate(order) if i % heldout_every != 0)
    return train, held


TRAIN_TOPICS, HELDOUT_TOPICS = _split(_TOPICS)
TRAIN_PHRASES, HELDOUT_PHRASES = _split(_PHRASES)
TRAIN_OPENERS, HELDOUT_OPENERS = _split(_OPENERS)


@dataclass(frozen=True)
class DemoPrompt:
    """One prompt: a request about `topic` plus one formatting `constraint`."""

    topic: str
    request: str  # the request alone, e.g. "Write one sentence about cats."
    constraint: str  # one of CONSTRAINTS
    instruction: str  # the formatting instruction as shown to the model
    phrase: str | None = None  # the required ending, for constraint == "end_phrase"

    @property
    def text(self) -> str:
        """The user message: request, then instruction."""
        return f"{self.request} {self.instruction}"

    def messages(self) -> list[dict]:
        """Chat messages for the model (no system message: the chat template adds its default)."""
        return [{"role": "user", "content": self.text}]

    def plain_messages(self) -> list[dict]:
        """The same request without the instruction (for the no-instruction side check)."""
        return [{"role": "user", "content": self.request}]


def _make(topics: tuple, phrases: tuple, n: int, seed: int, constraints=CONSTRAINTS, openers=()) -> list[DemoPrompt]:
    """n distinct prompts, constraints balanced (round-robin), topics drawn without repeats
    until the list is used up (then again from a fresh shuffle)."""
    rng = random.Random(seed)
    combos = len(topics) * len(_REQUESTS) * len(constraints) * max(
        len(v) for v in _INSTRUCTIONS.values())
    if n > combos:
        raise ValueError(f"asked for {n} prompts but this split has only ~{combos} distinct ones")
    out: list[DemoPrompt] = []
    seen: set[str] = set()
    pool: list[str] = []
    while len(out) < n:
        if not pool:
            pool = list(topics)
            rng.shuffle(pool)
        topic = pool.pop()
        constraint = constraints[len(out) % len(constraints)]
        request = rng.choice(_REQUESTS).format(topic=topic)
        phrase = (rng.choice(phrases) if constraint == "end_phrase" else
                  rng.choice(openers) if constraint == "start_word" else None)
        instruction = rng.choice(_INSTRUCTIONS[constraint]).format(phrase=phrase)
        item = DemoPrompt(topic, request, constraint, instruction, phrase)
        if item.text in seen:
            continue
        seen.add(item.text)
        out.append(item)
    return out


def train_prompts(n: int, seed: int = 0, constraints=CONSTRAINTS) -> list[DemoPrompt]:
    """n training prompts (train topics and train phrases only), deterministic for `seed`."""
    return _make(TRAIN_TOPICS, TRAIN_PHRASES, n, seed, constraints, TRAIN_OPENERS)


def heldout_prompts(n: int = 200, seed: int = 0, constraints=CONSTRAINTS) -> list[DemoPrompt]:
    """n evaluation prompts from the held-out topics and phrases, deterministic for `seed`.

    Disjoint from every `train_prompts` output for any seed: no shared topic or phrase. The
    default seed gives the demo's fixed benchmark; keep it fixed when comparing runs."""
    return _make(HELDOUT_TOPICS, HELDOUT_PHRASES, n, seed + 1_000_003, constraints, HELDOUT_OPENERS)


def _words(text: str) -> int:
    return len(text.split())


def judge(item: DemoPrompt, response: str) -> bool:
    """True iff `response` follows `item`'s formatting instruction (and is not degenerate).

    lowercase   no uppercase character anywhere, and at least one letter.
    uppercase   no lowercase character anywhere, and at least one letter.
    quotes      after stripping whitespace, starts with a double quote (" or \u201c) and ends
                with one (" or \u201d).
    end_phrase  after stripping whitespace, ends with the exact phrase (case and punctuation
                as given).
    For all: at least MIN_WORDS words besides the quotes or the phrase, so an empty reply or
    the bare phrase does not count as following the instruction.
    """
    r = response.strip()
    if item.constraint == "lowercase":
        return not any(c.isupper() for c in r) and any(c.isalpha() for c in r) and _words(r) >= MIN_WORDS
    if item.constraint == "uppercase":
        return not any(c.islower() for c in r) and any(c.isalpha() for c in r) and _words(r) >= MIN_WORDS
    if item.constraint == "quotes":
        return (len(r) >= 2 and r.startswith(_OPEN_QUOTES) and r.endswith(_CLOSE_QUOTES)
                and _words(r[1:-1]) >= MIN_WORDS)
    if item.constraint == "end_phrase":
        assert item.phrase is not None, "end_phrase prompt without a phrase"
        return r.endswith(item.phrase) and _words(r[: len(r) - len(item.phrase)]) >= MIN_WORDS
    if item.constraint == "start_word":
        assert item.phrase is not None, "start_word prompt without a word"
        rest = r[len(item.phrase):]
        return (r.startswith(item.phrase) and not rest[:1].isalnum()
                and _words(rest.lstrip(",.!:;- ")) >= MIN_WORDS)
    raise ValueError(f"unknown constraint {item.constraint!r}; expected one of {ALL_CONSTRAINTS}")


_I_WORDS = ("I", "I'm", "I've", "I'd", "I'll")


def satisfy(item: DemoPrompt, response: str) -> str:
    """The smallest edit of `response` that follows `item`'s instruction (used for chosen replies).

    Lower- or upper-cases it, wraps it in double quotes (after removing quotes already around
    it), or appends the phrase after a space. The words stay the model's own."""
    r = response.strip()
    if item.constraint == "lowercase":
        return r.lower()
    if item.constraint == "uppercase":
        return r.upper()
    if item.constraint == "quotes":
        return '"' + r.strip('"\u201c\u201d ') + '"'
    if item.constraint == "end_phrase":
        assert item.phrase is not None, "end_phrase prompt without a phrase"
        return r if r.endswith(item.phrase) else f"{r} {item.phrase}"
    if item.constraint == "start_word":
        assert item.phrase is not None, "start_word prompt without a word"
        first = r.split()[0] if r.split() else ""
        keep = first in _I_WORDS or sum(c.isupper() for c in first) > 1
        return f"{item.phrase}, {r if keep else r[:1].lower() + r[1:]}"
    raise ValueError(f"unknown constraint {item.constraint!r}; expected one of {CONSTRAINTS}")


def is_complete(response: str) -> bool:
    """Heuristic: the reply ends like a finished sentence (., !, ? or a closing quote).

    Generation that hit max_new_tokens usually stops mid-sentence; such replies make poor
    chosen replies, so `preference_pair` skips them."""
    return response.strip().endswith((".", "!", "?") + _CLOSE_QUOTES)


def preference_pair(item: DemoPrompt, response: str) -> tuple[str, str] | None:
    """(chosen, rejected) built from the model's own `response` to `item`, or None.

    None when the response already follows the instruction (nothing to prefer), when it looks
    cut off (`is_complete`), or when it has fewer than MIN_WORDS words (its edit would fail
    the judge). Otherwise rejected = the response, chosen = `satisfy(item, response)`.
    Completions are returned without the end-of-turn token; append it when tokenizing."""
    r = response.strip()
    if judge(item, r) or not is_complete(r) or _words(r) < MIN_WORDS:
        return None
    chosen = satisfy(item, r)
    if not judge(item, chosen):  # e.g. a reply with no letters at all
        return None
    return chosen, r


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt as chat messages and two completions (no end-of-turn token)."""

    messages: list
    chosen: str
    rejected: str
    kind: str  # "fix" | "contrast" | "plain" (see `build_pairs`)


def build_pairs(items: list[DemoPrompt], responses: list[str], seed: int = 0,
                kinds: tuple[str, ...] = ("fix", "contrast", "plain"), constraints=CONSTRAINTS) -> list[Pair]:
    """Preference pairs from the model's own replies, up to one of each kind per item.

    `responses[i]` is the model's greedy reply to `items[i].request` (the request without the
    instruction; the base model ignores the instruction anyway, so one reply serves both the
    instructed and the plain prompt). Let r be that reply and fix = `satisfy(item, r)`:

      fix       prompt with the instruction: chosen = fix, rejected = r.
      contrast  prompt with the instruction: chosen = fix, rejected = r formatted for a
                different, randomly drawn constraint (e.g. upper-cased for a lowercase
                prompt). Teaches *which* format was asked, so no single format is a shortcut.
      plain     prompt without any instruction: chosen = r, rejected = fix. Teaches not to
                format when nobody asked, and keeps the model's own replies likely.

    Replies that look cut off, are shorter than MIN_WORDS words, or already follow the
    instruction (then "fix" and "contrast" would teach nothing) are skipped. Deterministic
    for `seed`."""
    rng = random.Random(seed)
    out: list[Pair] = []
    for item, response in zip(items, responses, strict=True):
        r = response.strip()
        if judge(item, r) or not is_complete(r) or _words(r) < MIN_WORDS:
            continue
        fix = satisfy(item, r)
        if not judge(item, fix):
            continue
        if "fix" in kinds:
            out.append(Pair(item.messages(), fix, r, "fix"))
        if "contrast" in kinds:
            other = rng.choice([c for c in constraints if c != item.constraint])
            phrase = (rng.choice(TRAIN_PHRASES) if other == "end_phrase" else
                      rng.choice(TRAIN_OPENERS) if other == "start_word" else None)
            wrong = satisfy(DemoPrompt(item.topic, item.request, other, "", phrase), r)
            if not judge(item, wrong):
                out.append(Pair(item.messages(), fix, wrong, "contrast"))
        if "plain" in kinds and not breaks_format_unasked(r):
            out.append(Pair(item.plain_messages(), r, fix, "plain"))
    return out


def _stem(word: str) -> str:
    w = word.lower()
    if w.endswith("ies"):
        return w[:-3]
    if w in ("wolves", "scarves"):  # wolf, scarf
        return w[:-3]
    if w.endswith("ves"):
        return w[:-1]
    if w.endswith(("oes", "ches", "shes", "xes", "ses")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def mentions_topic(item: DemoPrompt, response: str) -> bool:
    """Crude on-topic check: the reply contains the topic's last word, plural endings cut off
    ("libraries" -> "librar", "cats" -> "cat"), case-insensitive. A side check, not the score."""
    return _stem(item.topic.split()[-1]) in response.lower()


def breaks_format_unasked(response: str) -> bool:
    """For a reply to a request *without* any instruction: True if it nonetheless looks like one
    of the trained formats (all lowercase, all uppercase, or wrapped in quotes). Used to check
    that training taught the model to follow instructions, not to always apply them."""
    r = response.strip()
    letters = [c for c in r if c.isalpha()]
    if not letters:
        return False
    return (all(c.islower() for c in letters) or all(c.isupper() for c in letters)
            or (r.startswith(_OPEN_QUOTES) and r.endswith(_CLOSE_QUOTES))
            or any(r.startswith(w) and not r[len(w):len(w) + 1].isalnum() for w in _OPENERS)
            or r.endswith(_PHRASES))
