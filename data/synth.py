"""The bundled dataset: synthetic EHR-style notes dense with abbreviations, and their summaries.

    python -m data.synth --out data --seed 0            # writes train/val/test/test_ood.json
    python -m data.synth --out data --seed 0 --check    # regenerates in memory, compares (exit 1)

A record's source fields are written the way clinicians write ("65 yo M with h/o HTN. Denies CP.
Rx: ASA 81 mg PO QD."); its summary is `summarise()` of those fields: every abbreviation of
data/abbreviations.py written "expansion (ABBR)", headers spelled out ("Treatment:",
"Follow-up:"), every other word copied. The summary is therefore a function of the source that a
small model can learn, while ages, sexes, vitals, doses, complaints, negations and sentence
templates vary from record to record.

Eight in-domain specialties fill train/val/test (80/10/10 within each specialty); three
out-of-domain specialties, whose own abbreviations never occur in-domain, fill test_ood.json.
Everything is drawn from `random.Random` seeded from `--seed`, so a seed gives the same bytes on
every machine. Files are JSON arrays (indent 1, UTF-8, trailing newline), written atomically.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data.abbreviations import ABBREVIATIONS, expand_text, find_abbreviations
from data.errors import DataError, exit_on_data_error
from models.atomic import atomic_write_text

IN_DOMAIN = ("cardiology", "pulmonology", "oncology", "endocrinology", "gastroenterology",
             "nephrology", "infectious disease", "hematology")
OUT_OF_DOMAIN = ("neurology", "rheumatology", "psychiatry")
SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json", "test_ood": "test_ood.json"}
SOURCE_WORDS = (30, 90)  # of the source text the model sees, field labels included
SUMMARY_WORDS = (40, 140)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    per_specialty: int = 400  # in-domain records per specialty; a multiple of 10 keeps 80/10/10 exact
    ood_per_specialty: int = 100


# ------------------------------------------------------------------------------ content language
# Pool items and templates are plain clinical text with two kinds of choice, drawn at use:
#   {a|b|c}   one of the alternatives        {lo..hi}   a number, as many decimals as lo or hi
# and "(F) " / "(M) " in front of items that fit only one sex. Templates also take $slots.

_CHOICE = re.compile(r"\{([^{}]*)\}")
_SLOT = re.compile(r"\$([a-z_][a-z0-9_]*)")


def _number(lo: str, hi: str, rng: random.Random) -> str:
    decimals = max(len(x.partition(".")[2]) for x in (lo, hi))
    scale = 10 ** decimals
    value = rng.randint(round(float(lo) * scale), round(float(hi) * scale))
    return f"{value / scale:.{decimals}f}" if decimals else str(value)


def resolve(text: str, rng: random.Random) -> str:
    """Draw every {a|b} choice and {lo..hi} number in `text`, left to right."""
    def draw(m: re.Match) -> str:
        body = m.group(1)
        if ".." in body and "|" not in body:
            return _number(*body.split(".."), rng)
        return rng.choice(body.split("|"))
    return _CHOICE.sub(draw, text)


def fill(template: str, rng: random.Random, **slots: str) -> str:
    """A template with its $slots filled (slot values are used as given), then its choices drawn."""
    parts = _SLOT.split(template)  # odd positions are slot names
    return "".join(slots[p] if i % 2 else resolve(p, rng) for i, p in enumerate(parts))


def fits(item: str, sex: str) -> bool:
    return not (item.startswith("(F) ") and sex != "F") and not (item.startswith("(M) ") and sex != "M")


def pick(pool: tuple[str, ...], rng: random.Random, sex: str, k: int = 1) -> list[str]:
    """k distinct items that fit `sex`, choices drawn."""
    usable = [item.removeprefix("(F) ").removeprefix("(M) ") for item in pool if fits(item, sex)]
    return [resolve(item, rng) for item in rng.sample(usable, min(k, len(usable)))]


def join(items: list[str], rng: random.Random, last: str | None = None) -> str:
    """'a', 'a and b', 'a, b and c' (or 'a, b, c'); `last` fixes the final joiner ('or')."""
    if len(items) == 1:
        return items[0]
    if last is None:
        last = rng.choice([" and ", ", "]) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


_MINOR_WORDS = {"a", "an", "the", "of", "on", "to", "with", "in", "from", "prior", "recurrent",
                "home", "years", "ago", "stage", "use", "chronic"}


def mentioned(item: str, text: str) -> bool:
    """Whether a significant word of `item` already occurs in `text` (so not to deny it)."""
    words = set(re.findall(r"[A-Za-z0-9/]+", text))
    return any(w in words for w in re.findall(r"[A-Za-z0-9/]+", item) if w not in _MINOR_WORDS)


# ------------------------------------------------------------------------------ specialties


@dataclass(frozen=True)
class Specialty:
    name: str
    conditions: tuple[str, ...]  # what the diagnosis names
    history: tuple[str, ...]     # past history items
    procedures: tuple[str, ...]  # things a patient is "s/p"
    symptoms: tuple[str, ...]
    denials: tuple[str, ...]     # pertinent negatives
    exam: tuple[str, ...]        # physical exam findings
    labs: tuple[str, ...]        # lab, imaging and test results
    treatments: tuple[str, ...]
    tests: tuple[str, ...]       # follow-up tests
    causes: tuple[str, ...]      # "X d/t <cause>"


SPECIALTIES: dict[str, Specialty] = {s.name: s for s in (
    Specialty(
        name="cardiology",
        conditions=("NSTEMI", "inferior STEMI", "anterior STEMI", "ACS", "acute decompensated CHF",
                    "HFrEF with LVEF {20..35}%", "AFib with RVR", "new-onset AFib", "SVT",
                    "unstable angina from CAD", "stable angina from CAD", "hypertensive urgency",
                    "LVH from longstanding HTN", "symptomatic PVD", "CHF exacerbation",
                    "paroxysmal AFib"),
        history=("CAD", "MI {2..15} years ago", "AFib on apixaban", "CHF", "HFrEF", "PVD", "LVH",
                 "stable angina", "prior NSTEMI", "SVT"),
        procedures=("CABG {2..20} years ago", "PCI to the RCA", "ICD placement", "PPM placement",
                    "cardiac cath with stent"),
        symptoms=("{CP|substernal CP|exertional CP|CP radiating to the left arm}", "SOB",
                  "DOE", "PND", "orthopnea", "palpitations", "LE edema", "presyncope",
                  "fatigue", "diaphoresis", "weight gain of {2..6} kg"),
        denials=("PND", "syncope", "orthopnea", "palpitations", "diaphoresis", "claudication"),
        exam=("JVD", "bibasilar crackles", "b/l LE edema", "an irregularly irregular rhythm",
              "a new systolic murmur", "a third heart sound", "diminished pedal pulses",
              "cool extremities"),
        labs=("BNP {450..3200}", "troponin {0.08..4.50}", "LDL {130..210}", "HDL {25..38}",
              "LVEF {20..45}% on prior TTE", "ST depressions on ECG", "NSR on EKG",
              "new T wave inversions on ECG"),
        treatments=("ASA {81|325} mg PO QD", "NTG 0.4 mg SL PRN CP", "metoprolol {25|50|100} mg PO BID",
                    "a BB", "an ACEi", "an ARB", "lisinopril {5|10|20} mg PO QD",
                    "atorvastatin {40|80} mg PO QHS", "furosemide {20|40|80} mg IV BID",
                    "clopidogrel 75 mg PO QD", "DAPT for 12 months", "apixaban 5 mg PO BID",
                    "diltiazem {30|60} mg PO QID", "amiodarone {200|400} mg PO QD",
                    "losartan {25|50|100} mg PO QD", "carvedilol {3.125|6.25|12.5} mg PO BID",
                    "spironolactone 25 mg PO QD", "sacubitril-valsartan {24/26|49/51} mg PO BID"),
        tests=("ECG", "EKG", "TTE", "TEE", "BNP", "LDL", "HDL", "a lipid panel", "troponin q6h",
               "BMP", "a stress test", "cardiac cath", "Holter monitor"),
        causes=("CAD", "medication nonadherence", "dietary indiscretion", "uncontrolled HTN",
                "AFib with RVR", "ischemia"),
    ),
    Specialty(
        name="pulmonology",
        conditions=("COPD exacerbation", "acute COPD exacerbation", "CAP", "RLL PNA", "LLL PNA", "PE",
                    "submassive PE", "ILD", "OSA", "ARDS", "URI", "asthma exacerbation",
                    "pleural effusion", "hypoxic respiratory failure", "hypercapnic respiratory failure"),
        history=("COPD", "OSA on CPAP", "asthma", "ILD", "a {20..60} pack-year smoking history",
                 "prior PE", "recurrent PNA", "home O2 {2|3|4} L"),
        procedures=("right lobectomy", "left lobectomy", "bronchoscopy with BAL", "thoracentesis",
                    "intubation for ARDS"),
        symptoms=("SOB", "DOE", "productive cough", "dry cough", "wheezing", "hemoptysis",
                  "pleuritic CP", "daytime somnolence", "loud snoring", "SOB at rest"),
        denials=("hemoptysis", "sick contacts", "recent travel", "wheezing", "calf pain"),
        exam=("diffuse wheezes", "RLL crackles", "LLL crackles", "accessory muscle use",
              "decreased breath sounds at the {left|right} base", "clubbing",
              "dullness to percussion at the {left|right} base", "SpO2 {84..91}% on room air"),
        labs=("ABG with pH {7.21..7.34}", "FEV1 {35..70}% predicted", "WBC {11.2..22.5}",
              "a D-dimer of {1.2..6.8}", "DLCO {30..60}% predicted", "a {left|right} effusion on CXR",
              "a RLL infiltrate on CXR"),
        treatments=("albuterol MDI {2|4} puffs q4h PRN", "nebs q4h", "ipratropium nebs q6h",
                    "prednisone 40 mg PO QD for 5 days", "azithromycin 500 mg PO QD",
                    "ceftriaxone 1 g IV QD", "ICS/LABA inhaler BID", "a LAMA inhaler QD",
                    "CPAP nightly", "BiPAP overnight", "O2 {2|3|4} L to keep SpO2 above 90%",
                    "enoxaparin 1 mg/kg SQ BID", "levofloxacin 750 mg PO QD",
                    "pulmonary rehab", "methylprednisolone {40|60|125} mg IV q6h"),
        tests=("CXR", "CT chest", "PFTs", "ABG", "DLCO", "a sleep study", "6MWT", "sputum culture",
               "CBC", "BAL", "FEV1"),
        causes=("viral URI", "medication nonadherence", "smoking", "aspiration", "DVT", "pneumonia"),
    ),
    Specialty(
        name="oncology",
        conditions=("stage {II|III|IV} NSCLC", "extensive-stage SCLC", "metastatic CRC with liver mets",
                    "HCC", "RCC", "neutropenic fever", "(F) DCIS", "(F) stage {I|II|III} breast cancer",
                    "(M) metastatic prostate cancer", "tumor lysis syndrome",
                    "chemo-induced N/V", "malignant pleural effusion", "bone mets",
                    "(F) ovarian cancer", "brain mets"),
        history=("NSCLC on chemo", "CRC", "(F) breast cancer", "(M) prostate cancer", "HCC",
                 "RCC", "SCLC", "(F) DCIS", "a {10..50} pack-year smoking history"),
        procedures=("(F) {left|right} mastectomy", "partial colectomy", "XRT to the chest",
                    "FNA of a neck LN", "nephrectomy", "port placement"),
        symptoms=("weight loss of {4..15} kg", "fatigue", "night sweats", "N/V", "bone pain",
                  "poor appetite", "cough", "SOB", "fever", "back pain"),
        denials=("night sweats", "bone pain", "hemoptysis", "new lumps"),
        exam=("ECOG performance status {0|1|2|3}", "palpable axillary LN", "a supraclavicular LN",
              "hepatomegaly", "cachexia", "(F) a {2..5} cm breast mass", "spinal tenderness"),
        labs=("CEA {8.5..95.0}", "ANC {0.1..0.9}", "AFP {50..900}", "(M) PSA {8..150}",
              "(F) CA-125 {80..900}", "LDH {350..1400}", "uric acid {8.5..14.0}",
              "new liver mets on CT"),
        treatments=("5-FU-based chemo", "carboplatin and pemetrexed chemo", "XRT {20|30|45} Gy",
                    "G-CSF support", "pegfilgrastim", "ondansetron {4|8} mg PO q8h PRN",
                    "dexamethasone {4|8} mg IV QD", "TKI therapy with osimertinib", "palliative XRT",
                    "cefepime 2 g IV q8h", "(M) leuprolide", "(F) tamoxifen 20 mg PO QD",
                    "morphine {15|30} mg PO q4h PRN", "allopurinol 300 mg PO QD",
                    "rasburicase", "pembrolizumab"),
        tests=("PET scan", "CT chest, abdomen and pelvis", "CEA", "CBC with differential", "LFTs",
               "MRI brain", "a repeat bx", "ANC", "(F) CA-125", "(M) PSA", "AFP", "LDH"),
        causes=("chemo", "tumor progression", "bone mets", "neutropenia"),
    ),
    Specialty(
        name="endocrinology",
        conditions=("DKA", "HHS", "uncontrolled DM2", "T1DM with hypoglycemia", "hypothyroidism",
                    "Graves disease", "primary hyperparathyroidism", "SIADH", "(F) PCOS",
                    "osteoporosis", "adrenal insufficiency", "thyroid nodule", "DM2 with neuropathy"),
        history=("T1DM", "DM2 on insulin", "hypothyroidism", "(F) PCOS", "osteoporosis",
                 "Graves disease", "prediabetes"),
        procedures=("total thyroidectomy", "RAI ablation", "parathyroidectomy", "bariatric surgery"),
        symptoms=("polyuria", "polydipsia", "weight loss", "weight gain", "fatigue",
                  "heat intolerance", "cold intolerance", "tremor", "blurry vision",
                  "(F) irregular menses", "N/V", "numbness in both feet", "palpitations"),
        denials=("polyuria", "heat intolerance", "tremor", "vision changes", "hypoglycemic episodes"),
        exam=("a goiter", "a {1.2..3.5} cm thyroid nodule", "lid lag", "dry mucous membranes",
              "Kussmaul respirations", "decreased sensation in both feet", "acanthosis nigricans"),
        labs=("HbA1c {7.8..13.5}%", "FSG {250..560}", "BG {38..62}", "TSH {0.01..0.08}",
              "TSH {8.5..45.0}", "FT4 {0.3..0.6}", "an anion gap of {18..30}", "Na {118..128}",
              "calcium {10.8..12.4}", "PTH {95..260}"),
        treatments=("metformin {500|1000} mg PO BID", "insulin glargine {10..40} units SQ QHS",
                    "insulin lispro sliding scale", "SGLT2 inhibitor therapy", "a GLP-1 agonist",
                    "a DPP-4 inhibitor", "levothyroxine {25|50|75|88|100} mcg PO QAM",
                    "methimazole {5|10|20} mg PO QD", "an insulin drip with IV fluids",
                    "NS {1|2} L IV bolus", "RAI ablation", "fluid restriction to 1.2 L/day",
                    "alendronate 70 mg PO weekly", "hydrocortisone {10|20} mg PO QAM",
                    "cinacalcet 30 mg PO BID", "propranolol {10|20} mg PO TID"),
        tests=("HbA1c", "TSH", "FT4", "FSG QID", "BMP", "UACR", "a DEXA scan", "PTH",
               "thyroid U/S", "TFTs", "a lipid panel", "LDL"),
        causes=("insulin nonadherence", "infection", "missed doses", "viral URI", "steroid use"),
    ),
    Specialty(
        name="gastroenterology",
        conditions=("UGIB", "GIB", "PUD", "GERD", "UC flare", "IBD flare", "IBS", "NAFLD", "SBP",
                    "acute pancreatitis", "choledocholithiasis", "alcoholic hepatitis", "chronic HCV",
                    "HBV reactivation", "cirrhosis with ascites", "acute cholecystitis"),
        history=("GERD", "cirrhosis", "HCV", "HBV", "IBD", "PUD", "EtOH use", "UC", "IBS", "NAFLD"),
        procedures=("cholecystectomy", "TIPS", "EGD with banding", "colonoscopy with polypectomy",
                    "ERCP with stent"),
        symptoms=("RUQ pain", "LLQ pain", "RLQ pain", "epigastric pain", "N/V", "BRBPR", "melena",
                  "hematemesis", "diarrhea", "dysphagia", "jaundice", "abdominal distension",
                  "heartburn", "{3..8} bloody stools per day"),
        denials=("melena", "hematemesis", "BRBPR", "dysphagia", "jaundice"),
        exam=("RUQ tenderness", "scleral icterus", "shifting dullness", "epigastric tenderness",
              "a positive Murphy sign", "LLQ tenderness", "asterixis", "spider angiomata"),
        labs=("AST {85..450}", "ALT {90..520}", "INR {1.4..3.2}", "lipase {400..3500}",
              "Hgb {6.2..9.8}", "a bilirubin of {2.1..12.5}", "albumin {2.0..3.1}",
              "a positive H. pylori antigen"),
        treatments=("pantoprazole 40 mg IV BID", "omeprazole {20|40} mg PO QD", "PPI therapy",
                    "octreotide drip", "ceftriaxone 1 g IV QD", "lactulose 30 mL PO TID",
                    "IVF at {100|150|200} mL/h", "NPO", "mesalamine {2.4|4.8} g PO QD",
                    "prednisone 40 mg PO QD", "ERCP", "TIPS evaluation", "bowel rest",
                    "tenofovir 300 mg PO QD", "sucralfate 1 g PO QID", "rifaximin 550 mg PO BID",
                    "spironolactone 100 mg PO QD"),
        tests=("EGD", "colonoscopy", "LFTs", "RUQ U/S", "MRCP", "INR", "CBC", "lipase",
               "H. pylori stool antigen", "CT abdomen", "AST and ALT"),
        causes=("ibuprofen use", "EtOH use", "gallstones", "H. pylori infection", "medication nonadherence"),
    ),
    Specialty(
        name="nephrology",
        conditions=("AKI", "AKI on CKD stage {3|4}", "ARF", "ESRD with volume overload", "hyperkalemia",
                    "hyponatremia", "nephrotic syndrome", "nephrolithiasis", "CKD stage {3|4|5}",
                    "metabolic acidosis", "(M) obstructive uropathy from BPH", "contrast nephropathy",
                    "prerenal azotemia"),
        history=("CKD", "ESRD on HD", "ESRD on PD", "(M) BPH", "nephrolithiasis",
                 "a kidney transplant", "CKD stage {3|4}"),
        procedures=("kidney transplant", "arteriovenous fistula creation", "tunneled HD catheter placement",
                    "lithotripsy"),
        symptoms=("decreased UOP", "LE edema", "fatigue", "flank pain", "hematuria", "foamy urine",
                  "N/V", "muscle cramps", "dysuria", "poor oral intake"),
        denials=("hematuria", "dysuria", "flank pain", "ibuprofen use"),
        exam=("b/l LE edema", "dry mucous membranes", "a pericardial rub", "asterixis",
              "flank tenderness", "crackles at both bases"),
        labs=("Cr {1.8..7.5} (baseline {0.9|1.1|1.3})", "BUN {35..120}", "K {5.6..7.1}",
              "Na {118..129}", "HCO3 {12..19}", "eGFR {12..45}", "UA with {protein|blood}",
              "UPCR {3.5..9.0} g/g", "peaked T waves on ECG"),
        treatments=("IVF", "NS at {75|100|125} mL/h", "HD", "urgent HD", "PD exchanges",
                    "furosemide {40|80} mg IV BID", "sodium bicarbonate 650 mg PO TID",
                    "calcium gluconate 1 g IV", "insulin and dextrose", "patiromer 8.4 g PO QD",
                    "EPO {4000|10000} units SQ weekly", "sevelamer 800 mg PO TID", "holding HCTZ",
                    "HCTZ {12.5|25} mg PO QD", "(M) tamsulosin 0.4 mg PO QHS",
                    "fluid restriction to 1.5 L/day"),
        tests=("BMP", "BUN", "Cr", "UA", "renal U/S", "UPCR", "PTH", "eGFR", "urine electrolytes",
               "K", "phosphorus"),
        causes=("volume depletion", "contrast exposure", "ibuprofen use", "HCTZ", "obstruction", "sepsis"),
    ),
    Specialty(
        name="infectious disease",
        conditions=("UTI", "complicated UTI", "MRSA bacteremia", "MSSA bacteremia", "VRE infection",
                    "cellulitis of the {left|right} leg", "sepsis from UTI", "newly diagnosed HIV",
                    "AIDS", "latent TB", "active pulmonary TB", "CMV viremia", "EBV mononucleosis",
                    "HSV infection", "VZV reactivation", "syphilis", "osteomyelitis"),
        history=("HIV on HAART", "AIDS", "latent TB", "IVDU", "recurrent UTI", "MRSA colonization",
                 "HCV"),
        procedures=("splenectomy", "kidney transplant", "prosthetic knee replacement",
                    "incision and drainage of an abscess"),
        symptoms=("f/c", "fever", "dysuria", "urinary frequency", "night sweats", "weight loss",
                  "sore throat", "a painful rash", "productive cough", "headache", "N/V",
                  "redness and swelling of the {left|right} leg"),
        denials=("f/c", "night sweats", "dysuria", "sick contacts", "recent travel", "rash"),
        exam=("cervical lymphadenopathy", "a {4..12} cm area of erythema", "a new murmur",
              "track marks", "oral thrush", "a vesicular rash in a dermatomal distribution",
              "suprapubic tenderness", "Tmax {38.3..40.1} C"),
        labs=("WBC {12.5..26.0}", "lactate {2.2..5.8}", "VL {5000..250000} copies/mL",
              "ESR {45..110}", "CRP {35..240}", "{2|3|4} of 4 positive BCx", "UA with pyuria",
              "PPD {12|15|18} mm", "a reactive RPR"),
        treatments=("vanc {1|1.25|1.5} g IV q12h", "ceftriaxone 1 g IV QD", "cefazolin 2 g IV q8h",
                    "TMP-SMX PO BID", "nitrofurantoin 100 mg PO BID", "INH 300 mg PO QD",
                    "HAART", "daptomycin", "valganciclovir", "valacyclovir 1 g PO TID",
                    "PCN G 2.4 million units IM", "IV abx", "linezolid 600 mg PO BID",
                    "piperacillin-tazobactam 4.5 g IV q6h", "rifampin 600 mg PO QD"),
        tests=("BCx", "UCx", "VL", "CBC", "ESR", "CRP", "RPR", "PPD", "CXR", "TTE", "HIV genotype",
               "LFTs"),
        causes=("MRSA", "E. coli", "Klebsiella", "IVDU", "a central line"),
    ),
    Specialty(
        name="hematology",
        conditions=("DVT of the {left|right} leg", "provoked DVT", "PE", "ITP", "HIT", "DIC", "IDA",
                    "AML", "CLL", "CML", "MGUS", "NHL", "sickle cell crisis", "B12 deficiency",
                    "VTE", "supratherapeutic INR on warfarin"),
        history=("DVT", "PE", "CLL", "MGUS", "sickle cell disease", "IDA", "AFib on warfarin", "VTE"),
        procedures=("splenectomy", "BMBx", "stem cell transplant", "vena cava filter placement"),
        symptoms=("fatigue", "easy bruising", "epistaxis", "petechiae", "{left|right} leg swelling",
                  "bone pain", "night sweats", "DOE", "gum bleeding", "pallor"),
        denials=("melena", "hematuria", "easy bruising", "night sweats"),
        exam=("splenomegaly", "petechiae on both legs", "conjunctival pallor",
              "a swollen tender {left|right} calf", "scleral icterus", "diffuse lymphadenopathy"),
        labs=("Hgb {5.8..9.5}", "Hct {18..28}%", "plt {8..45}", "MCV {62..74}", "MCV {105..122}",
              "LDH {350..1400}", "INR {4.5..9.8}", "WBC {38..150}", "PTT {55..110}",
              "ferritin {4..12}", "TIBC {420..520}", "retic {0.2..0.8}%", "Fe {18..35}"),
        treatments=("enoxaparin 1 mg/kg SQ BID", "LMWH", "a DOAC", "apixaban {5|10} mg PO BID",
                    "UFH drip", "argatroban drip", "{1|2} units of PRBC", "{2|4} units of FFP",
                    "IVIG 1 g/kg", "prednisone 1 mg/kg PO QD", "phytonadione {5|10} mg IV",
                    "ferrous sulfate 325 mg PO TID", "IV iron", "B12 1000 mcg IM monthly",
                    "hydroxyurea", "imatinib 400 mg PO QD", "holding warfarin"),
        tests=("CBC", "INR", "PTT", "LDH", "retic", "iron studies", "TIBC", "BMBx",
               "a peripheral smear", "LE duplex", "HIT antibody", "fibrinogen", "haptoglobin", "MCV"),
        causes=("recent surgery", "immobility", "malignancy", "heparin exposure", "chemo", "poor diet"),
    ),
    # Out-of-domain: only test_ood.json. Their own abbreviations appear nowhere in-domain.
    Specialty(
        name="neurology",
        conditions=("acute ischemic CVA", "acute ischemic CVA, LKW {1..6} hours prior", "TIA", "SAH",
                    "SDH", "ICH", "new-onset sz", "breakthrough sz",
                    "migraine without aura", "ALS", "multiple sclerosis flare", "Parkinson disease",
                    "RLS", "AMS from encephalopathy", "Guillain-Barre syndrome", "Bell palsy"),
        history=("CVA", "TIA", "epilepsy on an AED", "migraines", "Parkinson disease",
                 "multiple sclerosis", "RLS"),
        procedures=("DBS placement", "craniotomy", "ventriculoperitoneal shunt placement", "thrombectomy"),
        symptoms=("HA", "the worst HA of life", "{left|right}-sided weakness", "slurred speech",
                  "facial droop", "LOC", "a witnessed sz", "confusion", "dizziness",
                  "numbness in both feet", "tremor", "double vision", "AMS"),
        denials=("HA", "LOC", "vision changes", "bowel or bladder incontinence", "neck stiffness"),
        exam=("NIHSS {2..18}", "CN II-XII intact", "{left|right} pronator drift",
              "{left|right} hemiparesis", "expressive aphasia", "a resting tremor",
              "absent ankle reflexes", "neck stiffness"),
        labs=("CSF with {elevated protein|pleocytosis}", "a {small|large} infarct on CT head",
              "EEG with {focal slowing|epileptiform discharges}", "LP opening pressure {25..40}",
              "a hyperdensity on CT head"),
        treatments=("tPA", "ASA 325 mg PO QD", "levetiracetam {500|750|1000} mg PO BID", "an AED",
                    "sumatriptan 50 mg PO PRN", "IVIG", "IV methylprednisolone 1 g QD",
                    "carbidopa-levodopa {25/100|25/250} PO TID", "riluzole 50 mg PO BID",
                    "gabapentin 300 mg PO TID", "topiramate 25 mg PO QHS", "pramipexole 0.125 mg PO QHS",
                    "atorvastatin 80 mg PO QHS"),
        tests=("MRI brain", "MRA head and neck", "EEG", "EMG", "NCS", "LP", "CSF analysis", "CT head",
               "carotid dopplers", "TTE"),
        causes=("cardioembolism from AFib", "medication nonadherence", "sleep deprivation",
                "small vessel disease"),
    ),
    Specialty(
        name="rheumatology",
        conditions=("RA flare", "seropositive RA", "SLE flare", "lupus nephritis", "PMR", "GCA",
                    "acute gout flare", "knee OA", "DJD of the lumbar spine", "chronic LBP",
                    "ankylosing spondylitis", "psoriatic arthritis", "Sjogren syndrome", "pseudogout"),
        history=("RA", "SLE", "OA", "gout", "PMR", "DJD", "chronic LBP"),
        procedures=("{left|right} knee replacement", "{left|right} hip replacement",
                    "temporal artery bx", "knee arthrocentesis"),
        symptoms=("joint pain", "morning stiffness lasting {1|2|3} hours", "PIP swelling",
                  "DIP swelling", "hip girdle pain", "jaw claudication", "a photosensitive rash",
                  "oral ulcers", "LBP", "dry eyes", "Raynaud phenomenon",
                  "a hot swollen {left|right} knee"),
        denials=("jaw claudication", "vision changes", "oral ulcers", "rash"),
        exam=("synovitis of both wrists", "temporal artery tenderness", "tender PIP joints",
              "DIP nodes", "a malar rash", "a warm effusion of the {left|right} knee",
              "tophi on both hands"),
        labs=("ESR {45..110}", "CRP {20..150}", "a positive ANA", "a positive RF",
              "anti-CCP {60..300}", "low C3 and C4", "uric acid {8.5..12.0}", "a positive HLA-B27"),
        treatments=("MTX {15|20|25} mg PO weekly", "HCQ {200|400} mg PO QD",
                    "prednisone {10|20|40|60} mg PO QD", "NSAIDs", "naproxen 500 mg PO BID",
                    "a TNF inhibitor", "adalimumab 40 mg SQ every 2 weeks", "colchicine 0.6 mg PO BID",
                    "allopurinol {100|300} mg PO QD", "a DMARD", "folic acid 1 mg PO QD",
                    "an intra-articular steroid injection", "physical therapy"),
        tests=("ESR", "CRP", "ANA", "RF", "anti-CCP", "C3 and C4", "uric acid", "HLA-B27",
               "hand x-rays", "a temporal artery bx", "LFTs", "CBC", "UA"),
        causes=("medication nonadherence", "a recent infection", "steroid taper", "diuretic use"),
    ),
    Specialty(
        name="psychiatry",
        conditions=("MDD, recurrent, severe", "MDD with SI", "GAD", "PTSD", "BPAD, manic episode",
                    "OCD", "ADHD", "SUD", "EtOH use disorder", "EtOH withdrawal",
                    "acute psychosis with AVH", "panic disorder", "insomnia"),
        history=("MDD", "GAD", "PTSD", "BPAD", "SUD", "a prior suicide attempt", "OCD", "ADHD"),
        procedures=("a course of ECT", "inpatient psychiatric admission", "detox admission"),
        symptoms=("low mood", "anhedonia", "poor sleep", "racing thoughts", "panic attacks",
                  "SI without a plan", "AVH", "irritability", "poor concentration", "nightmares",
                  "intrusive thoughts", "tremulousness"),
        denials=("SI", "HI", "AVH", "self-harm"),
        exam=("flat affect on MSE", "pressured speech on MSE", "a linear thought process",
              "poor eye contact", "an anxious affect", "psychomotor retardation", "a fine tremor"),
        labs=("a PHQ-9 score of {15..27}", "UDS positive for {cannabis|cocaine|opioids}",
              "a blood alcohol level of {80..320}", "a lithium level of {0.3..1.8}"),
        treatments=("sertraline {50|100} mg PO QD", "SSRI therapy", "SNRI therapy",
                    "venlafaxine {75|150} mg PO QD", "CBT", "ECT", "lithium {300|600} mg PO BID",
                    "quetiapine {50|100} mg PO QHS", "TCA therapy", "bupropion 150 mg PO QAM",
                    "prazosin 1 mg PO QHS", "a lorazepam taper", "naltrexone 50 mg PO QD",
                    "methylphenidate 10 mg PO BID"),
        tests=("PHQ-9", "UDS", "a lithium level", "TSH", "BMP", "a repeat MSE", "EKG"),
        causes=("psychosocial stressors", "medication nonadherence", "EtOH use", "poor sleep"),
    ),
)}

# Shared by every specialty; only general abbreviations, so out-of-domain records see them too.
GENERAL_HISTORY = ("HTN", "HLD", "DM2", "obesity", "tobacco use", "EtOH use", "hypothyroidism",
                   "depression", "dyspepsia", "chronic back pain")
GENERAL_DENIALS = ("CP", "SOB", "f/c", "N/V", "fever", "weight loss", "abdominal pain",
                   "LE edema", "cough", "diarrhea", "headache", "dizziness")

# ------------------------------------------------------------------------------ templates

OPENERS = (
    "$age yo $sex with h/o $pmh.",
    "$age y/o $sex with $pmh.",
    "$age-year-old $sexword with a history of $pmh.",
    "$age yo $sex. PMH: $pmh.",
    "$age yo $sex s/p $proc, also with $pmh.",
    "Patient is a $age yo $sex with h/o $pmh.",
    "$age yo $sex with no significant past history.",
    "$age-year-old $sexword, s/p $proc.",
    "$age y/o $sex with h/o $pmh, s/p $proc.",
    "This is a $age yo $sex known to have $pmh.",
)
PRESENTATIONS = (
    "Now c/o $sx for $dur.",
    "The pt p/w $sx over the past $dur.",
    "Presented to the ED with $sx.",
    "Reports $sx for $dur.",
    "CC: $sx.",
    "HPI: $dur of $sx.",
    "Seen in clinic for $sx, ongoing for $dur.",
    "Sent from clinic to the ED for $sx.",
    "Has had $sx for $dur.",
    "The pt reports $sx, worse over the past $dur.",
    "Admitted with $sx.",
    "Comes in with {new|worsening|persistent|intermittent} $sx.",
)
NEGATIONS = (
    "Denies $neg.",
    "No $neg.",
    "Full ROS neg for $neg.",
    "The pt denies $neg.",
    "Negative for $neg.",
    "No h/o $hneg.",
    "Denies $neg; no h/o $hneg.",
    "Has not had $neg.",
    "No $neg, w/o $neg2.",
    "$pronoun denies $neg.",
)
OBSERVATIONS = (
    "On arrival, BP $sbp/$dbp, HR $hr, RR $rr, SpO2 $spo2%.",
    "Vitals: BP $sbp/$dbp mmHg, HR $hr bpm, SpO2 $spo2% on room air.",
    "Vitals: Tmax $fever C, HR $hr, BP $sbp/$dbp.",
    "Afebrile, VSS.",
    "In NAD, BP $sbp/$dbp, HR $hr.",
    "Current BMI $bmi.",
    "Exam notable for $exam.",
    "On exam, $exam and $exam2.",
    "Labs notable for $lab.",
    "Labs: $lab and $lab2.",
    "Labs: CBC WNL, $lab.",
    "Allergies: NKDA.",
    "Exam with $exam; labs with $lab.",
)
DIAGNOSES = (
    "$cond.",
    "$cond, likely d/t $cause.",
    "$cond; r/o $cond2.",
    "Suspected $cond.",
    "$cond c/b $cond2.",
    "New diagnosis of $cond.",
    "Worsening $cond.",
    "$cond in a pt with $hist.",
    "Primary: $cond. Secondary: $cond2.",
    "$cond d/t $cause, r/o $cond2.",
)
# (head in the source, kept in the summary?): a label is replaced by the summary's section
# header, a verb is part of the sentence and stays.
TREATMENT_HEADS = (("Rx: ", False), ("Tx: ", False), ("Plan: ", False), ("Start ", True),
                   ("Started ", True), ("Will start ", True), ("Begin ", True),
                   ("Continue home meds and add ", True))
FOLLOW_UP_HEADS = (("F/u: ", False), ("Follow-up: ", False), ("Recheck ", True), ("Repeat ", True),
                   ("Check ", True), ("Obtain ", True), ("Order ", True), ("Monitor ", True))
TIMINGS = ("in {2..14} days", "in {2..6} weeks", "in {2..6} months", "at the next visit",
           "before discharge", "tomorrow morning", "in 48 hours", "in 1 week", "in 1 month")
PLAN_EXTRAS = ("Return to the ED if sx worsen.", "Schedule a PCP visit in {2|4|6} weeks.",
               "Admit to {telemetry|the floor|the ICU}.", "Discussed plan with the pt.", "")


def duration(rng: random.Random) -> str:
    unit = rng.choice(["hours", "days", "days", "weeks", "months"])
    n = {"hours": (2, 48), "days": (2, 14), "weeks": (2, 8), "months": (2, 11)}[unit]
    return f"{rng.randint(*n)} {unit}" if rng.random() < 0.9 else rng.choice(["1 day", "1 week", "1 month"])


def vitals(rng: random.Random) -> dict[str, str]:
    sbp = rng.randint(88, 196)
    return {"sbp": str(sbp), "dbp": str(rng.randint(48, min(112, sbp - 25))),
            "hr": str(rng.randint(48, 138)), "rr": str(rng.randint(12, 32)),
            "spo2": str(rng.randint(82, 100)), "fever": _number("38.0", "40.2", rng),
            "bmi": _number("17.5", "46.0", rng)}


# ------------------------------------------------------------------------------ records


def summarise(patient_history: str, diagnosis: str, treatment_plan: str) -> str:
    """The reference summary of a record's source fields; a pure function of them."""
    treatment, follow_up = split_plan(treatment_plan)
    return (f"{expand_text(patient_history)} Diagnosis: {expand_text(diagnosis)} "
            f"Treatment: {expand_text(treatment)} Follow-up: {expand_text(follow_up)}")


