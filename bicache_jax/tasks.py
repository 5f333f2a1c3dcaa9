"""Seeded shared-prefix tasks with exact answers: the traffic the default model is trained on.

Every instance looks like a served request: a long shared **prefix** (a "system prompt"
the answer depends on), a short per-request **prompt** (optional filler, then a question)
and a short **answer**. Three families:

* `facts`: a table `key value ;` (values are the number words `10` .. `41`) in the
  prefix; the question asks for the value of one key (`question : what is kab` -> `47`).
* `fewshot`: examples `A Q C X ;` in the prefix demonstrate a per-instance symbol
  substitution (3-5 of the source symbols A-M onto as many of the image symbols N-Z), each
  example a two-symbol input with every symbol followed by its image, repeated in random
  combinations; the question asks for the image of one symbol the examples cover
  (`input : C` -> `X`).
* `dialog`: a multi-turn chat in the prefix where user turns state facts
  (`the city of kab is rome .`), later statements overriding earlier ones (`now the city
  of kab is oslo .`), between chit-chat turns; the last turn asks about one of them
  (`what is the city of kab ?` -> the latest value).

Lengths: each instance draws a target context length C (prefix + prompt, tokens) and a
target prefix ratio r = p / (p + u) in [0.08, 0.96]; the prefix content (facts, examples,
turns, at most `MAX_FACTS` / `MAX_EXAMPLES` / `MAX_TURNS`) is grown to about r * C
tokens, a system note (`note : words .` after the header) filling what the capped content
leaves, and the prompt is padded with a filler note to about (1 - r) * C. The realised
ratio is close to r except where the minimal prefix or the question itself does not fit.

Seeds: an instance is a pure function of `(family, seed, question)`. The prefix (the
"world": table, examples, chat) depends only on `(family, seed)`; `question` picks one of
several requests sharing that prefix (different question, different filler). Training
uses seeds in `[0, EVAL_SEED_START)`, evaluation seeds `>= EVAL_SEED_START` (= 1_000_000).

Layout: in facts and fewshot a value directly follows its key and the question ends with
the asked key, so the answer slot sits where a value sits in the table. The suite once
separated them (`kab = 47 ;`, `what is kab ? <sep>`, images three tokens after their
source). In the format probe (`benchmarks/learnability.py --probes format`, 4 pairs, seed
1) the separated form was at 48% after 3,000 updates, still leaving the plateau of copying
any value of the table, while with adjacent keys and values the key matching emerged at
update 1,500-1,750 (96% at 3,000); see the README.

Tokens: a word-level vocabulary of our own (`VOCAB`, ids fixed by construction) with the
special tokens `<pad> <bos> <eos> <mask> <sep> <unk>`; `build_tokenizer` builds (and
optionally writes) the matching `tokenizers` WordLevel `tokenizer.json`. Answers are
followed by `<eos>` up to `gen_length` (default `GEN_LENGTH` = 8; a canvas of exactly the
answer's length has no `<eos>`); `is_correct` scores a decoded canvas (tokens up to the
first `<eos>` must equal the answer exactly).

`check_answer(prefix_text, prompt_text)` re-derives the answer by parsing the text alone;
it shares no state with the generators and is what the tests check them against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- vocabulary

PAD, BOS, EOS, MASK, SEP, UNK = "<pad>", "<bos>", "<eos>", "<mask>", "<sep>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK, SEP, UNK)

PUNCT = (":", "=", ";", "?", ".", ",", "->")
TEMPLATE_WORDS = (
    "system", "facts", "examples", "chat", "note", "question", "what", "is", "and", "input",
    "user", "assistant", "the", "of", "now", "ok", "noted", "sure", "thanks", "got", "it",
    "tell", "me", "something", "about", "recall")
DIGITS = tuple(str(i) for i in range(10))
NUMBERS = tuple(str(i) for i in range(10, 42))  # the 32 facts values, one token each
SYMBOLS = tuple(chr(ord("A") + i) for i in range(26))
# Fewshot substitutes symbols of the first half of the alphabet (sources) with symbols of
# the second (images): the two roles never share a symbol, as facts' names and numbers.
SOURCES, IMAGES = SYMBOLS[:13], SYMBOLS[13:]
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# 32 three-letter key / person names: consonant-vowel-consonant, a fixed deterministic pick.
NAMES = tuple(
    _CONSONANTS[i % 14] + _VOWELS[(i // 14) % 5] + _CONSONANTS[(i * 5 + i // 14) % 14]
    for i in range(32))
ATTRIBUTES = {
    "city": ("rome", "oslo", "lima", "kyiv", "baku", "doha", "riga", "bern", "cairo",
             "delhi", "paris", "seoul", "tokyo", "quito", "dakar", "hanoi"),
    "color": ("red", "blue", "green", "black", "white", "pink", "gray", "brown", "teal",
              "gold", "amber", "violet"),
    "pet": ("cat", "dog", "fish", "bird", "horse", "snake", "rabbit", "turtle", "hamster",
            "parrot", "lizard", "frog"),
    "food": ("rice", "bread", "pasta", "soup", "salad", "cheese", "apple", "mango",
             "pizza", "tofu", "beans", "curry"),
    "job": ("doctor", "pilot", "chef", "nurse", "farmer", "lawyer", "artist", "baker",
            "driver", "judge", "singer", "tailor"),
    "sport": ("tennis", "golf", "chess", "rugby", "boxing", "skiing", "rowing", "hockey",
              "judo", "karate", "polo", "squash"),
}
FILLER_WORDS = (
    "weather", "nice", "today", "very", "please", "kindly", "maybe", "quite", "sunny",
    "rain", "cloud", "river", "hill", "garden", "window", "paper", "music", "story", "walk",
    "morning", "evening", "quiet", "little", "big", "long", "short", "warm", "cold", "fast",
    "slow", "yes", "no", "hello", "again", "later", "soon", "here", "there", "always",
    "never")

VOCAB: tuple[str, ...] = (SPECIAL_TOKENS + PUNCT + TEMPLATE_WORDS + DIGITS + NUMBERS
                          + SYMBOLS + NAMES
                          + tuple(ATTRIBUTES)
                          + tuple(v for vals in ATTRIBUTES.values() for v in vals)
                          + FILLER_WORDS)
TOKEN_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
assert len(TOKEN_ID) == len(VOCAB), "vocabulary words must be distinct"
VOCAB_SIZE = 320  # model vocabulary (>= len(VOCAB); the spare ids are never produced)
assert len(VOCAB) <= VOCAB_SIZE
# numpy arrays of the word lists: `rng.choice` / `rng.permutation` draw the same values
# from an array as from the tuple, without converting the tuple on every call.
_FILLER_ARR, _NAMES_ARR, _NUMBERS_ARR, _SOURCES_ARR, _IMAGES_ARR = (
    np.array(w) for w in (FILLER_WORDS, NAMES, NUMBERS, SOURCES, IMAGES))
_ATTRIBUTE_ARRS = {k: np.array(v) for k, v in ATTRIBUTES.items()}

PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, UNK_ID = (TOKEN_ID[t] for t in SPECIAL_TOKENS)

FAMILIES = ("facts", "fewshot", "dialog")
GEN_LENGTH = 8
EVAL_SEED_START = 1_000_000
MIN_RATIO, MAX_RATIO = 0.08, 0.96
DEFAULT_CONTEXT = (24, 120)  # context (prefix + prompt) length range, tokens
# One-token answers and fixed-length examples keep every answer a single retrieval from
# the prefix, the simplest form of each family: the canvas is identical mask tokens with no
# position embedding, so a multi-token answer would also need each slot to work out its
# own index from relative attention alone (benchmarks/learnability.py measures both costs).
EXAMPLE_LEN = 2  # source symbols per fewshot example (each followed by its image)
# World sizes are capped (facts per table, examples, chat turns): a two-layer model on two
# CPU cores learns retrieval among a few distractors in minutes and among 27 in hours
# (issue 15's probes). A prefix whose capped content is shorter than its target length is
# padded with a system note (`note : words .` after the header), so the prefix ratio still
# spans the suite's range while the answer depends on the prefix content. Fewshot worlds
# keep 3 examples (6 symbol pairs): with up to 5 a trained candidate answered 96% of
# held-out worlds of 2 examples and 78% of those of 5 (README).
MAX_FACTS, MAX_EXAMPLES, MAX_TURNS = 4, 3, 10


def encode(text: str) -> list[int]:
    """Whitespace-split `text` into ids (unknown words map to `<unk>`)."""
    return [TOKEN_ID.get(w, UNK_ID) for w in text.split()]


def decode(ids: Sequence[int]) -> str:
    """Ids to space-joined words (ids outside the vocabulary print as `<unk>`)."""
    return " ".join(VOCAB[i] if 0 <= i < len(VOCAB) else UNK for i in ids)


def build_tokenizer(path: str | Path | None = None):
    """The `tokenizers` WordLevel tokenizer of `VOCAB` (whitespace pre-tokenizer).

    If `path` is given, writes it there as `tokenizer.json` (a directory gets
    `path/tokenizer.json`). Returns the `tokenizers.Tokenizer`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(TOKEN_ID)
    for i in range(len(VOCAB), VOCAB_SIZE):  # the spare ids, so id -> token is total
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


