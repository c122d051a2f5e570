"""De-identification: mask the identifiers that patterns can find, with typed placeholders.

`scrub(text)` returns the text with each identifier replaced by `[EMAIL]`, `[URL]`, `[IP]`,
`[SSN]`, `[MRN]`, `[ACCOUNT]`, `[PHONE]`, `[DATE]` or `[ZIP]`, and a count per type. What is masked:

- EMAIL   `name@example.org`
- URL     `https://...`, `www....`, and bare domains with a common top-level domain (`mychart.org`)
- IP      IPv4 `10.0.0.12`; IPv6 in full or `::`-compressed form
- SSN     `123-45-6789`, and any 9 digits labelled `SSN` / `social security number`
- MRN     a number labelled `MRN`, `MR#`, `medical record (number)`, `chart number`, `patient ID`,
          `hospital number`, `unit number` (the label stays: `MRN: [MRN]`)
- ACCOUNT a number labelled `account`, `acct`, `billing`, `member ID`, `policy`, `claim`, ...
- PHONE   North American `555-123-4567`, `(555) 123-4567`, `555.123.4567`, `+1 555 123 4567`
          (with `ext. 12`); `+<country>` numbers of 8-15 digits; any 7+ digit number labelled
          `phone`, `tel`, `fax`, `cell`, `mobile`, `pager`, `call`
- DATE    `01/02/2023`, `1/2/23`, `01-02-2023`, `01.02.2023`, `2023-01-02`, `2023/01/02`,
          `01/2023`, `Jan 2, 2023`, `January 2nd`, `2 January 2023`, `2nd of Jan`, `January 2023`
          (month names in Title or UPPER case; impossible month/day numbers are left alone)
- ZIP     `12345-6789`, and 5-digit codes after a state (`Boston, MA 02115`) or a `ZIP` label

Deliberately left alone, because clinical text is full of look-alikes: doses (`81 mg`,
`0.5 mg/kg`), vitals and ratios with two parts (`120/80`, `5/5`, `1:1000`), single numbers of any
length (`WBC 12000`, `CPT 99213`: a bare 5-digit number is not taken for a ZIP), ages, times
(`q6h`, `10:30`), codes (`E11.9`), years on their own (`in 2008`), month/day without a year in
numeric form (`1/15` could be a fraction), and a month name on its own.

Not found by patterns at all: names of people and places, street addresses, and most other free-
text identifiers. This scrubber reduces risk; it does not make text safe to publish by itself.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

KINDS = ("EMAIL", "URL", "IP", "SSN", "MRN", "ACCOUNT", "PHONE", "DATE", "ZIP")


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern
    group: int | str = 0  # the part replaced; a label around it stays
    check: Callable[[re.Match], bool] | None = None  # False: a look-alike, leave it


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def _min_digits(n: int, group: int | str = 1) -> Callable[[re.Match], bool]:
    return lambda m: _digits(m.group(group)) >= n


def _month_names() -> str:
    names = ["Jan(?:uary)?", "Feb(?:ruary)?", "Mar(?:ch)?", "Apr(?:il)?", "May", "June?",
             "July?", "Aug(?:ust)?", "Sep(?:t(?:ember)?)?", "Oct(?:ober)?", "Nov(?:ember)?",
             "Dec(?:ember)?"]
    # Title or UPPER case only: lower-case "may" and "march" are too often ordinary words.
    return "(?:" + "|".join(names + [n.upper() for n in names]) + r")\.?"


_MONTH = _month_names()
_DAY = r"(?:3[01]|[12]\d|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]|2[01])\d{2}"
_NOT_BEFORE = r"(?<![\w/.-])"  # not the tail of a longer number, path or code
_NOT_AFTER = r"(?!\w|[/.-]\d)"


def _plausible_day_month(a: str, b: str) -> bool:
    a, b = int(a), int(b)
    return 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12)


def _plausible_iso(m: re.Match) -> bool:
    return 1 <= int(m.group("m")) <= 12 and 1 <= int(m.group("d")) <= 31


_STATES = (
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ "
    "NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR"
).split()
_STATE_NAMES = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|"
    "Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|"
    "Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|"
    "New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|"
    "Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|"
    "West Virginia|Wisconsin|Wyoming|Puerto Rico"
)

_ID_VALUE = r"(?:[A-Za-z]{1,4}-?)?\d(?:[\d-]*\d)?"
_LABEL_TAIL = r"\.?(?:\s*(?:number|num|no\.?|#|id))?(?:\s+(?:is|of))?\s*[:#]?\s*"

# Order matters: a masked span becomes a placeholder with no digits, so later, looser rules
# cannot match inside it. Most specific first.
RULES: tuple[_Rule, ...] = (
    _Rule("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    _Rule("URL", re.compile(
        r"\b(?:https?://|ftp://|www\.)[^\s<>\"'()\[\]]*[^\s<>\"'()\[\].,;:!?]", re.I)),
    _Rule("URL", re.compile(
        r"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:com|org|net|edu|gov|mil|io|info|biz|health)\b"
        r"(?:/[^\s<>\"'()\[\]]*[^\s<>\"'()\[\].,;:!?])?", re.I)),
    _Rule("IP", re.compile(
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)")),
    _Rule("IP", re.compile(
        r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
        r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?"
        r"|::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}))(?![\w:])"),
        check=lambda m: _digits(m.group(0)) > 0),
    _Rule("SSN", re.compile(r"(?i)\b(?:SSN|SS#|social\s+security(?:\s+(?:number|no\.?|#))?)\s*[:#]?\s*"
                            r"(\d{3}[-\s]?\d{2}[-\s]?\d{4})\b"), group=1),
    _Rule("SSN", re.compile(_NOT_BEFORE + r"\d{3}-\d{2}-\d{4}" + _NOT_AFTER)),
    _Rule("MRN", re.compile(
        r"(?i)\b(?:MRN|MR\s?#|MR\s+no\.?|medical\s+record|med(?:ical)?\s+rec(?:ord)?|chart|"
        r"patient\s+id|pt\.?\s+id|hospital\s+(?:number|no\.?|#)|unit\s+(?:number|no\.?|#))"
        + _LABEL_TAIL + "(" + _ID_VALUE + r")\b"), group=1, check=_min_digits(4)),
    _Rule("ACCOUNT", re.compile(
        r"(?i)\b(?:acct|account|a/c|billing|member|subscriber|beneficiary|policy|claim|"
        r"insurance(?:\s+(?:member|policy))?|health\s+plan)"
        + _LABEL_TAIL + "(" + _ID_VALUE + r")\b"), group=1, check=_min_digits(4)),
    _Rule("PHONE", re.compile(
        r"(?<![\w+/.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"
        r"(?:\s*(?:x|ext\.?|extension)\s*\d{1,5})?(?![\w/]|[.-]\d)", re.I)),
    _Rule("PHONE", re.compile(r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?!\w|[.-]\d)"),
          check=lambda m: 8 <= _digits(m.group(0)) <= 15),
    _Rule("PHONE", re.compile(
        r"(?i)\b(?:phone|telephone|tel|fax|cell|mobile|pager|beeper|ph|call(?:\s+(?:me|us))?(?:\s+at)?)"
        r"\.?(?:\s*(?:number|no\.?|#))?\s*[:#]?\s*"
        r"(\+?(?:\(\d{2,4}\)|\d{2,4})(?:[\s.-]?\d{2,4}){1,4})(?![\w/]|[.-]\d)"),
        group=1, check=lambda m: 7 <= _digits(m.group(1)) <= 15),
    _Rule("DATE", re.compile(_NOT_BEFORE + r"(?P<y>" + _YEAR + r")(?P<s>[-/.])(?P<m>\d{1,2})(?P=s)(?P<d>\d{1,2})"
                             + _NOT_AFTER), check=_plausible_iso),
    _Rule("DATE", re.compile(_NOT_BEFORE + r"(\d{1,2})/(\d{1,2})/(?:" + _YEAR + r"|\d{2})" + _NOT_AFTER),
          check=lambda m: _plausible_day_month(m.group(1), m.group(2))),
    _Rule("DATE", re.compile(_NOT_BEFORE + r"(\d{1,2})([-.])(\d{1,2})\2" + _YEAR + _NOT_AFTER),
          check=lambda m: _plausible_day_month(m.group(1), m.group(3))),
    _Rule("DATE", re.compile(_NOT_BEFORE + r"(?:0?[1-9]|1[0-2])/(?:19|20)\d{2}" + _NOT_AFTER)),
    _Rule("DATE", re.compile(r"\b" + _MONTH + r"\s+" + _DAY + r"(?:,?\s+" + _YEAR + r")?(?!\w)")),
    _Rule("DATE", re.compile(r"\b" + _DAY + r"\s+(?:of\s+)?" + _MONTH + r"(?:,?\s+" + _YEAR + r")?(?!\w)")),
    _Rule("DATE", re.compile(r"\b" + _MONTH + r",?\s+" + _YEAR + r"(?!\w)")),
    _Rule("ZIP", re.compile(_NOT_BEFORE + r"\d{5}-\d{4}" + _NOT_AFTER)),
    _Rule("ZIP", re.compile(r"\b(?:" + "|".join(_STATES) + "|" + _STATE_NAMES + r"),?\s+(\d{5})(?!\w|[/.-]\d)"),
          group=1),
    _Rule("ZIP", re.compile(r"(?i)\b(?:zip|zip\s*code|zipcode|postal\s+code)\s*[:#]?\s*(\d{5})(?!\w|[/.-]\d)"),
          group=1),
)


class Scrubbed(NamedTuple):
    text: str
    counts: Counter  # placeholder kind -> how many were masked


def scrub(text: str) -> Scrubbed:
    """Mask the identifiers in `text`; see the module docstring for what is and is not found."""
    counts: Counter = Counter()
    for rule in RULES:
        def mask(m: re.Match, rule: _Rule = rule) -> str:
            if rule.check is not None and not rule.check(m):
                return m.group(0)
            counts[rule.kind] += 1
            start, end = m.start(rule.group) - m.start(), m.end(rule.group) - m.start()
            whole = m.group(0)
            return whole[:start] + f"[{rule.kind}]" + whole[end:]

        text = rule.pattern.sub(mask, text)
    return Scrubbed(text, counts)


def scrub_record(record: dict, fields: Iterable[str]) -> tuple[dict, Counter]:
    """A copy of `record` with the string values of `fields` scrubbed, and the counts."""
    out, counts = dict(record), Counter()
    for name in fields:
        if isinstance(out.get(name), str):
            out[name], found = scrub(out[name])
            counts += found
    return out, counts


def scrub_examples(examples: Iterable) -> tuple[list, Counter]:
    """Scrub the source and target of `data.records.Example`s (the raw record is left as is)."""
    out, counts = [], Counter()
    for ex in examples:
        source, found_source = scrub(ex.source)
        target, found_target = scrub(ex.target)
        counts += found_source + found_target
        out.append(dataclasses.replace(ex, source=source, target=target))
    return out, counts


def format_counts(counts: Counter) -> str:
    """`DATE 3, PHONE 1` in the fixed KINDS order, or `nothing found`."""
    found = [f"{kind} {counts[kind]}" for kind in KINDS if counts.get(kind)]
    return ", ".join(found) if found else "nothing found"