_FOLLOW_UP_START = re.compile(r"\. (?=" + "|".join(re.escape(h) for h, _ in FOLLOW_UP_HEADS) + ")")


def split_plan(treatment_plan: str) -> tuple[str, str]:
    """(treatment, follow-up) sentences of a plan, each without a bare label such as 'Rx:'."""
    parts = _FOLLOW_UP_START.split(treatment_plan, maxsplit=1)
    if len(parts) != 2:
        raise DataError(f"treatment plan {treatment_plan!r}: no follow-up sentence "
                        f"(one starting {', '.join(repr(h.strip()) for h, _ in FOLLOW_UP_HEADS)})")
    treatment, follow_up = parts[0] + ".", parts[1]
    for head, kept in TREATMENT_HEADS:
        if not kept and treatment.startswith(head):
            treatment = treatment[len(head):]
    for head, kept in FOLLOW_UP_HEADS:
        if not kept and follow_up.startswith(head):
            follow_up = follow_up[len(head):]
    return treatment, follow_up


def _negation(spec: Specialty, rng: random.Random, sex: str, said: str) -> str:
    """One pertinent-negative sentence that denies nothing already said."""
    denials = tuple(d for d in spec.denials + GENERAL_DENIALS if not mentioned(d, said))
    negs = pick(denials, rng, sex, rng.randint(2, 4))
    # Only bare conditions read well after "no h/o": not "a 30 pack-year ..." or "X on Y".
    past = tuple(h for h in spec.history + ("HTN", "DM2", "HLD")
                 if not re.search(r"^a |^\(|\{| on ", h) and not mentioned(h, said)) or ("similar sx",)
    return fill(rng.choice(NEGATIONS), rng, neg=join(negs[:-1], rng, " or "), neg2=negs[-1],
                hneg=join(pick(past, rng, sex, rng.randint(1, 2)), rng, " or "),
                pronoun={"M": "He", "F": "She"}[sex])