# ----------------------------------------------------------------------------- instances


@dataclasses.dataclass(frozen=True)
class Instance:
    """One request: shared prefix, own prompt, exact answer (ids exclude the `<eos>` pad).

    meta: facts about the instance: `seed`, `question`, `target_ratio`, `target_context`,
    realised `ratio`, and `topic` (what the question asks about: the facts keys, the
    fewshot input, the dialog `attribute person`).
    """

    family: str
    prefix_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer_text: str
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def prefix_text(self) -> str:
        return decode(self.prefix_ids)

    @property
    def prompt_text(self) -> str:
        return decode(self.prompt_ids)

    @property
    def context_len(self) -> int:
        """Prefix plus prompt tokens."""
        return len(self.prefix_ids) + len(self.prompt_ids)

    @property
    def prefix_ratio(self) -> float:
        """p / (p + u): the share of the context that is the shared prefix."""
        return len(self.prefix_ids) / self.context_len

    @property
    def question_ids(self) -> tuple[int, ...]:
        """The prompt without its filler note (`note : ... .`)."""
        ids = self.prompt_ids
        if ids[:2] == (TOKEN_ID["note"], TOKEN_ID[":"]):
            ids = ids[ids.index(TOKEN_ID["."]) + 1:]
        return ids

    def response_ids(self, gen_length: int = GEN_LENGTH) -> tuple[int, ...]:
        """The training target of the canvas: the answer, then `<eos>` up to gen_length
        (none when the answer fills the canvas exactly)."""
        if len(self.answer_ids) > gen_length:
            raise ValueError(f"answer of {len(self.answer_ids)} tokens does not fit "
                             f"gen_length={gen_length}")
        return self.answer_ids + (EOS_ID,) * (gen_length - len(self.answer_ids))


