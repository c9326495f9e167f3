"""Find personal data in text and replace it with typed placeholders.

`scrub(text) -> (clean_text, counts)` replaces, in this order:

- `<EMAIL>`    addresses `local@domain.tld`;
- `<IBAN>`     IBANs, compact or in groups of four, checked with ISO 13616 mod-97 and the
               country's length;
- `<CN_ID>`    18-character mainland resident ID numbers (region, a real birth date,
               sequence, GB 11643 check character);
- `<CARD>`     payment card numbers, 12-19 digits compact or in groups of four (the last
               shorter) / 4-6-5 groups, with a card-network prefix and a valid Luhn check
               digit; 12 digits only for Maestro (prefixes 50, 56-69), the one network
               that issues them;
- `<CN_PHONE>` mainland mobile numbers 1[3-9]x xxxx xxxx, optional +86/0086 prefix;
- `<PHONE>`    other phone numbers: international `+CC ...` (8-15 digits), North American
               `(415) 555-0132` / `415-555-0132` / `415.555.0132` / `1-800-...`, Chinese
               landlines `010-12345678` / `(0755) 8888 8888`;
- `<IP>`       IPv4 (not after "version", "section", "§" and the like) and IPv6 addresses.

Validators keep false positives rare on numbers common in real text (dates, section and
version numbers, ICD-10 codes such as S72.001A, statute article numbers): numbers that
merely look like these types are left alone. Run it on NFKC-normalised text (full-width
digits and `＠` become ASCII). National phone formats without a `+` (other than the North
American and Chinese landline ones) are not detected: too ambiguous with other numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from datetime import date

import numpy as np

# Flags: ASCII so that \d, \w and \b mean ASCII only; CJK text around an item is a boundary.
_F = re.ASCII


def luhn_ok(digits: str) -> bool:
    """Luhn (mod 10) check of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to 10..35, mod 97."""
    s = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(c, 36)) for c in s)) % 97 == 1
    except ValueError:
        return False


_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"


def cn_id_ok(id18: str) -> bool:
    """GB 11643-1999: a real birth date and the mod-11 check character."""
    id18 = id18.upper()
    try:
        date(int(id18[6:10]), int(id18[10:12]), int(id18[12:14]))
    except ValueError:
        return False
    total = sum(int(c) * w for c, w in zip(id18[:17], _CN_ID_WEIGHTS, strict=True))
    return _CN_ID_CHECK[total % 11] == id18[17]


# Lengths of IBANs by country (ISO 13616 registry, the common ones).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}

# Each pattern starts with a plain character class and checks what precedes it with a
# lookbehind *after* that first character: CPython's regex engine then skips quickly to
# candidate characters, which makes these scans ~5x faster than a leading lookbehind.
_EMAIL = re.compile(
    r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])", _F)
_IBAN = re.compile(r"[A-Z](?<![\w][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,32}(?![\w])", _F)
_CN_ID = re.compile(
    r"[1-9](?<![\w.][1-9])\d{5} ?(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]) ?"
    r"\d{3}[\dXx](?![\w]|\.\d)", _F)
_CARD = re.compile(
    r"\d(?<![\w.-]\d)(?:\d{11,18}|\d{3}([ -])\d{4}\1\d{4}(?:\1\d{1,4}(?:\1\d{1,3})?)?"
    r"|\d{3}([ -])\d{6}\2\d{4,5})(?![\w-]|[.,]\d)", _F)
_CN_MOBILE = r"1[3-9]\d(?:[ -]?\d{4}){2}(?![\w-]|[.,]\d)"
_CN_PHONE = re.compile(r"1(?<![\w+.]1)" + _CN_MOBILE[1:], _F)
_CN_PHONE_PREFIXED = re.compile(
    r"[+08](?<![\w+.][+08])(?:(?<=\+)86|(?<=0)086|(?<=8)6)[ -]?" + _CN_MOBILE, _F)
_END = r"(?![\w-]|[.,]\d)"
_PHONE_INTL = re.compile(
    r"\+(?<![\w+]\+)[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){2,6}" + _END, _F)
_PHONE_NANP = re.compile(
    r"[1-9(](?<![\w+.-][1-9(])"
    # 1-800-555-0199, (415) 555-0132, 415-555-0132, 415.555.0132: one separator kind, not a
    # space (space-separated 3-3-4 digits are as often a list of numbers)
    r"(?:(?<=1)([.-])(?:\([2-9]\d\d\) ?[2-9]\d\d[ .-]|[2-9]\d\d\1[2-9]\d\d\1)"
    r"|(?<=1) \([2-9]\d\d\) ?[2-9]\d\d[ .-]"
    r"|(?<=\()[2-9]\d\d\) ?[2-9]\d\d[ .-]|(?<=[2-9])\d\d([.-])[2-9]\d\d\2)\d{4}" + _END, _F)
_PHONE_CN_LANDLINE = re.compile(
    r"[(0](?<![\w+.-][(0])(?:(?<=\()0\d{2,3}\) ?|(?<=0)\d{2,3}[ -])\d{3,4}[ -]?\d{4}" + _END, _F)
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)", _F)
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w.][0-9A-Fa-f:])(?<![0-9A-Fa-f]:[0-9A-Fa-f:])[0-9A-Fa-f]{0,3}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])", _F)
_NOT_IP_CONTEXT = re.compile(
    r"(?:[=<>~]=?|@|version|ver\.?|v|release|section|sec\.?|§|chapter|clause|article|art\.|rule|step|"
    r"table|figure|fig\.|item|paragraph|para\.?|no\.|isbn|oid)\s*$", re.IGNORECASE)

# Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Diners 30/36/38/39, JCB 35, Discover and
# UnionPay 6011/62/644-65, and Maestro 50 and 56-69 (which covers every 6x)
_CARD_PREFIX = re.compile(r"4|5[0-9]|2[2-7]|3[47]|3[0689]|6|35", _F)
_MAESTRO_PREFIX = re.compile(r"50|5[6-9]|6", _F)
_NON_DIGIT = re.compile(r"\D", _F)


def _card_len(m: re.Match[str]) -> int:
    digits = _NON_DIGIT.sub("", m.group(0))
    prefix = _CARD_PREFIX if len(digits) > 12 else _MAESTRO_PREFIX
    ok = 12 <= len(digits) <= 19 and prefix.match(digits) is not None and luhn_ok(digits)
    return len(m.group(0)) if ok else 0


def _iban_len(m: re.Match[str]) -> int:
    s = m.group(0)
    compact = s.replace(" ", "")
    want = IBAN_LENGTHS.get(compact[:2])
    lengths = [want] if want else range(min(len(compact), 34), 14, -1)
    for n in lengths:
        if n <= len(compact) and iban_ok(compact[:n]):
            # map n compact characters back to a span of `s` (spaces included)
            seen = 0
            for i, c in enumerate(s):
                seen += c != " "
                if seen == n:
                    return i + 1
    return 0


def _cn_id_len(m: re.Match[str]) -> int:
    return len(m.group(0)) if cn_id_ok(m.group(0).replace(" ", "")) else 0


def _phone_len(m: re.Match[str]) -> int:
    s = m.group(0)
    n = len(_NON_DIGIT.sub("", s))
    if s.startswith("+"):
        return len(s) if 8 <= n <= 15 else 0
    return len(s)


def _ipv4_len(m: re.Match[str]) -> int:
    try:
        ipaddress.IPv4Address(m.group(0))  # octets 0-255, no leading zeros
    except ValueError:
        return 0
    s = m.string
    before = s[max(0, m.start() - 16): m.start()]
    if _NOT_IP_CONTEXT.search(before):
        return 0
    line_start = s.rfind("\n", 0, m.start()) + 1
    if not s[line_start: m.start()].strip() and s[m.end(): m.end() + 1] in (".", ")"):
        return 0  # "2.1.1.1. As a result ..." at the start of a line: a section number
    return len(m.group(0))


def _ipv6_len(m: re.Match[str]) -> int:
    s = m.group(0)
    if sum(1 for g in s.split(":") if g) < 3:
        return 0
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return 0
    return len(s)


def _whole(m: re.Match[str]) -> int:
    return len(m.group(0))


RULES: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], int], str]] = [
    # (type, candidate pattern, length of the match that is PII (0: none), cheap precheck)
    ("IBAN", _IBAN, _iban_len, ""),
    ("CN_ID", _CN_ID, _cn_id_len, ""),
    ("CARD", _CARD, _card_len, ""),
    ("CN_PHONE", _CN_PHONE_PREFIXED, _whole, ""),
    ("CN_PHONE", _CN_PHONE, _whole, ""),
    ("PHONE", _PHONE_INTL, _phone_len, "+"),
    ("PHONE", _PHONE_NANP, _whole, ""),
    ("PHONE", _PHONE_CN_LANDLINE, _whole, ""),
    ("IP", _IPV4, _ipv4_len, "."),
    ("IP", _IPV6, _ipv6_len, ":"),  # e-mail addresses go first, in _sub_emails
]
TYPES = ("EMAIL", "IBAN", "CN_ID", "CARD", "CN_PHONE", "PHONE", "IP")
_HAS_DIGIT = re.compile(r"\d", _F)

# Windows. Each rule's candidates hold an anchor and lie within a few dozen characters of it:
# an IBAN starts with two capitals and two digits; an ID number, a card and every phone
# format but the international one hold four digits in a row; an international phone starts
# with '+'; an IPv4 address holds digit '.' digit; an IPv6 one two colons <= 5 apart. So on a
# long text each rule runs on windows around its anchors (reaching past them further than
# any candidate, its lookarounds and `_ipv4_len`'s look back at the line can reach) and finds
# what it finds on the whole text, without scanning the prose between them.
# (rule's pattern) -> (anchor, characters before it, characters after it)
_ANCHORS: dict[re.Pattern[str], tuple[str, int, int]] = {
    _IBAN: ("iban", 8, 80),
    _CN_ID: ("digits4", 32, 32),
    _CARD: ("digits4", 32, 32),
    _CN_PHONE_PREFIXED: ("digits4", 32, 32),
    _CN_PHONE: ("digits4", 32, 32),
    _PHONE_INTL: ("plus", 8, 64),
    _PHONE_NANP: ("digits4", 32, 32),
    _PHONE_CN_LANDLINE: ("digits4", 32, 32),
    _IPV4: ("ipv4", 48, 32),
    _IPV6: ("colon", 16, 16),
}
_GAP = 256  # anchors closer than this share a window (a window costs ~1 us per rule)
_LEAD = 4  # see _windows
_SMALL = 1024  # shorter texts are scanned whole (windows would save little)


def _codes(text: str) -> np.ndarray:
    """The code points of `text` (uint8 for ASCII text, else uint32)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _windows(text: str, where: np.ndarray, before: int, after: int,
             gap: int) -> list[tuple[int, int]]:
    """Disjoint [start, end) spans of `text` around positions `where` (sorted): positions
    closer than `gap` share a span, which reaches `before` / `after` beyond them. A span with
    only blanks before its first position starts at its line's start (so that `_ipv4_len`
    sees whether the number opens the line: an IPv4 candidate starts at most 2 characters
    before its anchor, and a non-blank in the window before that settles it)."""
    if where.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(where) >= gap)
    firsts = where[np.concatenate(([0], breaks + 1))].tolist()
    lasts = where[np.concatenate((breaks, [where.size - 1]))].tolist()
    spans: list[tuple[int, int]] = []
    for first, last in zip(firsts, lasts, strict=True):
        start = max(first - before, 0)
        if start and text[start:first - _LEAD].isspace():
            start = text.rfind("\n", 0, start) + 1
        end = min(last + after + 1, len(text))
        if spans and start <= spans[-1][1]:
            start = spans.pop()[0]  # reaches back into the previous span: one span
        spans.append((start, end))
    return spans


