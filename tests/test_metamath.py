"""The Metamath parser on small hand-written databases; expected values are worked out by hand."""

import pytest

from data.metamath import decode_compressed, parse_database, premise_split
from data.readers import DataError

# demo0.mm of the Metamath book (chapter 2), with a scoping block, and th1 proved twice: normally and
# compressed. Mandatory hypotheses of th1 (|- t = t): tt only; listed labels tze=2 tpl=3 weq=4 a2=5
# wim=6 a1=7 mp=8; "ABC Z" saves `tt tze tpl` (the term t + 0) as step 9 = "I".
DEMO = """$( demo $) $c 0 + = -> ( ) term wff |- $.
$v t r s P Q $.
tt $f term t $.  tr $f term r $.  ts $f term s $.  wp $f wff P $.  wq $f wff Q $.
tze $a term 0 $.  tpl $a term ( t + r ) $.  weq $a wff t = r $.  wim $a wff ( P -> Q ) $.
a1 $a |- ( t = r -> ( t = s -> r = s ) ) $.
a2 $a |- ( t + 0 ) = t $.
${ min $e |- P $. maj $e |- ( P -> Q ) $.
   mp $a |- Q $. $}
th1 $p |- t = t $= tt tze tpl tt weq tt tt weq tt a2 tt tze tpl
   tt weq tt tze tpl tt weq tt tt weq wim tt a2
   tt tze tpl tt tt a1 mp mp $.
th2 $p |- t = t $= ( tze tpl weq a2 wim a1 mp ) ABCZADAADAEIADIADAADFAEIAAGHH $.
${ h1 $e |- t = r $.
   th3 $p |- r = t $= ( weq tt a1 tr ) ? $. $}
"""
HAND_DECODED = [1, 2, 3, 1, 4, 1, 1, 4, 1, 5, 9, 1, 4, 9, 1, 4, 1, 1, 4, 6, 1, 5, 9, 1, 1, 7, 8, 8]


def write(tmp_path, text, name="db.mm"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parse_demo(tmp_path):
    assertions = {a.label: a for a in parse_database(write(tmp_path, DEMO))}
    assert list(assertions) == ["tze", "tpl", "weq", "wim", "a1", "a2", "mp", "th1", "th2", "th3"]
    assert assertions["th1"].uses == ["tze", "tpl", "weq", "a2", "wim", "a1", "mp"]
    assert assertions["th2"].uses == assertions["th1"].uses  # the compressed proof cites the same
    assert assertions["mp"].text() == "|- Q $e |- P $e |- ( P -> Q )"
    assert assertions["th1"].hypotheses == []  # the block of mp has closed
    assert assertions["th3"].text() == "|- r = t $e |- t = r" and assertions["th3"].incomplete
    assert not assertions["th2"].incomplete


def test_decode_compressed_by_hand():
    assert decode_compressed("ABCZADAADAEIADIADAADFAEIAAGHH", 1, 7) == HAND_DECODED
    # U..Y are base-5 high digits before a base-20 final letter: UA = 1*20+1, YT = 5*20+20, UUA = (1*5+1)*20+1
    assert decode_compressed("UAYTUUA?", 121, 0) == [21, 120, 121, None]
    with pytest.raises(DataError, match="step 9 is beyond"):
        decode_compressed("ABCI", 1, 7)  # nothing saved yet
    for bad, why in (("AZZ", "saves no step"), ("Z", "saves no step"), ("AU", "inside a number"),
                     ("Aa", "not a compressed")):
        with pytest.raises(DataError, match=why):
            decode_compressed(bad, 1, 7)


def test_split_and_corpus(tmp_path):
    corpus, train, valid = premise_split(parse_database(write(tmp_path, DEMO)), valid_fraction=0.34)
    # premises: the |- assertions only (no syntax constructors, no hypotheses)
    assert list(corpus) == ["a1", "a2", "mp", "th1", "th2", "th3"]
    assert corpus["mp"] == ("mp : |- Q $e |- P $e |- ( P -> Q )", 6)
    # th1, th2, th3 have premises (th3's listed labels include a1); ceil(3 * 0.34) = 2 held out
    assert [r.label for r in train] == ["th1"] and [r.label for r in valid] == ["th2", "th3"]
    assert valid[0].premises == ["a2", "a1", "mp"] and valid[1].premises == ["a1"]
    assert all(corpus[p][1] < r.order for r in valid for p in r.premises)


@pytest.mark.parametrize("text, where", [
    ("$c |- $.\nx $a |- A $.\ny $p |- A $= x zz $.\n", ":3: token 'zz': the proof of 'y' references an unknown label"),
    ("$c |- $.\nx $a |- A $.\n  $}\n", ":3: token '$}'"),
    ("$c |- $.\nx y $a |- A $.\n", ":2: token 'y': label 'x' is followed by no"),
    ("$c |- $.\nx $q |- A $.\n", ":2: token '$q': unknown keyword"),
    ("$c |- $.\n${ x $a |- A $.\n", "1 unclosed block"),
    ("$c |- $.\nx $a |- A $.\n$( never closed\n", "inside a comment"),
    ("$c |- $.\nx $a |- A $.\ny $p |- A $= ( x ) AB $.\n", ":3: proof of 'y': letter 1 ('B'): step 2"),
    ("$c |- $.\nx $a |- A $.\nx $a |- B $.\n", ":3: token 'x': label declared twice"),
])
def test_bad_database_names_line_and_token(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        parse_database(path)
    assert str(path) in str(e.value) and where in str(e.value)


def test_empty_corpus(tmp_path):
    path = write(tmp_path, "$c wff $.\nx $a wff A $.\n")
    with pytest.raises(DataError, match="empty premise corpus"):
        premise_split(parse_database(path), source=str(path))