def answer_from_canvas(canvas_ids: Sequence[int]) -> tuple[int, ...]:
    """The decoded answer: canvas tokens up to (excluding) the first `<eos>`."""
    out = []
    for i in canvas_ids:
        if int(i) == EOS_ID:
            break
        out.append(int(i))
    return tuple(out)


def is_correct(canvas_ids: Sequence[int], instance: Instance) -> bool:
    """Exact-answer accuracy: tokens up to the first `<eos>` equal the answer."""
    return answer_from_canvas(canvas_ids) == instance.answer_ids


# ----------------------------------------------------------------------------- generators


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


_FAMILY_CODE = {"facts": 11, "fewshot": 22, "dialog": 33}


def _targets(rng: np.random.Generator, context: tuple[int, int],
             ratio: tuple[float, float]) -> tuple[int, float]:
    c = int(rng.integers(context[0], context[1] + 1))
    r = float(rng.uniform(ratio[0], ratio[1]))
    return c, r


def _filler(rng: np.random.Generator, n_tokens: int) -> list[str]:
    """`note : w w w .` of exactly n_tokens tokens (empty when n_tokens < 4)."""
    if n_tokens < 4:
        return []
    words = [str(w) for w in rng.choice(_FILLER_ARR, size=n_tokens - 3)]
    return ["note", ":", *words, "."]


