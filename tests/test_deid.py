from collections import Counter

import pytest

from data.deid import KINDS, format_counts, scrub, scrub_examples, scrub_record
from data.records import Example

MASKED = [
    # (text, expected text, kind)
    ("Write to jo.doe+x@mail.example.org today", "Write to [EMAIL] today", "EMAIL"),
    ("See https://example.com/a?b=1.", "See [URL].", "URL"),
    ("Portal www.mychart.org/login now", "Portal [URL] now", "URL"),
    ("visit mychart.org today", "visit [URL] today", "URL"),
    ("from 192.168.1.10 again", "from [IP] again", "IP"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 seen", "v6 [IP] seen", "IP"),
    ("v6 fe80::1ff:fe23:4567:890a seen", "v6 [IP] seen", "IP"),
    ("SSN 123-45-6789", "SSN [SSN]", "SSN"),
    ("SSN: 123456789", "SSN: [SSN]", "SSN"),
    ("social security number 123 45 6789", "social security number [SSN]", "SSN"),
    ("id 123-45-6789 on file", "id [SSN] on file", "SSN"),
    ("MRN: 1234567", "MRN: [MRN]", "MRN"),
    ("MRN 00123456.", "MRN [MRN].", "MRN"),
    ("Medical record number: A-123456", "Medical record number: [MRN]", "MRN"),
    ("MR# 998877", "MR# [MRN]", "MRN"),
    ("patient ID 55667788", "patient ID [MRN]", "MRN"),
    ("Acct # 99887766", "Acct # [ACCOUNT]", "ACCOUNT"),
    ("account number: 12345678", "account number: [ACCOUNT]", "ACCOUNT"),
    ("Member ID: XYZ123456", "Member ID: [ACCOUNT]", "ACCOUNT"),
    ("policy no. 55512345", "policy no. [ACCOUNT]", "ACCOUNT"),
    ("call 555-123-4567 today", "call [PHONE] today", "PHONE"),
    ("(555) 123-4567", "[PHONE]", "PHONE"),
    ("+1 555 123 4567", "[PHONE]", "PHONE"),
    ("555.123.4567", "[PHONE]", "PHONE"),
    ("1-800-555-1234", "[PHONE]", "PHONE"),
    ("555-123-4567 ext. 89", "[PHONE]", "PHONE"),
    ("+44 20 7946 0958", "[PHONE]", "PHONE"),
    ("Fax: 555-1234", "Fax: [PHONE]", "PHONE"),
    ("tel 020 7946 0958", "tel [PHONE]", "PHONE"),
    ("01/02/2023", "[DATE]", "DATE"),
    ("1/2/23", "[DATE]", "DATE"),
    ("2023-01-02", "[DATE]", "DATE"),
    ("2023/01/02", "[DATE]", "DATE"),
    ("01-02-2023", "[DATE]", "DATE"),
    ("01.02.2023", "[DATE]", "DATE"),
    ("31/12/1999", "[DATE]", "DATE"),
    ("Jan 2, 2023", "[DATE]", "DATE"),
    ("January 2nd, 2023", "[DATE]", "DATE"),
    ("2 January 2023", "[DATE]", "DATE"),
    ("the 3rd of July 2008 when", "the [DATE] when", "DATE"),
    ("January 2023", "[DATE]", "DATE"),
    ("seen in clinic on 07/29/2008 with", "seen in clinic on [DATE] with", "DATE"),
    ("Sept. 5, 2019", "[DATE]", "DATE"),
    ("MARCH 3, 2020", "[DATE]", "DATE"),
    ("admitted in 07/2007.", "admitted in [DATE].", "DATE"),
    ("this past April 30th.", "this past [DATE].", "DATE"),
    ("Boston, MA 02115", "Boston, MA [ZIP]", "ZIP"),
    ("zip code 90210", "zip code [ZIP]", "ZIP"),
    ("12345-6789", "[ZIP]", "ZIP"),
    ("New York 10001", "New York [ZIP]", "ZIP"),
]


@pytest.mark.parametrize("text,expected,kind", MASKED)
def test_identifier_is_masked_with_its_typed_placeholder(text, expected, kind):
    result = scrub(text)
    assert result.text == expected
    assert result.counts == Counter({kind: 1})


KEPT = [
    "aspirin 81 mg daily", "0.5 mg/kg", "120/80", "BP 140/90", "HR 72", "temperature 38.5",
    "T 98.6 F", "67-year-old", "67 yo", "HbA1c 7.2%", "K 3.4", "ICD-10 E11.9", "I10", "Z79.4",
    "q6h", "q4-6h prn", "ratio 1:1000", "at 10:30", "WBC 12000", "platelets 250000", "CPT 99213",
    "in 2008", "pH 7.35", "call 911", "5/5 strength", "pain 7/10", "1/2 tab", "EF 55-60%",
    "2-3 times daily", "G2P1011", "Apgars 8/9", "20/20 vision", "Na 138, K 4.1, Cl 101, CO2 24, BUN 18, Cr 1.1",
    "you may 2 tablets", "in March", "1:1", "3/4/5", "1.5.3", "BP 120 80 1400", "SpO2 98% on 2 L",
    "10-12 mg", "account for 5000 units", "medical record reviewed", "member of staff", "dose 1-2-10",
    "0.9% NaCl 1000 mL", "INR 2.5", "1/15", "heart rate 100-120", "Rule of 9s", "C5-C6", "L4-5",
    "2+/4 reflexes", "13/32 on 2/3", "GCS 15", "BMI 31.2", "Dr. Kumar", "12/35/2023", "2023-13-02",
]


@pytest.mark.parametrize("text", KEPT)
def test_clinical_look_alike_survives(text):
    result = scrub(text)
    assert result.text == text and not result.counts


def test_counts_every_identifier_in_a_note():
    note = ("Seen 01/02/2023 and 2023-02-03 (MRN: 1234567). Call (555) 123-4567 or 555-987-6543, "
            "e-mail jo@x.org. BP 140/90, aspirin 81 mg.")
    result = scrub(note)
    assert result.text == ("Seen [DATE] and [DATE] (MRN: [MRN]). Call [PHONE] or [PHONE], "
                           "e-mail [EMAIL]. BP 140/90, aspirin 81 mg.")
    assert result.counts == Counter({"DATE": 2, "PHONE": 2, "MRN": 1, "EMAIL": 1})


def test_url_wins_over_the_ip_inside_it_and_email_over_its_domain():
    assert scrub("http://10.0.0.1/chart").text == "[URL]"
    assert scrub("mail a@b.com").counts == Counter({"EMAIL": 1})


def test_scrubbing_twice_changes_nothing_more():
    once = scrub("MRN: 1234567 seen 2 January 2023, call +1 555 123 4567").text
    assert scrub(once).text == once and not scrub(once).counts


def test_scrub_record_scrubs_only_named_string_fields():
    record = {"id": "01/02/2023", "dialogue": "Seen 01/02/2023.", "summary": "Fine.", "n": 5}
    out, counts = scrub_record(record, ["dialogue", "summary", "n"])
    assert out == {"id": "01/02/2023", "dialogue": "Seen [DATE].", "summary": "Fine.", "n": 5}
    assert counts == Counter({"DATE": 1}) and record["dialogue"] == "Seen 01/02/2023."


def test_scrub_examples_scrubs_source_and_target():
    ex = Example("a", "Call 555-123-4567.", "Seen 2023-01-02.", {"x": 1})
    (out,), counts = scrub_examples([ex])
    assert (out.id, out.source, out.target, out.record) == ("a", "Call [PHONE].", "Seen [DATE].", {"x": 1})
    assert counts == Counter({"PHONE": 1, "DATE": 1})


def test_format_counts_lists_kinds_in_fixed_order():
    assert format_counts(Counter({"ZIP": 1, "DATE": 3})) == "DATE 3, ZIP 1"
    assert format_counts(Counter()) == "nothing found"
    assert KINDS == ("EMAIL", "URL", "IP", "SSN", "MRN", "ACCOUNT", "PHONE", "DATE", "ZIP")