def _sub(pattern: re.Pattern[str], kind: str, pii_len: Callable[[re.Match[str]], int],
         text: str, counts: Counter[str]) -> str:
    placeholder = f"<{kind}>"

    def repl(m: re.Match[str]) -> str:
        n = pii_len(m)
        if n == 0:
            return m.group(0)
        counts[kind] += 1
        return placeholder + m.group(0)[n:]

    return pattern.sub(repl, text)


def _sub_emails(text: str, counts: Counter[str]) -> str:
    """Replace e-mail addresses, scanning only a window around each '@' (the full-text scan
    of the e-mail pattern is the slowest of all, and '@' is rare)."""
    pieces: list[str] = []
    done = 0
    at = text.find("@")
    while at >= 0:
        lo = max(done, at - 80)
        while lo > done and _LOCAL_CHAR.match(text, lo - 1):
            lo -= 1  # start the window at the beginning of the local part
        hi = min(len(text), at + 300)
        while hi < len(text) and _DOMAIN_CHAR.match(text, hi):
            hi += 1
        pieces.append(text[done:lo])
        pieces.append(_sub(_EMAIL, "EMAIL", _whole, text[lo:hi], counts))
        done = hi
        at = text.find("@", done)
    pieces.append(text[done:])
    return "".join(pieces)