def _padded(header: list[str], body: list[str], rng: np.random.Generator,
            p_target: int) -> list[str]:
    """`header [note] body <sep>`, the note (drawn last from `rng`) filling the prefix up to
    `p_target` tokens when the capped body leaves at least 4 tokens free."""
    free = p_target - len(header) - len(body) - 1
    return header + _filler(rng, free) + body + [SEP]


def _facts_world(rng: np.random.Generator, p_target: int):
    n_max = MAX_FACTS
    header = [BOS, "system", ":", "facts", "."]
    keys = [str(k) for k in rng.permutation(_NAMES_ARR)]
    body: list[str] = []
    table: list[tuple[str, list[str]]] = []
    while len(table) < n_max:
        value = [str(rng.choice(_NUMBERS_ARR))]
        fact = [keys[len(table)], *value, ";"]
        if table and len(header) + len(body) + len(fact) + 1 > p_target:
            break
        body += fact
        table.append((keys[len(table)], value))
    return _padded(header, body, rng, p_target), table


def _facts_question(rng: np.random.Generator, table):
    i = int(rng.integers(len(table)))
    return ["question", ":", "what", "is", table[i][0]], list(table[i][1]), [table[i][0]]


def _fewshot_world(rng: np.random.Generator, p_target: int):
    n_sym = int(rng.integers(3, 6))
    # Sources and images are disjoint symbols: the asked symbol occurs only in the source
    # slots of the examples (an image equal to a source made a second, misleading match).
    src = [str(s) for s in rng.choice(_SOURCES_ARR, size=n_sym, replace=False)]
    dst = [str(s) for s in rng.choice(_IMAGES_ARR, size=n_sym, replace=False)]
    mapping = dict(zip(src, dst, strict=True))
    header = [BOS, "system", ":", "examples", "."]
    body: list[str] = []
    covered: set[str] = set()
    n_ex = 0
    while True:
        length = EXAMPLE_LEN
        # Examples first cover every source symbol (in a random order), then repeat.
        todo = [s for s in src if s not in covered]
        seq = todo[:length]
        seq += [str(s) for s in rng.choice(src, size=length - len(seq))]
        seq = [str(s) for s in rng.permutation(seq)]
        ex = [w for s in seq for w in (s, mapping[s])] + [";"]
        if (n_ex >= 2 and not todo) and len(header) + len(body) + len(ex) + 1 > p_target:
            break
        if n_ex >= MAX_EXAMPLES and not todo:
            break
        body += ex
        covered.update(seq)
        n_ex += 1
    return _padded(header, body, rng, p_target), (src, mapping, n_ex)


def _fewshot_question(rng: np.random.Generator, world):
    src, mapping, _ = world
    sym = str(rng.choice(src))
    return ["input", ":", sym], [mapping[sym]], [sym]


_CHITCHAT = (["tell", "me", "something", "."], ["tell", "me", "something", "about"])
_ACKS = (["ok", "."], ["noted", "."], ["sure", "."], ["got", "it", "."], ["thanks", "."])