def _history(spec: Specialty, rng: random.Random, age: int, sex: str) -> str:
    exam, exam2 = pick(spec.exam, rng, sex, 2)
    lab, lab2 = pick(spec.labs, rng, sex, 2)
    slots = {
        "age": str(age), "sex": sex,
        "sexword": rng.choice({"M": ["man", "male"], "F": ["woman", "female"]}[sex]),
        "pmh": join(pick(spec.history + GENERAL_HISTORY, rng, sex, rng.randint(1, 3)), rng),
        "proc": pick(spec.procedures, rng, sex)[0],
        "sx": join(pick(spec.symptoms, rng, sex, rng.choice([1, 1, 2, 2, 3, 4])), rng),
        "dur": duration(rng), "exam": exam, "exam2": exam2, "lab": lab, "lab2": lab2,
        **vitals(rng),
    }
    sentences = [fill(rng.choice(OPENERS), rng, **slots), fill(rng.choice(PRESENTATIONS), rng, **slots)]
    if rng.random() < 0.75:
        sentences.append(_negation(spec, rng, sex, " ".join(sentences)))
    sentences += [fill(t, rng, **slots) for t in rng.sample(OBSERVATIONS, rng.choice([1, 1, 2]))]
    if rng.random() < 0.2:  # a second pertinent negative, after the findings
        sentences.append(_negation(spec, rng, sex, " ".join(sentences)))
    return " ".join(sentences)


