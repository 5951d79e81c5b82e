"""Metamath databases (.mm) -> premise-selection data: which earlier statements each theorem's proof uses.

    library = parse_database("set.mm")          # every $a/$p assertion, in library order
    corpus, train, valid = premise_split(library, valid_fraction=0.05)

Parsed: comments `$( $)`, scoping blocks `${ $}`, `$c $v $d` (skipped), hypotheses `$f` and `$e`,
axioms `$a`, theorems `$p` with normal or compressed proofs. File inclusion `$[ $]` is refused.

A *premise* is an assertion ($a or $p) whose typecode is `|-` (an axiom or theorem; syntax constructors
such as `wi $a wff ( ph -> ps ) $.` are not premises), and hypotheses ($e/$f) never are. A theorem's
premises are the premise labels its proof references (normal proofs: in order of first use; compressed
ones: in the order of their label list). Statements are rendered as
text, the conclusion then its hypotheses: `|- ps $e |- ph $e |- ( ph -> ps )`.

Compressed proofs (Metamath book, appendix B): `( L1 .. Ln ) LETTERS`. The letters spell numbers: U..Y
are the high digits (1..5, base 5), A..T end a number (1..20, base 20): N = ((h1 * 5 + h2) ...) * 20 + a;
Z saves the step just made. N in 1..m names the theorem's m mandatory hypotheses (its $f for the
variables of its statement and hypotheses, and every $e in scope, in file order), m+1..m+n the labels
Li, larger N the saved steps. `?` is an unknown step (an incomplete proof).

Split: the theorems with premises, in library order; the last `valid_fraction` are held out. A proof
can only cite statements before it, so every held-out theorem's premises are earlier: evaluation ranks
the corpus entries before the theorem (`order` < its own).

Bad input raises DataError naming the file, line and token.

CLI:  python -m data.metamath set.mm OUT_DIR   (writes corpus.jsonl, train.jsonl, valid.jsonl)
"""

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .readers import DataError

PREMISE_TYPECODE = "|-"


@dataclass
class Assertion:
    label: str
    kind: str  # "a" (axiom / syntax) | "p" (theorem)
    typecode: str
    symbols: list[str]  # the statement after its typecode
    hypotheses: list[list[str]]  # the $e statements in scope (typecode first), in file order
    line: int
    order: int  # position among the file's assertions
    uses: list[str] = field(default_factory=list)  # $p: assertion labels the proof references, each once
    incomplete: bool = False  # the proof has unknown steps (`?`)

    @property
    def is_premise(self) -> bool:
        return self.typecode == PREMISE_TYPECODE

    def text(self) -> str:
        """The conclusion first (a truncated encoding keeps it), then each hypothesis after `$e`."""
        return " $e ".join(" ".join(s) for s in ([self.typecode, *self.symbols], *self.hypotheses))


def _tokens(path: Path):
    """(token, line) pairs, comments removed."""
    in_comment = False
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            for token in line.split():
                if in_comment:
                    if token == "$)":
                        in_comment = False
                    elif token == "$(":
                        raise DataError(f"{path}:{number}: nested comment '$(' inside a comment")
                    continue
                if token == "$(":
                    in_comment = True
                    continue
                yield token, number
    if in_comment:
        raise DataError(f"{path}: end of file inside a comment '$(' (never closed by '$)')")


_LABEL = re.compile(r"[A-Za-z0-9._-]+")


