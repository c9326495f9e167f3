"""PII scrubbing: recall >= 0.99 on >= 200 planted items of every type (EN and ZH contexts,
several formats), <= 1 false positive per MB on real text, validators against hand-checked
reference values (Wikipedia's Luhn and IBAN examples, GB 11643's sample ID)."""

from __future__ import annotations

import random
import re
import sysconfig
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.data.clean import normalize
from fedlm.data.pii import TYPES, cn_id_ok, iban_ok, luhn_ok, scrub

N_PER_TYPE = 240


def _luhn_complete(prefix_digits: str) -> str:
    for d in "0123456789":
        if luhn_ok(prefix_digits + d):
            return prefix_digits + d
    raise AssertionError


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15),
                                 ("37", 15), ("6011", 16), ("65", 16), ("62", 19), ("35", 16)])
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    n = _luhn_complete(body)
    style = rng.randrange(3)
    if style == 0 or length == 19 and style == 2:
        return n
    if length == 15:
        sep = rng.choice(" -")
        return f"{n[:4]}{sep}{n[4:10]}{sep}{n[10:]}"
    sep = rng.choice(" -")
    return sep.join(n[i: i + 4] for i in range(0, len(n), 4))


_IBAN_SPECS = {"DE": 22, "GB": 22, "FR": 27, "ES": 24, "NL": 18, "IT": 27, "CH": 21, "BE": 16}


def _iban(rng: random.Random) -> str:
    cc, length = rng.choice(sorted(_IBAN_SPECS.items()))
    if cc in ("GB", "NL"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        bban += "".join(rng.choice("0123456789") for _ in range(length - 8))
    else:
        bban = "".join(rng.choice("0123456789") for _ in range(length - 4))
    # check digits by the ISO 13616 reference algorithm, written out independently
    num = int("".join(str(int(c, 36)) for c in bban + cc + "00"))
    iban = f"{cc}{98 - num % 97:02d}{bban}"
    if rng.random() < 0.5:
        return " ".join(iban[i: i + 4] for i in range(0, len(iban), 4))
    return iban


def _cn_id(rng: random.Random) -> str:
    region = rng.choice(["110105", "310101", "440305", "510104", "330106"])
    birth = f"{rng.randint(1940, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body = region + birth + f"{rng.randint(0, 999):03d}"
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # GB 11643: W_i = 2^(i-1) mod 11
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, weights, strict=True)) % 11]
    return body + check


def _cn_phone(rng: random.Random) -> str:
    n = f"1{rng.choice('3456789')}{rng.randint(0, 9)}" + "".join(
        rng.choice("0123456789") for _ in range(8))
    style = rng.randrange(5)
    return [n, f"{n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}", f"+86 {n}",
            f"+86-{n[:3]}-{n[3:7]}-{n[7:]}"][style]


def _phone(rng: random.Random) -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    style = rng.randrange(9)
    return [f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"{a}.{b}.{c:04d}",
            f"+1 {a} {b} {c:04d}", f"1-800-{b}-{c:04d}", f"+44 20 7946 {c:04d}",
            f"+49 30 {rng.randint(1000000, 99999999)}", f"+33 1 23 45 {c // 100:02d} {c % 100:02d}",
            f"010-{rng.randint(20000000, 89999999)}"][style]


def _email(rng: random.Random) -> str:
    user = rng.choice(["zhang.san", "j.doe", "alice+tag", "wang_wei88", "m-smith", "li"])
    host = rng.choice(["example.com", "mail.example.org", "163.com", "qq.com", "uni-x.edu.cn"])
    return f"{user}{rng.randint(1, 999)}@{host}"


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    return rng.choice([":".join(groups), f"2001:db8::{groups[0]}:{groups[1]}",
                       f"fe80::{groups[2]}:{groups[3]}:{groups[4]}"])


GENERATORS = {"EMAIL": _email, "IBAN": _iban, "CN_ID": _cn_id, "CARD": _card,
              "CN_PHONE": _cn_phone, "PHONE": _phone, "IP": _ip}
EN = ["Please contact {} for details.", "My number is {}, call after 6pm.",
      "Payment from {} was declined.", "Server log: connection from {} refused",
      "Send it to {}.", "(see {})", "Account: {}\nThanks!"]
ZH = ["请联系{}获取详情。", "我的号码是{}，晚上六点后打。", "账户{}的付款被拒绝。",
      "服务器日志：来自{}的连接被拒绝", "身份证号：{}", "【{}】", "发送到{}即可"]