def _diagnosis(spec: Specialty, rng: random.Random, sex: str) -> str:
    cond, cond2 = pick(spec.conditions, rng, sex, 2)
    return fill(rng.choice(DIAGNOSES), rng, cond=cond, cond2=cond2,
                cause=pick(spec.causes, rng, sex)[0],
                hist=pick(spec.history + GENERAL_HISTORY, rng, sex)[0])


def _plan(spec: Specialty, rng: random.Random, sex: str) -> str:
    treatments = join(pick(spec.treatments, rng, sex, rng.choice([1, 2, 2, 3])), rng)
    tests = join(pick(spec.tests, rng, sex, rng.choice([1, 2, 2, 3])), rng)
    head = rng.choice(TREATMENT_HEADS)[0]
    follow = rng.choice(FOLLOW_UP_HEADS)[0]
    extra = resolve(rng.choice(PLAN_EXTRAS), rng)
    plan = f"{head}{treatments}. {follow}{tests} {resolve(rng.choice(TIMINGS), rng)}."
    return f"{plan} {extra}" if extra else plan


def source_text(record: dict) -> str:
    """The text the model sees, as data/records.py builds it from the three source fields."""
    return (f"Patient history: {record['patient_history']} Diagnosis: {record['diagnosis']} "
            f"Treatment plan: {record['treatment_plan']}")


