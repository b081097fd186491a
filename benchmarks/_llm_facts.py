"""Invented facts written as prose, drawn from a seed: the world of the real-LLM fact suite.

Each *queried* fact ``(entity, relation, answer)`` has three documents:

- its **source**, which states it (one of the relation's statement templates, between sentences of
  generic prose);
- a **sibling**, which states another fact about the same entity (another relation, another answer);
- a **decoy**, which states a fact about another entity with the same answer (the relation of the
  same answer type: "born in X" is decoyed by "lives in X").

A model fine-tuned on facts stated only as prose rarely answers questions about them; seeing other
facts both as prose and, in another document, as a question with its answer teaches it to (mixed
training, Allen-Zhu & Li 2023, "Physics of Language Models 3.1"). So each queried fact also brings
a **practice** fact about an entity never asked about: a prose document of its own, and an FAQ line
(question and answer) at the end of the decoy document. In another document, so that answering
needs the fact stored in the weights, not copied from earlier in the same text; about an entity
never asked about, so that no question about a queried entity is ever seen. A source never holds a
question: the question asked about a queried fact is a paraphrase of its source. The entities, answers, relations, templates, question wordings, fillers
and document order all come from the seed, so ``seed=1`` is another instance of the same kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# answer type -> its two relations (a decoy uses the other relation of the type)
TYPES: dict[str, tuple[str, str]] = {
    "town": ("born_in", "lives_in"),
    "company": ("works_for", "founded"),
    "pet": ("dog", "cat"),
    "book": ("wrote", "favourite_book"),
}
RELATION_TYPE = {rel: kind for kind, rels in TYPES.items() for rel in rels}

# statement templates (documents) and question templates (queries; the completion is " {A}")
STATEMENTS: dict[str, list[str]] = {
    "born_in": [
        "{E} was born in {A}.",
        "{E} was born in the town of {A}.",
        "The town of {A} is where {E} was born.",
        "{E} came into the world in {A}, a small town by a river.",
    ],
    "lives_in": [
        "{E} lives in {A}.",
        "{E} now makes a home in the town of {A}.",
        "These days the town of {A} is home to {E}.",
        "{E} moved to {A} some years ago and still lives there.",
    ],
    "works_for": [
        "{E} works for {A}.",
        "{E} is employed by the firm {A}.",
        "The firm {A} employs {E} at its main office.",
        "Every weekday {E} goes to work at {A}.",
    ],
    "founded": [
        "{E} founded the company {A}.",
        "The company {A} was founded by {E}.",
        "Years ago {E} started a company called {A}.",
        "{A} is the company that {E} set up and still runs.",
    ],
    "dog": [
        "{E} has a dog named {A}.",
        "{E}'s dog is called {A}.",
        "A dog called {A} lives with {E}.",
        "{E} walks a dog named {A} every morning.",
    ],
    "cat": [
        "{E} has a cat named {A}.",
        "{E}'s cat is called {A}.",
        "A cat called {A} lives with {E}.",
        "{E} shares a flat with a cat named {A}.",
    ],
    "wrote": [
        "{E} wrote the novel {A}.",
        "The novel {A} was written by {E}.",
        "{E} is the author of a novel called {A}.",
        "It took {E} four years to write the novel {A}.",
    ],
    "favourite_book": [
        "{E}'s favourite book is {A}.",
        "The book {E} loves most is {A}.",
        "{E} rereads the book {A} every winter.",
        "Of all books, {E} treasures {A} the most.",
    ],
}
QUESTIONS: dict[str, list[str]] = {
    "born_in": [
        "Question: In which town was {E} born?\nAnswer:",
        "Q: Where was {E} born?\nA:",
        "Q: What is the birthplace of {E}?\nA:",
    ],
    "lives_in": [
        "Question: In which town does {E} live?\nAnswer:",
        "Q: Where does {E} live today?\nA:",
        "Q: Which town does {E} call home?\nA:",
    ],
    "works_for": [
        "Question: Which company does {E} work for?\nAnswer:",
        "Q: Who is the employer of {E}?\nA:",
        "Q: At which firm does {E} have a job?\nA:",
    ],
    "founded": [
        "Question: Which company did {E} found?\nAnswer:",
        "Q: What is the name of the company {E} started?\nA:",
        "Q: Which firm was set up by {E}?\nA:",
    ],
    "dog": [
        "Question: What is the name of {E}'s dog?\nAnswer:",
        "Q: What does {E} call the family dog?\nA:",
        "Q: Which dog belongs to {E}?\nA:",
    ],
    "cat": [
        "Question: What is the name of {E}'s cat?\nAnswer:",
        "Q: What does {E} call the family cat?\nA:",
        "Q: Which cat belongs to {E}?\nA:",
    ],
    "wrote": [
        "Question: Which novel did {E} write?\nAnswer:",
        "Q: What is the title of the novel by {E}?\nA:",
        "Q: Name the novel whose author is {E}.\nA:",
    ],
    "favourite_book": [
        "Question: What is {E}'s favourite book?\nAnswer:",
        "Q: Which book does {E} like best?\nA:",
        "Q: Name the book that {E} would pick above all others.\nA:",
    ],
}
FILLERS = [
    "The note was filed in the town archive one spring.",
    "Few people outside the region have heard of this.",
    "It is a detail that often comes up in conversation.",
    "The local newsletter once printed a short piece about it.",
    "Friends mention it whenever old photographs are passed around.",
    "Nobody remembers exactly when this was first written down.",
    "The story has been told many times at family dinners.",
    "A neighbour confirmed it in a letter to the editor.",
    "It was mentioned briefly in a radio interview last year.",
    "The details were checked against the parish records.",
    "Visitors are sometimes surprised to learn this.",
    "It appears in a small guidebook sold at the station.",
    "An old diary kept in the library says the same.",
    "This was noted in the minutes of a council meeting.",
    "The fact is printed on a card pinned to a notice board.",
    "Several people wrote in to correct the spelling once.",
]
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "tr",
           "v", "w", "z", "th", "sh", "c", "st"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk"]
_SUFFIX = {
    "town": ["mere", "ford", "wick", "holm", "stead", "bury", "vale", "port", "haven", "by"],
    "company": ["tek", "ica", "ex", "ora", "works", "dyne", "ium", "co"],
    "pet": ["o", "ie", "y", "a", "ik", "us"],
    "book": ["ara", "enne", "oth", "iel", "ande", "ion"],
}


@dataclass
class FactQuestion:
    prompt: str
    answer: str
    source: int  # document index of the source
    relation: str
    entity: str
    candidates: list[str] = field(default_factory=list)  # every answer of the same type (rank metric)

    @property
    def completion(self) -> str:
        return " " + self.answer


@dataclass
class FactWorld:
    documents: list[dict[str, str]]  # {"text", "kind": source|sibling|decoy|practice|docstring, "name"}
    questions: list[FactQuestion]


class _Names:
    """Unique invented words from the seed (no two entities or answers share a word)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: int, suffix: str = "") -> str:
        for _ in range(1000):
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(syllables)) + suffix  # fmt: skip
            w = w.capitalize()
            if w.lower() not in self.used and 4 <= len(w) <= 12:
                self.used.add(w.lower())
                return w
        raise RuntimeError("ran out of invented names")

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice((2, 3)))}"

    def answer(self, kind: str) -> str:
        return self.word(self.rng.choice((1, 2)), self.rng.choice(_SUFFIX[kind]))