class _Parser:
    def __init__(self, path: Path):
        self.path = path
        self.scopes: list[list[tuple[str, str, list[str]]]] = [[]]  # (label, "f"|"e", statement) per block
        self.hypotheses: dict[str, int] = {}  # active hypothesis labels -> scope depth
        self.assertions: dict[str, Assertion] = {}
        self.labels: set[str] = set()  # every label ever declared (labels are unique over the file)

    def fail(self, line: int, token: str, why: str):
        raise DataError(f"{self.path}:{line}: token {token!r}: {why}")

    def parse(self) -> list[Assertion]:
        tokens = _tokens(self.path)
        label = None
        for token, line in tokens:
            if token == "${":
                self.scopes.append([])
            elif token == "$}":
                if len(self.scopes) == 1:
                    self.fail(line, token, "'$}' closes no open block '${'")
                for name, _, _ in self.scopes.pop():
                    del self.hypotheses[name]
            elif token in ("$c", "$v", "$d"):
                self._until_end(tokens, token, line)
            elif token == "$[":
                self.fail(line, token, "file inclusion is not supported: give one self-contained database")
            elif token in ("$f", "$e", "$a", "$p"):
                if label is None:
                    self.fail(line, token, "a statement needs a label before it")
                self._statement(label, token[1], tokens, line)
                label = None
                continue
            elif token.startswith("$"):
                self.fail(line, token, "unknown keyword")
            else:
                if label is not None:
                    self.fail(line, token, f"label {label!r} is followed by no $f/$e/$a/$p keyword")
                if not _LABEL.fullmatch(token):
                    self.fail(line, token, "not a valid label (letters, digits, '.', '-', '_')")
                label = token
                label_line = line
                continue
            if label is not None:
                self.fail(line, token, f"label {label!r} is followed by no $f/$e/$a/$p keyword")
        if label is not None:
            self.fail(label_line, label, "label at end of file without a statement")
        if len(self.scopes) > 1:
            raise DataError(f"{self.path}: end of file inside {len(self.scopes) - 1} unclosed block(s) '${{'")
        return list(self.assertions.values())

    def _until_end(self, tokens, keyword: str, line: int, stop=("$.",)) -> tuple[list[str], str]:
        body = []
        for token, _ in tokens:
            if token in stop:
                return body, token
            if token.startswith("$"):
                self.fail(line, token, f"inside the {keyword} statement that starts on this line")
            body.append(token)
        raise DataError(f"{self.path}:{line}: {keyword} statement never ended with '$.'")

    def _statement(self, label: str, kind: str, tokens, line: int):
        if label in self.labels:
            self.fail(line, label, "label declared twice")
        self.labels.add(label)
        body, end = self._until_end(tokens, f"${kind}", line, ("$.", "$=") if kind == "p" else ("$.",))
        if not body:
            self.fail(line, f"${kind}", "empty statement (no typecode)")
        if kind in "fe":
            if kind == "f" and len(body) != 2:
                self.fail(line, "$f", f"a $f statement is a typecode and one variable, got {body}")
            self.scopes[-1].append((label, kind, body))
            self.hypotheses[label] = len(self.scopes)
            return
        if kind == "p" and end != "$=":
            self.fail(line, "$p", "a $p statement needs a proof after '$='")
        active = [h for scope in self.scopes for h in scope]
        assertion = Assertion(label, kind, body[0], body[1:], [stmt for _, k, stmt in active if k == "e"],
                              line, len(self.assertions))
        if kind == "p":
            proof, _ = self._until_end(tokens, "$p proof", line)
            self._proof(assertion, proof, active, line)
        self.assertions[label] = assertion

    def _mandatory(self, assertion: Assertion, active) -> list[str]:
        variables = set(assertion.symbols)
        for _, kind, stmt in active:
            if kind == "e":
                variables.update(stmt[1:])
        return [name for name, kind, stmt in active if kind == "e" or stmt[1] in variables]

    def _reference(self, assertion: Assertion, name: str, line: int):
        if name in self.hypotheses:
            return
        if name not in self.assertions:
            self.fail(line, name, f"the proof of {assertion.label!r} references an unknown label")
        if name not in assertion.uses:
            assertion.uses.append(name)

    def _proof(self, assertion: Assertion, proof: list[str], active, line: int):
        if not proof:
            self.fail(line, "$=", f"the proof of {assertion.label!r} is empty")
        if proof[0] != "(":
            for name in proof:
                if name == "?":
                    assertion.incomplete = True
                else:
                    self._reference(assertion, name, line)
            return
        if ")" not in proof:
            self.fail(line, "(", f"the compressed proof of {assertion.label!r} has no ')'")
        close = proof.index(")")
        labels = proof[1:close]
        for name in labels:
            self._reference(assertion, name, line)
        steps = decode_compressed("".join(proof[close + 1:]), len(self._mandatory(assertion, active)), len(labels),
                                  where=f"{self.path}:{line}: proof of {assertion.label!r}")
        if None in steps:
            assertion.incomplete = True


def decode_compressed(letters: str, mandatory: int, listed: int, where: str = "") -> list:
    """The step numbers spelled by a compressed proof's letters (1-based, as in the Metamath book),
    None for '?'. Refuses a letter outside A-Z?, a number beyond the hypotheses, the listed labels and
    the steps saved so far, a 'Z' that saves nothing, and letters ending inside a number."""
    steps, saved, number, pending, savable = [], 0, 0, False, False
    for i, ch in enumerate(letters):
        if "U" <= ch <= "Y":
            number, pending = number * 5 + ord(ch) - ord("U") + 1, True
        elif "A" <= ch <= "T":
            number = number * 20 + ord(ch) - ord("A") + 1
            if number > mandatory + listed + saved:
                raise DataError(f"{where}: letter {i} ({ch!r}): step {number} is beyond the {mandatory} "
                                f"hypotheses, {listed} labels and {saved} saved steps")
            steps.append(number)
            number, pending, savable = 0, False, True
        elif ch == "Z":
            if pending or not savable:
                raise DataError(f"{where}: letter {i} ('Z'): saves no step")
            saved, savable = saved + 1, False
        elif ch == "?":
            steps.append(None)
            savable = True
        else:
            raise DataError(f"{where}: letter {i} ({ch!r}) is not a compressed-proof letter (A-Z or ?)")
    if pending:
        raise DataError(f"{where}: the letters end inside a number")
    return steps