def _dialog_world(rng: np.random.Generator, p_target: int):
    header = [BOS, "system", ":", "chat", "."]
    people = [str(n) for n in rng.choice(_NAMES_ARR, size=int(rng.integers(2, 7)), replace=False)]
    attrs = list(ATTRIBUTES)
    body: list[str] = []
    state: dict[tuple[str, str], str] = {}
    n_turns = 0
    while True:
        kind = rng.random()
        if state and kind < 0.25:  # chit-chat: the assistant answers with filler words
            words = [str(w) for w in rng.choice(_FILLER_ARR, size=int(rng.integers(2, 7)))]
            ask = _CHITCHAT[int(rng.integers(2))]
            if ask[-1] == "about":
                ask = ask + [str(rng.choice(_FILLER_ARR)), "."]
            turn = ["user", ":", *ask, "assistant", ":", *words, "."]
            update = None
        else:
            if state and kind < 0.45:  # restate a known (person, attribute): an update
                keys = sorted(state)
                person, attr = keys[int(rng.integers(len(keys)))]
                lead = ["now"]
            else:
                person = people[int(rng.integers(len(people)))]
                attr = attrs[int(rng.integers(len(attrs)))]
                lead = ["now"] if (person, attr) in state else []
            value = str(rng.choice(_ATTRIBUTE_ARRS[attr]))
            turn = ["user", ":", *lead, "the", attr, "of", person, "is", value, ".",
                    "assistant", ":", *_ACKS[int(rng.integers(len(_ACKS)))]]
            update = ((person, attr), value)
        if state and len(header) + len(body) + len(turn) + 1 > p_target:
            break
        if state and n_turns >= MAX_TURNS:
            break
        body += turn
        n_turns += 1
        if update is not None:
            state[update[0]] = update[1]
    return _padded(header, body, rng, p_target), (state, n_turns)


def _dialog_question(rng: np.random.Generator, world):
    state, _ = world
    keys = sorted(state)
    person, attr = keys[int(rng.integers(len(keys)))]
    q = ["user", ":", "what", "is", "the", attr, "of", person, "?", "assistant", ":", SEP]
    return q, [state[(person, attr)]], [f"{attr} {person}"]


_WORLDS = {"facts": _facts_world, "fewshot": _fewshot_world, "dialog": _dialog_world}
_QUESTIONS = {"facts": _facts_question, "fewshot": _fewshot_question,
              "dialog": _dialog_question}


@functools.lru_cache(maxsize=4096)
def _world(family: str, seed: int, context: tuple[int, int], ratio: tuple[float, float]):
    """The shared part of `(family, seed)`: prefix ids, world state, length targets.

    Cached (questions on one prefix reuse it); callers must not mutate the result.
    """
    world_rng = _rng(_FAMILY_CODE[family], seed)
    c_target, r_target = _targets(world_rng, context, ratio)
    prefix, world = _WORLDS[family](world_rng, round(r_target * c_target))
    return tuple(encode(" ".join(prefix))), world, c_target, r_target


def make_instance(family: str, seed: int, question: int = 0, *,
                  context: tuple[int, int] = DEFAULT_CONTEXT,
                  ratio: tuple[float, float] = (MIN_RATIO, MAX_RATIO)) -> Instance:
    """The instance `(family, seed, question)`; deterministic in its arguments.

    All `question` values of one `(family, seed)` share the same prefix (the same world);
    they differ in the question and the filler. `context` is the (min, max) range of the
    target context length and `ratio` the range of the target prefix ratio.
    """
    if family not in _WORLDS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    if seed < 0 or question < 0:
        raise ValueError("seed and question must be >= 0")
    prefix_ids, world, c_target, r_target = _world(family, seed, tuple(context), tuple(ratio))
    q_rng = _rng(_FAMILY_CODE[family], seed, question + 1)
    q, answer, topic = _QUESTIONS[family](q_rng, world)
    # Aim the prompt at the target ratio (p / (p + u) = r) given the realised prefix.
    u_target = round(len(prefix_ids) * (1 - r_target) / r_target)
    u_target = min(u_target, max(context[1] - len(prefix_ids), len(q)))
    prompt = _filler(q_rng, u_target - len(q)) + q
    inst = Instance(
        family=family, prefix_ids=prefix_ids,
        prompt_ids=tuple(encode(" ".join(prompt))),
        answer_ids=tuple(encode(" ".join(answer))), answer_text=" ".join(answer),
        meta={"seed": seed, "question": question, "target_ratio": r_target,
              "target_context": c_target, "topic": topic})
    inst.meta["ratio"] = inst.prefix_ratio
    return inst