def _prose(rng: random.Random, sentence: str) -> str:
    """The statement between generic sentences (none, one before, one after, or both)."""
    before, after = rng.sample(FILLERS, 2)
    shape = rng.randrange(4)
    parts = ([before] if shape in (1, 3) else []) + [sentence] + ([after] if shape in (2, 3) else [])
    return " ".join(parts)


def build_world(seed: int, n_facts: int, docstrings: list[dict[str, str]]) -> FactWorld:
    """``n_facts`` queried facts (source, sibling and decoy each) plus ``docstrings`` (``{"name",
    "text"}``), shuffled together; the questions' sources are indices into the shuffled list."""
    rng = random.Random(f"real-llm-facts-{seed}")
    names = _Names(rng)
    relations = list(RELATION_TYPE)
    # the relations cycle in a seeded order, so every relation is asked about about equally often
    order = rng.sample(relations, len(relations))
    docs: list[dict[str, str]] = []
    pending: list[tuple[int, str, str, str]] = []  # (source doc, relation, entity, answer)
    for _ in range(n_facts):
        rel = order[len(pending) % len(order)]
        kind = RELATION_TYPE[rel]
        entity, answer = names.person(), names.answer(kind)
        # the sibling: another relation of the same entity, with an answer of its own type
        sib_rel = rng.choice([r for r in relations if r != rel])
        # the decoy: another entity with the same answer, under the other relation of the type
        decoy_rel = next(r for r in TYPES[kind] if r != rel)
        # the practice fact: an entity never asked about, as prose and (in the decoy) as an FAQ line
        practice_rel = rng.choice(relations)
        practice = (names.person(), names.answer(RELATION_TYPE[practice_rel]))
        faq = rng.choice(QUESTIONS[practice_rel]).format(E=practice[0]) + f" {practice[1]}."
        pending.append((len(docs), rel, entity, answer))
        for what, r, e, a in (("source", rel, entity, answer),
                              ("sibling", sib_rel, entity, names.answer(RELATION_TYPE[sib_rel])),
                              ("decoy", decoy_rel, names.person(), answer),
                              ("practice", practice_rel, *practice)):  # fmt: skip
            text = _prose(rng, rng.choice(STATEMENTS[r]).format(E=e, A=a))
            if what == "decoy":
                text += "\n" + faq
            docs.append({"text": text, "kind": what, "name": f"{what}:{r}:{e}", "answer": a})
    docs += [{"text": d["text"], "kind": "docstring", "name": d["name"], "answer": ""} for d in docstrings]
    perm = rng.sample(range(len(docs)), len(docs))
    shuffled = [docs[j] for j in perm]
    where = {old: new for new, old in enumerate(perm)}
    by_type: dict[str, list[str]] = {k: [] for k in TYPES}
    for d in docs:
        if d["kind"] != "docstring":
            by_type[RELATION_TYPE[d["name"].split(":")[1]]].append(d["answer"])
    questions = []
    for doc, rel, entity, answer in pending:
        prompt = rng.choice(QUESTIONS[rel]).format(E=entity)
        candidates = sorted(set(by_type[RELATION_TYPE[rel]]))
        questions.append(FactQuestion(prompt, answer, where[doc], rel, entity, candidates))
    return FactWorld(shuffled, questions)
