"""The tiny world's text: a public corpus and four owners' domains, all offline and mostly real.

  code    Python's own standard-library sources (real code, ships with every Python)      reasoning
  chat    human conversations from the `chitchat-dataset` package (MIT)                     knowledge
  math    multi-step arithmetic with its working, generated here                            reasoning
  facts   trivia, history, science, literature Q&A from the `chatterbot-corpus` package    knowledge
  public  general English about computing: Python's own help pages (`pydoc_data`), the docstrings
          of stdlib modules that no domain uses, chatterbot-corpus's other topics, plus a small
          slice of each domain (a public model knows a bit of everything)

Every split is deterministic under the seed. Held-out text never appears in training, except for
`facts`, whose point is recall: its tasks ask the trained facts in another wording.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

from ..errors import FlexmoreError

TRAIN_MODULES = ["json.decoder", "json.encoder", "textwrap", "argparse", "collections", "string", "csv", "heapq",
                 "bisect", "calendar", "difflib", "fractions", "statistics", "pprint", "shlex", "fnmatch", "glob",
                 "configparser", "gettext", "ipaddress", "locale", "optparse", "queue", "sched", "tabnanny",
                 "tokenize", "uuid", "zipfile", "tarfile", "smtplib", "ftplib", "imaplib", "poplib", "mailbox",
                 "http.cookies", "http.client", "urllib.parse", "urllib.request", "email.message", "logging"]
HELDOUT_MODULES = ["base64", "quopri", "colorsys", "dataclasses", "enum", "functools", "operator", "numbers",
                   "copy", "weakref"]
FACT_TOPICS = ["trivia", "history", "science", "literature", "sports", "movies", "politics", "money", "food"]
PUBLIC_TOPICS = ["ai", "computers", "conversations", "emotion", "greetings", "gossip", "humor", "psychology",
                 "tech_support", "coding", "botprofile", "health"]


@dataclass
class Domain:
    name: str
    kind: str  # "knowledge" | "reasoning": the analysis contrasts the two
    source: str
    train: list[str]
    heldout: list[str]
    items: list[dict] = field(default_factory=list)  # material for multiple-choice tasks


def _functions(module_name: str) -> list[str]:
    """Top-level chunks (functions, classes) of a stdlib module's source."""
    try:
        source = inspect.getsource(import_module(module_name))
    except (ImportError, OSError, TypeError):
        return []
    chunks, current = [], []
    for line in source.splitlines():
        if (line.startswith("def ") or line.startswith("class ")) and current:
            chunks.append("\n".join(current).strip())
            current = []
        current.append(line)
    if current:
        chunks.append("\n".join(current).strip())
    return [c for c in chunks if 80 <= len(c) <= 4000]