_LOCAL_CHAR = re.compile(r"[\w.%+-]", _F)
_DOMAIN_CHAR = re.compile(r"[\w.-]", _F)


def _apply(rules: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], int], str]],
           text: str, counts: Counter[str]) -> str:
    for kind, pattern, pii_len, needs in rules:
        if needs and needs not in text:
            continue
        text = _sub(pattern, kind, pii_len, text, counts)
    return text


def _apply_in_windows(rules: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], int], str]],
                      text: str, spans: list[tuple[int, int]], counts: Counter[str]) -> str:
    """`_apply` to each span of `text`, the text between spans kept as it is."""
    pieces: list[str] = []
    done = 0
    for start, end in spans:
        pieces.append(text[done:start])
        pieces.append(_apply(rules, text[start:end], counts))
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def _anchor(name: str, codes: np.ndarray, memo: dict[str, np.ndarray]) -> np.ndarray:
    """Positions of the anchor `name` in a text's code points (memoised per text)."""
    if name not in memo:
        if "digit" not in memo:
            memo["digit"] = (codes >= 48) & (codes <= 57)
        d = memo["digit"]
        if name == "digits4":
            hit = d[:-3] & d[1:-2] & d[2:-1] & d[3:]
        elif name == "iban":
            up = (codes >= 65) & (codes <= 90)
            hit = up[:-3] & up[1:-2] & d[2:-1] & d[3:]
        elif name == "ipv4":
            hit = d[:-2] & (codes[1:-1] == 46) & d[2:]
        elif name == "plus":
            hit = codes == 43
        else:
            hit = codes == 58
        memo[name] = np.flatnonzero(hit)
    return memo[name]