def _planted(seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    items = []
    for kind, gen in GENERATORS.items():
        for i in range(N_PER_TYPE):
            template = (EN if i % 2 else ZH)[rng.randrange(len(EN))]
            value = gen(rng)
            items.append((kind, value, template.format(value)))
    return items


def test_reference_validators() -> None:
    """Luhn, mod-97 and GB 11643 against published examples."""
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")  # Wikipedia's Luhn example
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82WEST12345698765433")
    assert cn_id_ok("11010519491231002X")  # the standard's sample
    assert not cn_id_ok("110105194912310021") and not cn_id_ok("110105194913310029")


def test_planted_recall_per_type() -> None:
    """>= 0.99 of planted items of every type are replaced by their own placeholder."""
    items = _planted(0)
    assert all(sum(k == t for k, _, _ in items) >= 200 for t in TYPES)
    hits: Counter[str] = Counter()
    for kind, value, sentence in items:
        out, counts = scrub(normalize(sentence))
        if f"<{kind}>" in out and value not in out and counts[kind] == 1:
            hits[kind] += 1
    for kind in TYPES:
        assert hits[kind] / N_PER_TYPE >= 0.99, (kind, hits[kind])


def _maestro(rng: random.Random, length: int) -> str:
    """A Maestro number (IIN ranges 50 and 56-69, 12-19 digits; ISO/IEC 7812 Luhn check digit)."""
    prefix = rng.choice(["50", *map(str, range(56, 70))]) + "".join(rng.choice("0123456789") for _ in range(2))
    n = _luhn_complete(prefix + "".join(rng.choice("0123456789") for _ in range(length - 5)))
    if rng.random() < 0.5:
        return n
    sep = rng.choice(" -")
    return sep.join(n[i: i + 4] for i in range(0, len(n), 4))


def test_maestro_cards_held_out_do_not_leak() -> None:
    """Planted Maestro cards (prefixes 50, 56-69, every length 12-19, compact or in groups of
    four), drawn from a seed no other test uses: none leaks; the same numbers with a wrong check
    digit are left alone (a validator, not a digit-run eraser). Before the fix 6 of 49 leaked."""
    rng = random.Random(20261202)
    leaked, kept = [], []
    for i in range(400):
        value = _maestro(rng, 12 + i % 8)
        sentence = (EN if i % 2 else ZH)[rng.randrange(len(EN))].format(value)
        out, counts = scrub(normalize(sentence))
        if counts["CARD"] != 1 or value in out:
            leaked.append(value)
        digits = re.sub(r"\D", "", value)
        wrong = value[:-1] + str((int(digits[-1]) + 1) % 10)
        if scrub(normalize(sentence.replace(value, wrong)))[1]["CARD"]:
            kept.append(wrong)
    assert not leaked, leaked[:5]
    assert not kept, kept[:5]


def test_placeholder_types_and_surroundings() -> None:
    out, counts = scrub("邮箱zhang@example.com，手机+86 138 1234 5678，卡号4111 1111 1111 1111。")
    assert out == "邮箱<EMAIL>，手机<CN_PHONE>，卡号<CARD>。"
    assert counts == Counter({"EMAIL": 1, "CN_PHONE": 1, "CARD": 1})


def test_lookalikes_are_kept() -> None:
    """Numbers that only look like PII: bad checksums, dates, versions, sections, ICD codes."""
    clean = [
        "Card 4111 1111 1111 1112 fails Luhn.", "IBAN DE89370400440532013001 fails mod 97.",
        "ID 110105194912310021 has a wrong check digit.", "S72.001A Fracture of right femur",
        "A00.0 Cholera due to Vibrio cholerae 01", "Released on 2024-01-15 at 10:30:00.",
        "See section 2.1.1.1 and version 3.11.7.", "Python version 3.11.4.1 was never released.",
        "pi is 3.14159265358979323846", "DFARS 252.227-7013 applies.", "Article 133 of the law",
        "The Fibonacci numbers 144 233 377 610 987 1597", "第一百三十三条 违反交通运输管理法规",
        "novas==3.1.1.3", "Order no. 12345678 shipped.", "ISBN 978-3-16-148410-0",
    ]
    for text in clean:
        out, counts = scrub(text)
        assert out == text and not counts, (text, out)


def _real_text() -> tuple[str, str]:
    """Real text on disk: licences shipped with Debian and with Python (no personal data in them
    beyond e-mail addresses; the repo's own docs hold deliberate example IPs, so they are not used)."""
    paths = sorted(Path("/usr/share/common-licenses").glob("*"))
    paths.append(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    texts = []
    for p in paths:
        if p.is_file() and p.stat().st_size < 2_000_000:
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    return "\n\n".join(texts), "common-licenses + Python's LICENSE.txt"


def _false_positives(text: str, kinds: tuple[str, ...]) -> tuple[int, float]:
    out, counts = scrub(normalize(text))
    return sum(counts[k] for k in kinds), len(text.encode("utf-8")) / 1e6


def test_false_positives_on_disk_text() -> None:
    """No detections other than e-mail addresses (which licences really contain) beyond 1/MB."""
    text, _ = _real_text()
    if len(text) < 50_000:
        pytest.skip("no real licence text on this machine")
    n, mb = _false_positives(text, tuple(t for t in TYPES if t != "EMAIL"))
    assert n <= max(1.0, mb), (n, mb)


@pytest.mark.slow
def test_false_positives_on_bundled_corpus(tmp_path: Path) -> None:
    """On the bundled corpus (12 MB): types with no genuine instance in it (cards, IBANs, IDs,
    Chinese mobiles) <= 1 per MB overall; phones and IPs <= 1 per MB in the silos that hold no
    real ones (the legal silo has genuine phone numbers in licence notices, the technical one
    genuine example IPs in the ipaddress docs: reviewed by hand)."""
    try:
        from fedlm.corpus import extract
    except ImportError:
        pytest.skip("fedlm.corpus not present yet (being built in parallel)")
    from fedlm.data.readers import FileReport, discover, read_documents

    folders = extract(tmp_path)
    none_genuine = ("IBAN", "CN_ID", "CARD", "CN_PHONE")
    n_all = mb_all = 0.0
    for silo, folder in folders.items():
        files, _ = discover([folder])
        text = "\n\n".join(d for f in files for d in read_documents(f, FileReport()))
        n, mb = _false_positives(text, none_genuine)
        n_all += n
        mb_all += mb
        if silo not in ("legal", "technical"):
            n2, _ = _false_positives(text, ("PHONE", "IP"))
            assert n2 <= max(1.0, mb), (silo, n2, mb)
    assert mb_all > 5 and n_all <= mb_all, (n_all, mb_all)


def test_scrub_speed_is_reported() -> None:
    """Scrubbing leaves ASCII text without digits or '@' untouched, and fast paths apply."""
    text = "plain words only " * 1000
    out, counts = scrub(text)
    assert out == text and not counts
    assert re.search(r"<[A-Z_]+>", out) is None


def _scrub_whole(text: str) -> tuple[str, Counter[str]]:
    """The definition `scrub` must equal: e-mail addresses, then each rule of RULES in turn
    over the whole text (no windows), digit-free text left alone."""
    from fedlm.data import pii

    counts: Counter[str] = Counter()
    if "@" in text:
        text = pii._sub_emails(text, counts)
    if re.search(r"[0-9]", text) is None:
        return text, counts
    for kind, pattern, pii_len, _ in pii.RULES:
        text = pii._sub(pattern, kind, pii_len, text, counts)
    return text, counts


_PIECES = ["2.1.1.1.", "  ", "\n", "\n   ", " ", "version ", "§ ", "fe80::1:2:3", "dead:beef::1",
           "a::b::", "1:2", "(", ")", "+", "-", ".", "GB82 WEST", "中文", "x" * 70, "Y" * 40,
           "A" * 300, " " * 400, "word " * 90, "192.168.0.", "10", "0086", "+86 ", "138 1234",
           "4111 1111 1111 1111", "(0755) 8888 8888", "1-800-555-0199"]


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_windowed_scrub_equals_whole_text_rules(data: st.DataObject) -> None:
    """Property: scanning only windows around digits (and colons, for IPv6) gives exactly the
    text and counts of running every rule over the whole text, planted items and lookalikes
    mixed with long digit-free stretches, blank runs and line starts."""
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    planted = [value for _, value, _ in _planted(rng.randrange(1000))[::37]]
    parts = data.draw(st.lists(st.sampled_from(_PIECES + planted[:40]), min_size=1, max_size=120))
    text = "".join(parts) + " filler" * data.draw(st.integers(0, 700))
    from fedlm.data import pii

    for t in (text, text[::-1]):
        assert scrub(t) == _scrub_whole(t)
        with mock.patch.object(pii, "_SMALL", 0):  # windows on short texts too
            assert scrub(t) == _scrub_whole(t)


@pytest.mark.parametrize("text", [
    "x" * 5000 + " DE89370400440532013000" + "Y" * 60 + " end",  # no IBAN: letters run on
    "x" * 5000 + " DE89370400440532013000 is an IBAN",
    "word " * 1000 + "\n" + " " * 100 + "2.1.1.1. As a result",  # a section number
    "word " * 1000 + "x" + " " * 100 + "10.1.1.1. is a host",  # an address mid-line
    "word " * 1000 + "version" + " " * 40 + "\n" + " " * 300 + "10.1.1.1. here",
    "word " * 1000 + "4111111111111111" + "A" * 80 + " 4111111111111111 ",
    "(" * 5000 + "415) 555-0132 and +44 20 7946 0958 " + "fe80::1:2:3 " * 3,
])
def test_windowed_scrub_edges(text: str) -> None:
    """Window edges: a match running on past its digits, a number opening a line after long
    blanks, lookbehinds at a window's start."""
    assert scrub(text) == _scrub_whole(text)