def code_domain(rng: random.Random, limit: int) -> Domain:
    train = [c for m in TRAIN_MODULES for c in _functions(m)]
    heldout = [c for m in HELDOUT_MODULES for c in _functions(m)]
    rng.shuffle(train)
    rng.shuffle(heldout)
    if not train or not heldout:
        raise FlexmoreError("code domain: could not read the Python standard library's sources")
    items = []
    for chunk in heldout:
        lines = [x for x in chunk.splitlines() if x.strip()]
        if len(lines) >= 3:
            items.append({"prompt": "\n".join(lines[:2]), "answer": lines[2].strip()})
    return Domain("code", "reasoning", "Python standard library sources", train[:limit], heldout[: max(20, limit // 5)],
                  items)


def chat_domain(rng: random.Random, limit: int) -> Domain:
    try:
        import chitchat_dataset
    except ImportError as exc:
        raise FlexmoreError("the demo world needs chitchat-dataset: pip install 'flexmore[world]'") from exc
    data = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text())
    conversations = []
    for convo in data.values():
        turns = [" ".join(m["text"] for m in turn) for turn in convo["messages"]]
        if len(turns) >= 4:
            conversations.append(turns)
    rng.shuffle(conversations)
    docs = ["\n".join(f"{'A' if i % 2 == 0 else 'B'}: {t}" for i, t in enumerate(turns))[:1200]
            for turns in conversations]
    n_held = max(20, limit // 5)
    items = [{"prompt": f"A: {turns[0]}\nB:", "answer": turns[1]} for turns in conversations[:n_held]
             if 3 <= len(turns[1]) <= 80]
    return Domain("chat", "knowledge", "chitchat-dataset (human conversations, MIT)", docs[n_held : n_held + limit],
                  docs[:n_held], items)


OPS = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]


def arithmetic_problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    """A multi-step problem, its worked solution, and the answer."""
    value = rng.randint(2, 20)
    expression, working = str(value), []
    for _ in range(steps):
        symbol, op = rng.choice(OPS)
        operand = rng.randint(2, 9 if symbol == "*" else 20)
        new = op(value, operand)
        working.append(f"{value} {symbol} {operand} = {new}")
        expression = f"({expression} {symbol} {operand})"
        value = new
    return expression[1:-1], "\n".join(working), value


def math_domain(rng: random.Random, limit: int) -> Domain:
    def doc(r):
        expression, working, answer = arithmetic_problem(r, r.randint(2, 4))
        return f"Compute {expression}.\n{working}\nAnswer: {answer}", expression, answer

    # generated text is free: four times the others' documents, since each problem is short
    train = [doc(rng)[0] for _ in range(4 * limit)]
    held_rng = random.Random(rng.random())
    heldout, items = [], []
    for _ in range(max(20, limit // 5)):
        text, expression, answer = doc(held_rng)
        heldout.append(text)
        items.append({"prompt": f"Compute {expression}.", "answer": str(answer),
                      "distractors": [str(answer + d) for d in (1, -1, 10)]})
    return Domain("math", "reasoning", "multi-step arithmetic generated here", train, heldout, items)


def _chatterbot(topics: list[str]) -> list[tuple[str, str]]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as exc:
        raise FlexmoreError("the demo world needs chatterbot-corpus and PyYAML: pip install 'flexmore[world]'") from exc
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs = []
    for topic in topics:
        file = root / f"{topic}.yml"
        if not file.is_file():
            continue
        for convo in yaml.safe_load(file.read_text()).get("conversations", []):
            texts = [str(x).strip() for x in convo if isinstance(x, (str, int, float))]
            if len(texts) >= 2 and texts[0] and texts[1]:
                pairs.append((texts[0], texts[1]))
    return pairs


def facts_domain(rng: random.Random, limit: int) -> Domain:
    pairs = _chatterbot(FACT_TOPICS)
    rng.shuffle(pairs)
    wordings = ["Q: {q}\nA: {a}", "Question: {q}\nAnswer: {a}", "{q} The answer is {a}"]
    train = [w.format(q=q, a=a) for q, a in pairs for w in wordings[:2]]
    rng.shuffle(train)
    heldout = [wordings[2].format(q=q, a=a) for q, a in pairs]
    items = [{"prompt": q, "answer": a} for q, a in pairs if len(a) <= 60]
    return Domain("facts", "knowledge", "chatterbot-corpus trivia, history, science, ... (BSD)", train[: 2 * limit],
                  heldout, items)


# Modules whose docstrings feed the public corpus: none of them is a code-domain module (train or held out)
DOCSTRING_MODULES = ["os", "re", "math", "random", "itertools", "pathlib", "typing", "io", "time", "datetime",
                     "shutil", "subprocess", "socket", "threading", "asyncio", "sqlite3", "decimal", "hashlib",
                     "secrets", "struct", "codecs", "inspect", "ast", "dis", "pickle", "shelve", "html",
                     "unittest", "doctest", "pdb", "trace", "timeit", "traceback", "warnings", "contextlib", "abc",
                     "types", "concurrent.futures", "multiprocessing", "selectors", "signal", "platform",
                     "sysconfig", "tempfile", "filecmp", "fileinput", "plistlib", "wave", "turtle", "cmd", "code",
                     "graphlib", "zoneinfo", "lzma", "bz2", "gzip", "xml.dom.minidom", "xml.etree.ElementTree"]


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring and those of its top-level functions and classes (80 characters or more),
    read from its source file, so that nothing imported or patched at run time changes the corpus."""
    try:
        module = import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.cleandoc(module.__doc__ or "")]
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):  # a C module has no source: its own docstring only
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            docs.append(ast.get_docstring(node) or "")
    return [d for d in docs if len(d) >= 80]


def _help_pages() -> list[str]:
    """Python's interactive help pages (the language reference's prose), in documents of whole
    paragraphs of up to about 1,500 characters."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    docs = []
    for key in sorted(topics):
        paragraphs = [x.strip() for x in topics[key].split("\n\n") if x.strip()]
        chunk = ""
        for paragraph in paragraphs:
            if len(chunk) + len(paragraph) > 1500 and chunk:
                docs.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
        if chunk:
            docs.append(chunk)
    return docs


def public_corpus(domains: dict[str, Domain], rng: random.Random, share: float = 0.1) -> list[str]:
    """General text plus a small slice of every domain."""
    docs = [f"{q}\n{a}" for q, a in _chatterbot(PUBLIC_TOPICS)]
    docs += _help_pages()
    for module in DOCSTRING_MODULES:
        docs += _docstrings(module)
    for domain in domains.values():
        docs.extend(domain.train[: max(1, int(share * len(domain.train)))])
    rng.shuffle(docs)
    return docs


def build_world_text(seed: int = 0, docs_per_domain: int = 400) -> tuple[list[str], dict[str, Domain]]:
    rng = random.Random(seed)
    builders = [code_domain, chat_domain, math_domain, facts_domain]
    domains = {}
    for build in builders:
        domain = build(random.Random(rng.random()), docs_per_domain)
        domains[domain.name] = domain
    return public_corpus(domains, random.Random(rng.random())), domains


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path