def make_record(specialty: str, rng: random.Random) -> dict:
    """One record of `specialty` (no id yet), within the word bounds."""
    spec = SPECIALTIES[specialty]
    for _ in range(1000):
        sex = rng.choice("MF")
        age = rng.randint(18, 95)
        history = _history(spec, rng, age, sex)
        diagnosis = _diagnosis(spec, rng, sex)
        plan = _plan(spec, rng, sex)
        record = {"specialty": specialty, "patient_history": history, "diagnosis": diagnosis,
                  "treatment_plan": plan, "summary": summarise(history, diagnosis, plan)}
        source_words = len(source_text(record).split())
        summary_words = len(record["summary"].split())
        if (SOURCE_WORDS[0] <= source_words <= SOURCE_WORDS[1]
                and SUMMARY_WORDS[0] <= summary_words <= SUMMARY_WORDS[1]):
            found = find_abbreviations(f"{history} {diagnosis} {plan}")
            record["expansions"] = {a: ABBREVIATIONS[a].expansion for a in found}
            return record
    raise RuntimeError(f"{specialty}: no record within the word bounds after 1000 draws")


def generate(config: SynthConfig = SynthConfig()) -> dict[str, list[dict]]:
    """All four splits, keyed as SPLIT_FILES; records in each sorted by id."""
    rng = random.Random(config.seed)
    seen: set[tuple[str, str]] = set()
    made: dict[str, list[dict]] = {s: [] for s in IN_DOMAIN + OUT_OF_DOMAIN}
    # Round-robin over specialties so ids interleave; in-domain ids come first.
    for specialties, count in ((IN_DOMAIN, config.per_specialty), (OUT_OF_DOMAIN, config.ood_per_specialty)):
        for _ in range(count):
            for specialty in specialties:
                for _ in range(100):
                    record = make_record(specialty, rng)
                    key = (source_text(record), record["summary"])
                    if key not in seen:
                        break
                else:
                    raise RuntimeError(f"{specialty}: 100 duplicate records in a row; add variety")
                seen.add(key)
                made[specialty].append({"id": f"synth-{len(seen) - 1:06d}", **record})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for specialty in IN_DOMAIN:  # 80/10/10 within each specialty, so every split has all eight
        records = made[specialty]
        rng.shuffle(records)
        n_held = len(records) // 10
        splits["val"] += records[:n_held]
        splits["test"] += records[n_held:2 * n_held]
        splits["train"] += records[2 * n_held:]
    splits["test_ood"] = [r for s in OUT_OF_DOMAIN for r in made[s]]
    return {name: sorted(records, key=lambda r: r["id"]) for name, records in splits.items()}


