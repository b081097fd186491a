"""Handwritten how-to questions over Python standard-library docstrings (the pretrained part of the
real-LLM suite).

Each question is answered by exactly one document, the docstring of the function or class its
completion names, and the completion is not a sentence of that document: "How can I find the
greatest common divisor of two integers?" -> " Use math.gcd." with ``math.gcd``'s docstring as the
source. Every entry has two wordings; the seed picks one, picks the questions (``n``) and draws the
other documents from the rest of the standard library.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import dataclass

from benchmarks.real_model import stdlib_docstrings

# (qualified name, two wordings of the question); the completion is " Use <name>."
HOWTO: list[tuple[str, tuple[str, str]]] = [
    ("math.gcd", ("How can I find the greatest common divisor of two integers?",
                  "What gives me the largest whole number that divides two integers evenly?")),
    ("math.isqrt", ("How do I get the whole-number part of a square root without floats?",
                    "How can I compute floor(sqrt(n)) exactly for a huge integer?")),
    ("math.comb", ("How can I count the ways to pick k things out of n when order does not matter?",
                   "How do I compute a binomial coefficient such as 52 choose 5?")),
    ("math.isclose", ("How do I check whether two floats are approximately equal?",
                      "How can I compare two floating point results with a tolerance?")),
    ("math.hypot", ("How do I compute the length of the vector (3, 4)?",
                    "How can I get the Euclidean norm of a point's coordinates?")),
    ("math.factorial", ("How can I multiply together all positive integers up to n?",
                        "How do I compute n! for an integer n?")),
    ("os.path.splitext", ("How do I separate a file name from its extension?",
                          "How can I get the '.txt' part of 'notes.txt' as its own string?")),
    ("os.path.expanduser", ("How do I turn '~/data' into a path under my home folder?",
                            "How can I resolve a leading tilde in a path?")),
    ("os.makedirs", ("How do I create a folder and any missing parent folders in one call?",
                     "How can I make a nested directory path like a/b/c at once?")),
    ("os.walk", ("How can I visit every subfolder and file below a directory?",
                 "How do I iterate recursively over a directory tree?")),
    ("shutil.rmtree", ("How can I delete a folder together with everything inside it?",
                       "How do I remove a non-empty directory?")),
    ("shutil.which", ("How do I find where an executable such as git is installed on the PATH?",
                      "How can I locate the full path of a command-line program?")),
    ("shutil.copytree", ("How do I copy a whole folder, including its subfolders?",
                         "How can I duplicate a directory recursively to a new location?")),
    ("textwrap.dedent", ("How can I strip the indentation that all lines of a text share?",
                         "How do I remove common leading spaces from a triple-quoted string?")),
    ("json.dumps", ("How do I turn a Python dictionary into a JSON string?",
                    "How can I serialise a list of dicts to JSON text in memory?")),
    ("json.loads", ("How do I parse a JSON string into Python objects?",
                    "How can I read JSON text that I already have in a str variable?")),
    ("random.shuffle", ("How do I put the items of a list in random order, in place?",
                        "How can I randomly permute a deck of cards stored as a list?")),
    ("random.choice", ("How can I pick one element of a list at random?",
                       "How do I select a random item from a sequence?")),
    ("itertools.chain", ("How do I loop over several lists one after another as if they were one?",
                         "How can I concatenate iterables lazily without building a new list?")),
    ("itertools.groupby", ("How can I group consecutive items that share the same key?",
                           "How do I split a sorted sequence into runs of equal keys?")),
    ("itertools.permutations", ("How do I generate every possible ordering of the elements of a list?",
                                "How can I enumerate all arrangements of r items taken from a sequence?")),
    ("functools.lru_cache", ("How can I memoize a function so repeated calls with the same arguments are fast?",
                             "How do I cache the results of an expensive pure function?")),
    ("collections.Counter", ("How can I count how many times each item occurs in a list?",
                             "How do I build a tally of word frequencies?")),
    ("collections.namedtuple", ("How do I create a lightweight tuple class whose fields have names?",
                                "How can I define a record type with attribute access but tuple behaviour?")),
    ("heapq.nlargest", ("How can I get the n biggest items from a large iterable without sorting all of it?",
                        "How do I find the top 10 scores in a long list efficiently?")),
    ("bisect.insort_right", ("How do I insert an item into a sorted list and keep it sorted?",
                             "How can I add a value to an ordered list at the right position?")),
    ("glob.glob", ("How do I list all files whose names match a wildcard like *.txt?",
                   "How can I collect the paths in a folder that match a shell-style pattern?")),
    ("fnmatch.fnmatch", ("How can I test whether one file name matches a shell pattern such as *.py?",
                         "How do I check a single name against a Unix wildcard pattern?")),
    ("tempfile.mkdtemp", ("How do I create a fresh scratch directory that no other process uses?",
                          "How can I securely make a new temporary folder?")),
    ("time.sleep", ("How can I pause my program for a few seconds?",
                    "How do I make a script wait before continuing?")),
    ("time.perf_counter", ("Which clock should I use to time a short piece of code precisely?",
                           "How do I measure elapsed time with the highest available resolution?")),
    ("calendar.isleap", ("How can I check whether a given year has 366 days?",
                         "How do I tell if February of a year has 29 days?")),
    ("string.capwords", ("How do I capitalise the first letter of every word in a sentence?",
                         "How can I turn 'hello big world' into 'Hello Big World'?")),
    ("statistics.median", ("How do I find the middle value of a list of numbers?",
                           "How can I compute a central value that is robust to outliers?")),
    ("statistics.stdev", ("How do I measure how spread out a sample of numbers is?",
                          "How can I compute the sample standard deviation of my data?")),
    ("shlex.split", ("How do I split a command line into arguments the way a POSIX shell would?",
                     "How can I break a quoted shell command string into a list of words?")),
    ("difflib.get_close_matches", ("How can I suggest the words in a list most similar to a misspelled word?",
                                   "How do I find fuzzy matches for a string among candidates?")),
    ("operator.itemgetter", ("How can I build a function that fetches a given key from its argument, e.g. for sorting?",
                             "What should I pass as key= to sort tuples by their second element?")),
    ("copy.deepcopy", ("How do I duplicate a nested object so that changing the copy never affects the original?",
                       "How can I clone a dict of lists completely?")),
    ("pprint.pformat", ("How can I get a nicely indented string representation of a nested dict?",
                        "How do I format a big data structure readably as a string?")),
    ("secrets.token_hex", ("How do I generate a random hexadecimal string for a password-reset token?",
                           "How can I create an unguessable hex token for a session?")),
    ("re.escape", ("How can I make a string safe to use literally inside a regular expression?",
                   "How do I quote special characters like '.' and '*' before building a regex?")),
    ("platform.system", ("How can my program tell which operating system it is running on?",
                         "How do I find out whether the code runs on Linux, Windows or macOS?")),
    ("getpass.getpass", ("How do I ask the user for a password without showing it on screen?",
                         "How can I read a secret from the terminal with echo turned off?")),
    ("webbrowser.open", ("How can I open a web page in the user's default browser?",
                         "How do I launch a URL in a browser from a Python script?")),
    ("zlib.compress", ("How can I make a bytes object smaller with DEFLATE compression?",
                       "How do I compress raw binary data in memory?")),
]  # fmt: skip


@dataclass
class HowTo:
    prompt: str
    completion: str
    source: int  # document index
    name: str


def docstring_of(name: str) -> str | None:
    """``"<name>: <docstring>"`` (whitespace collapsed) of a qualified standard-library name."""
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    doc = " ".join((inspect.getdoc(obj) or "").split())
    return f"{name}: {doc}" if len(doc) >= 20 else None


def build_howto(seed: int, n_questions: int, n_docs: int) -> tuple[list[dict[str, str]], list[HowTo]]:
    """``n_docs`` documents (the questions' sources among other docstrings, shuffled) and
    ``n_questions`` questions, all drawn from ``seed``."""
    rng = random.Random(f"real-llm-howto-{seed}")
    available = [(name, wordings, text) for name, wordings in HOWTO if (text := docstring_of(name))]
    if n_questions > len(available):
        raise SystemExit(f"only {len(available)} how-to questions have a docstring in this Python")
    picked = rng.sample(available, n_questions)
    sources = {text for _, _, text in picked}
    # other documents: no function of the same name as any answer (posixpath.splitext and ntpath's
    # would answer "os.path.splitext" questions too), and no docstring equal to a source's
    answered = {name.rpartition(".")[2] for name, _ in HOWTO}
    bodies = {_body(t) for t in sources}
    others = [{"name": d["name"], "text": d["text"]} for d in stdlib_docstrings(10**6, seed)
              if d["name"].rpartition(".")[2] not in answered and _body(d["text"]) not in bodies]  # fmt: skip
    if len(others) < n_docs - n_questions:
        raise SystemExit(f"only {len(others)} other docstrings for {n_docs} documents")
    docs = [{"name": name, "text": text} for name, _, text in picked] + others[: n_docs - n_questions]
    perm = rng.sample(range(len(docs)), len(docs))
    shuffled = [docs[j] for j in perm]
    where = {old: new for new, old in enumerate(perm)}
    questions = [
        HowTo(f"Question: {rng.choice(wordings)}\nAnswer:", f" Use {name}.", where[i], name)
        for i, (name, wordings, _) in enumerate(picked)
    ]
    return shuffled, questions


def _body(text: str) -> str:
    """A docstring without its ``name:`` head (aliases share the body)."""
    return re.sub(r"^[\w.]+: ", "", text)