def recall_segments(family: str, seed: int, order_seed: int, *,
                    context: tuple[int, int] = DEFAULT_CONTEXT,
                    ratio: tuple[float, float] = (MIN_RATIO, MAX_RATIO)
                    ) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], bool]]]:
    """A dense training view of the world `(family, seed)`: its prefix, then a restatement.

    Returns `(prefix_ids, items)`; each item is `(ids, is_answer)` where the answer pieces
    are what a model must retrieve from the prefix: every fact `K V ;` (facts), every
    symbol `S T ;` (fewshot), every final fact `the ATTR of P is V .` (dialog), in an
    order drawn from `order_seed`, after `recall :`. Used only to train retrieval densely
    (many retrieved tokens per forward); never served, never evaluated.
    """
    prefix_ids, world, _, _ = _world(family, seed, tuple(context), tuple(ratio))
    rng = _rng(_FAMILY_CODE[family], seed, 0, order_seed)
    ids = TOKEN_ID
    items: list[tuple[tuple[int, ...], bool]] = [((ids["recall"], ids[":"]), False)]
    if family == "facts":
        for i in rng.permutation(len(world)):
            key, value = world[int(i)]
            items += [((ids[key],), False), (tuple(ids[v] for v in value), True),
                      ((ids[";"],), False)]
    elif family == "fewshot":
        src, mapping, _ = world
        for i in rng.permutation(len(src)):
            items += [((ids[src[int(i)]],), False),
                      ((ids[mapping[src[int(i)]]],), True), ((ids[";"],), False)]
    elif family == "dialog":
        state, _ = world
        keys = sorted(state)
        for i in rng.permutation(len(keys)):
            person, attr = keys[int(i)]
            items += [((ids["the"], ids[attr], ids["of"], ids[person], ids["is"]), False),
                      ((ids[state[(person, attr)]],), True), ((ids["."],), False)]
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return prefix_ids, items


def generate_instances(family: str, seed: int, n: int, *, questions_per_prefix: int = 1,
                       context: tuple[int, int] = DEFAULT_CONTEXT,
                       ratio: tuple[float, float] = (MIN_RATIO, MAX_RATIO)) -> list[Instance]:
    """`n` instances from seeds `seed, seed + 1, ...`, `questions_per_prefix` per seed.

    With `questions_per_prefix = k`, consecutive groups of k instances share one prefix
    (shared-prefix serving traffic). Deterministic given the arguments.
    """
    if questions_per_prefix < 1:
        raise ValueError("questions_per_prefix must be >= 1")
    return [make_instance(family, seed + i // questions_per_prefix,
                          i % questions_per_prefix, context=context, ratio=ratio)
            for i in range(n)]


def eval_instances(n_per_family: int, *, seed: int = EVAL_SEED_START,
                   families: Sequence[str] = FAMILIES, questions_per_prefix: int = 1,
                   context: tuple[int, int] = DEFAULT_CONTEXT) -> list[Instance]:
    """The held-out evaluation set: `n_per_family` instances per family, eval seeds only."""
    if seed < EVAL_SEED_START:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_START}, got {seed}")
    out = []
    for fam in families:
        out += generate_instances(fam, seed, n_per_family,
                                  questions_per_prefix=questions_per_prefix, context=context)
    return out


# ----------------------------------------------------------------------------- checker


def _split_clauses(words: list[str], sep: str) -> list[list[str]]:
    out, cur = [], []
    for w in words:
        if w == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    if cur:
        out.append(cur)
    return out