def render(records: list[dict]) -> str:
    """A split file's exact text."""
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def render_all(config: SynthConfig = SynthConfig()) -> dict[str, str]:
    """File name -> exact text, for every split."""
    return {SPLIT_FILES[name]: render(records) for name, records in generate(config).items()}


def ood_coverage(splits: dict[str, list[dict]]) -> tuple[int, int]:
    """(OOD abbreviations never used in train, OOD abbreviations in all), counted as distinct keys."""
    seen = {a for r in splits["train"] for a in r["expansions"]}
    ood = {a for r in splits["test_ood"] for a in r["expansions"]}
    return len(ood - seen), len(ood)


# ------------------------------------------------------------------------------ CLI


def write(out: Path, texts: dict[str, str], force: bool) -> None:
    existing = [str(out / name) for name in texts if (out / name).exists()]
    if existing and not force:
        raise DataError(f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite")
    for name, text in texts.items():
        try:
            atomic_write_text(out / name, text)
        except OSError as e:
            raise DataError(f"{out / name}: cannot write: {e.strerror or e}") from None


def differences(out: Path, texts: dict[str, str]) -> list[str]:
    """One line per file on disk that differs from the regenerated text."""
    problems = []
    for name, text in texts.items():
        path = out / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != text.encode("utf-8"):
            problems.append(f"{path}: differs from what --seed regenerates")
    return problems


@exit_on_data_error()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for the four JSON files (default: the data/ package)")
    parser.add_argument("--seed", type=int, default=SynthConfig.seed)
    parser.add_argument("--per-specialty", type=int, default=SynthConfig.per_specialty,
                        help="in-domain records per specialty (default: %(default)s)")
    parser.add_argument("--ood-per-specialty", type=int, default=SynthConfig.ood_per_specialty,
                        help="out-of-domain records per specialty (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the files on disk differ from a regeneration")
    args = parser.parse_args(argv)
    if args.per_specialty < 10 or args.ood_per_specialty < 1:
        raise DataError("--per-specialty must be at least 10 and --ood-per-specialty at least 1")
    splits = generate(SynthConfig(args.seed, args.per_specialty, args.ood_per_specialty))
    texts = {SPLIT_FILES[name]: render(records) for name, records in splits.items()}
    if args.check:
        problems = differences(args.out, texts)
        for line in problems:
            print(f"mismatch: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.out}: all {len(texts)} files match seed {args.seed}")
        return 1 if problems else 0
    write(args.out, texts, args.force)
    unseen, total = ood_coverage(splits)
    print(", ".join(f"{file}: {len(splits[name])}" for name, file in SPLIT_FILES.items())
          + f" records in {args.out}; {unseen} of {total} abbreviations in {SPLIT_FILES['test_ood']} "
          "never occur in training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