def _scrub_long(text: str, counts: Counter[str]) -> str:
    """The rules in turn, each on the windows around its anchors."""
    codes: np.ndarray | None = None
    memo: dict[str, np.ndarray] = {}
    for rule in RULES:
        kind, pattern, _, needs = rule
        if needs and needs not in text:
            continue
        if codes is None:
            codes, memo = _codes(text), {}
        name, before, after = _ANCHORS[pattern]
        spans = _windows(text, _anchor(name, codes, memo), before, after,
                         max(_GAP, before + after + 1))
        found = counts.get(kind, 0)
        text = _apply_in_windows([rule], text, spans, counts)
        if counts.get(kind, 0) != found:
            codes = None  # placeholders moved the anchors
    return text


def scrub(text: str) -> tuple[str, Counter[str]]:
    """Replace personal data in `text` with `<TYPE>` placeholders; return (text, counts by type).

    The same as applying each rule of RULES in turn to the whole text (after e-mail
    addresses); long texts are scanned only in windows that can hold a match."""
    counts: Counter[str] = Counter()
    if "@" in text:
        text = _sub_emails(text, counts)
    if _HAS_DIGIT.search(text) is None:
        return text, counts
    if len(text) < _SMALL:
        return _scrub_short(text, counts), counts
    return _scrub_long(text, counts), counts


# An anchor in a regex, to ask a short text whether it holds one at all. Placeholders hold no
# digit, letter next to a digit, '+', '.' or ':', so a text that has none of an anchor keeps
# having none as the rules replace things.
_ANCHOR_SEARCH: dict[str, Callable[[str], object]] = {
    "digits4": re.compile(r"\d{4}", _F).search,
    "iban": re.compile(r"[A-Z]{2}\d{2}", _F).search,
    "ipv4": re.compile(r"\d\.\d", _F).search,
    "plus": re.compile(r"\+").search,
    "colon": re.compile(r":[0-9A-Fa-f]{0,4}:").search,
}


def _scrub_short(text: str, counts: Counter[str]) -> str:
    """The rules in turn over the whole (short) text, skipping those whose anchor it lacks."""
    present: dict[str, bool] = {}
    for rule in RULES:
        kind, pattern, pii_len, _ = rule
        name = _ANCHORS[pattern][0]
        if name not in present:
            present[name] = _ANCHOR_SEARCH[name](text) is not None
        if present[name]:
            text = _sub(pattern, kind, pii_len, text, counts)
    return text