def _body(prefix_text: str, header: str) -> list[str]:
    words = prefix_text.split()
    head = [BOS, "system", ":", header, "."]
    if words[:5] != head or words[-1] != SEP:
        raise ValueError(f"not a {header!r} prefix: {prefix_text[:60]!r}")
    words = words[5:-1]
    if words[:2] == ["note", ":"]:  # the system note padding the prefix
        words = words[words.index(".") + 1:]
    return words


def _question(prompt_text: str) -> list[str]:
    """The prompt without its filler note (and a dialog prompt's final `<sep>`)."""
    words = prompt_text.split()
    if words[-1:] == [SEP]:
        words = words[:-1]
    if words[:2] == ["note", ":"]:
        words = words[words.index(".") + 1:]
    return words


def check_answer(prefix_text: str, prompt_text: str) -> str:
    """Re-derive the answer text of a request from its prefix and prompt text alone.

    Raises ValueError when the text is not a well-formed instance of a known family or
    the answer is not determined (a key that is not in the table, a symbol the examples do
    not define, an inconsistent example, a fact never stated).
    """
    family = prefix_text.split()[3] if len(prefix_text.split()) > 3 else ""
    q = _question(prompt_text)
    if family == "facts":
        table = {}
        for clause in _split_clauses(_body(prefix_text, "facts"), ";"):
            if len(clause) < 2:
                raise ValueError(f"bad fact {clause}")
            table[clause[0]] = clause[1:]
        if len(q) != 5 or q[:4] != ["question", ":", "what", "is"]:
            raise ValueError(f"bad question {q}")
        if q[4] not in table:
            raise ValueError(f"key {q[4]!r} not in the table")
        return " ".join(table[q[4]])
    if family == "examples":
        mapping: dict[str, str] = {}
        for clause in _split_clauses(_body(prefix_text, "examples"), ";"):
            if len(clause) % 2:
                raise ValueError(f"an example is symbol-image pairs: {clause}")
            for a, b in zip(clause[::2], clause[1::2], strict=True):
                if mapping.setdefault(a, b) != b:
                    raise ValueError(f"inconsistent examples for {a!r}")
        if q[:2] != ["input", ":"] or len(q) < 3:
            raise ValueError(f"bad question {q}")
        try:
            return " ".join(mapping[s] for s in q[2:])
        except KeyError as e:
            raise ValueError(f"symbol {e} not defined by the examples") from e
    if family == "chat":
        state = {}
        words = _body(prefix_text, "chat")
        turns = _split_turns(words)
        for speaker, text in turns:
            if speaker != "user":
                continue
            if text and text[0] == "now":
                text = text[1:]
            # "the ATTR of PERSON is VALUE ."
            if len(text) == 7 and text[0] == "the" and text[2] == "of" and text[4] == "is":
                state[(text[1], text[3])] = text[5]
        if (q[:5] != ["user", ":", "what", "is", "the"] or q[6] != "of"
                or q[-3:] != ["?", "assistant", ":"]):
            raise ValueError(f"bad question {q}")
        key = (q[5], q[7])
        if key not in state:
            raise ValueError(f"{key} never stated")
        return state[key]
    raise ValueError(f"unknown prefix kind {family!r}")


def _split_turns(words: list[str]) -> list[tuple[str, list[str]]]:
    """`user : ... assistant : ...` into (speaker, words) turns."""
    turns: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(words):
        if words[i] in ("user", "assistant") and i + 1 < len(words) and words[i + 1] == ":":
            turns.append((words[i], []))
            i += 2
            continue
        if not turns:
            raise ValueError(f"chat text before the first turn: {words[:8]}")
        turns[-1][1].append(words[i])
        i += 1
    return turns


__all__ = ["BOS_ID", "EOS_ID", "EVAL_SEED_START", "FAMILIES", "GEN_LENGTH", "Instance",
           "MASK_ID", "PAD_ID", "SEP_ID", "TOKEN_ID", "UNK_ID", "VOCAB", "VOCAB_SIZE",
           "answer_from_canvas", "build_tokenizer", "check_answer", "decode", "encode",
           "eval_instances", "generate_instances", "is_correct", "make_instance",
           "recall_segments"]