def find_database(database: str, cache_dir: str, name: str = "set.mm") -> Path:
    """The .mm file to parse: `database` itself, or `name` from a metamath-databases .deb, or (database
    "apt") from the package that `apt-get download` fetches into cache_dir (once: later calls reuse it)."""
    import subprocess

    if database.endswith(".mm"):
        return Path(database)
    cache = Path(cache_dir).expanduser()
    extracted = cache / "usr/share/metamath/databases" / name
    if extracted.is_file():
        return extracted
    cache.mkdir(parents=True, exist_ok=True)
    if database == "apt":
        fetched = subprocess.run(["apt-get", "download", "metamath-databases"], cwd=cache,
                                 capture_output=True, text=True, check=False)
        debs = sorted(cache.glob("metamath-databases_*.deb"))
        if not debs:
            raise DataError(f"apt-get download metamath-databases in {cache} failed: {fetched.stderr.strip()}")
        database = str(debs[-1])
    if not database.endswith(".deb") or not Path(database).is_file():
        raise DataError(f"database {database!r}: expected a .mm file, a metamath-databases .deb or 'apt'")
    subprocess.run(["dpkg-deb", "-x", database, str(cache)], check=True)
    if not extracted.is_file():
        raise DataError(f"{database}: holds no usr/share/metamath/databases/{name}")
    return extracted


def parse_database(path) -> list[Assertion]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such Metamath database")
    try:
        return _Parser(path).parse()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a line: {e.reason})") from None


@dataclass
class Record:
    """One theorem: its statement with its hypotheses, and the premises its proof uses."""
    label: str
    text: str
    order: int
    premises: list[str]


def premise_split(assertions: list[Assertion], valid_fraction: float = 0.05, source: str = "database"):
    """(corpus {label: (text, order)}, train records, held-out records), in library order.
    Theorems whose proofs use no premise are left out (premise_counts says how many)."""
    corpus = {a.label: (f"{a.label} : {a.text()}", a.order) for a in assertions if a.is_premise}
    if not corpus:
        raise DataError(f"{source}: empty premise corpus (no assertion with typecode '{PREMISE_TYPECODE}')")
    records = []
    for a in assertions:
        premises = [u for u in a.uses if u in corpus]
        if a.kind == "p" and a.is_premise and premises:
            records.append(Record(a.label, a.text(), a.order, premises))
    if not records:
        raise DataError(f"{source}: no theorem whose proof uses a premise")
    held_out = math.ceil(len(records) * valid_fraction) if valid_fraction > 0 else 0
    return corpus, records[:len(records) - held_out], records[len(records) - held_out:]


def premise_counts(assertions: list[Assertion], train, valid, corpus) -> dict:
    theorems = [a for a in assertions if a.kind == "p" and a.is_premise]
    pairs = sum(len(r.premises) for r in train)
    return {"assertions": len(assertions), "corpus": len(corpus), "theorems": len(theorems),
            "without_premises": len(theorems) - len(train) - len(valid),
            "incomplete_proofs": sum(a.incomplete for a in theorems),
            "train": len(train), "valid": len(valid), "train_pairs": pairs,
            "valid_pairs": sum(len(r.premises) for r in valid)}


def write_split(out_dir, corpus, train, valid) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"label": label, "text": text, "order": order}) + "\n" for label, (text, order) in corpus.items())
    for name, records in (("train", train), ("valid", valid)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r.__dict__) + "\n" for r in records)


def _jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_split(out_dir):
    """(corpus labels, corpus texts, corpus orders, train records, valid records) as written."""
    out = Path(out_dir)
    rows = _jsonl(out / "corpus.jsonl")
    if not rows:
        raise DataError(f"{out / 'corpus.jsonl'}: empty premise corpus")
    train, valid = ([Record(**r) for r in _jsonl(out / f"{name}.jsonl")] for name in ("train", "valid"))
    return [r["label"] for r in rows], [r["text"] for r in rows], [r["order"] for r in rows], train, valid


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data.metamath DATABASE.mm OUT_DIR")
    try:
        assertions = parse_database(sys.argv[1])
        corpus, train, valid = premise_split(assertions, source=sys.argv[1])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_split(sys.argv[2], corpus, train, valid)
    print(json.dumps(premise_counts(assertions, train, valid, corpus)))
