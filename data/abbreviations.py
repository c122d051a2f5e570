"""The project's clinical abbreviation table: one expansion per abbreviation, used everywhere.

Each abbreviation has exactly one expansion, so "SOB" always becomes "shortness of breath (SOB)"
in a summary and the source -> summary mapping stays a function a model can learn. Keys are
case-sensitive and written as clinicians write them ("pt", "h/o", "AFib", "HbA1c").

Expansions follow the dominant clinical sense in the shared sense inventories
(../shared/datasets/abbreviations: Stetson's 448-abbreviation distribution first, then the
Vanderbilt clinic notes, then the Vanderbilt discharge summaries). `INVENTORY_EXCEPTIONS` lists,
with the reason, each abbreviation where we deliberately depart from that sense;
tests/test_synth.py holds the table to both.

`specialty` is the abbreviation's home: "general" ones appear in every specialty's records, the
others mostly in their own. The out-of-domain specialties' abbreviations never appear in the
in-domain records, which is what makes test_ood.json a test of unseen vocabulary.

`HEADERS` are section labels ("Rx:", "F/u:") that a summary rewrites as words ("Treatment:",
"Follow-up:") instead of expanding in parentheses, as a clinician rewriting a note would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GENERAL = "general"


@dataclass(frozen=True)
class Abbreviation:
    abbr: str
    expansion: str
    specialty: str  # home specialty, or GENERAL

    def expanded(self) -> str:
        """How a summary writes it: 'shortness of breath (SOB)'."""
        return f"{self.expansion} ({self.abbr})"


_GROUPS: dict[str, dict[str, str]] = {
    GENERAL: {
        "pt": "patient",
        "yo": "years old",
        "y/o": "years old",
        "M": "male",
        "F": "female",
        "h/o": "history of",
        "c/o": "complains of",
        "p/w": "presents with",
        "s/p": "status post",
        "r/o": "rule out",
        "d/t": "due to",
        "c/b": "complicated by",
        "w/o": "without",
        "b/l": "bilateral",
        "sx": "symptoms",
        "neg": "negative",
        "ROS": "review of systems",
        "NKDA": "no known drug allergies",
        "NAD": "no apparent distress",
        "VSS": "vital signs stable",
        "WNL": "within normal limits",
        "BP": "blood pressure",
        "HR": "heart rate",
        "RR": "respiratory rate",
        "SpO2": "peripheral oxygen saturation",
        "Tmax": "temperature maximum",
        "BMI": "body mass index",
        "PO": "by mouth",
        "IV": "intravenous",
        "IM": "intramuscular",
        "SQ": "subcutaneous",
        "SL": "sublingual",
        "QD": "daily",
        "BID": "twice a day",
        "TID": "three times a day",
        "QID": "four times daily",
        "QHS": "at bedtime",
        "QAM": "every morning",
        "PRN": "as needed",
        "q4h": "every 4 hours",
        "q6h": "every 6 hours",
        "q8h": "every 8 hours",
        "q12h": "every 12 hours",
        "ED": "emergency department",
        "ICU": "intensive care unit",
        "PCP": "primary care physician",
        "HTN": "hypertension",
        "HLD": "hyperlipidemia",
        "DM2": "diabetes mellitus type 2",
        "EtOH": "ethanol",
        "CP": "chest pain",
        "SOB": "shortness of breath",
        "N/V": "nausea and vomiting",
        "f/c": "fevers and chills",
        "LE": "lower extremity",
        "CBC": "complete blood count",
        "BMP": "basic metabolic panel",
        "WBC": "white blood cells",
        "ESR": "erythrocyte sedimentation rate",
        "CRP": "C-reactive protein",
        "CXR": "chest x-ray",
        "CT": "computed tomography",
        "MRI": "magnetic resonance imaging",
        "U/S": "ultrasound",
        "bx": "biopsy",
    },
    "cardiology": {
        "CAD": "coronary artery disease",
        "CHF": "congestive heart failure",
        "HFrEF": "heart failure with reduced ejection fraction",
        "MI": "myocardial infarction",
        "NSTEMI": "non-ST-elevation myocardial infarction",
        "STEMI": "ST-elevation myocardial infarction",
        "ACS": "acute coronary syndrome",
        "AFib": "atrial fibrillation",
        "RVR": "rapid ventricular response",
        "SVT": "supraventricular tachycardia",
        "LVH": "left ventricular hypertrophy",
        "PVD": "peripheral vascular disease",
        "CABG": "coronary artery bypass graft",
        "PCI": "percutaneous coronary intervention",
        "RCA": "right coronary artery",
        "ICD": "implantable cardioverter defibrillator",
        "PPM": "pacemaker",
        "DOE": "dyspnea on exertion",
        "PND": "paroxysmal nocturnal dyspnea",
        "JVD": "jugular venous distention",
        "NSR": "normal sinus rhythm",
        "ASA": "aspirin",
        "NTG": "nitroglycerin",
        "BB": "beta blocker",
        "ACEi": "angiotensin converting enzyme inhibitor",
        "ARB": "angiotensin receptor blocker",
        "DAPT": "dual antiplatelet therapy",
        "ECG": "electrocardiogram",
        "EKG": "electrocardiogram",
        "TTE": "transthoracic echocardiography",
        "TEE": "transesophageal echocardiogram",
        "LVEF": "left ventricular ejection fraction",
        "BNP": "brain natriuretic peptide",
        "LDL": "low-density lipoprotein",
        "HDL": "high-density lipoprotein",
        "cath": "catheterization",
    },
    "pulmonology": {
        "COPD": "chronic obstructive pulmonary disease",
        "OSA": "obstructive sleep apnea",
        "PE": "pulmonary embolism",
        "CAP": "community-acquired pneumonia",
        "PNA": "pneumonia",
        "ILD": "interstitial lung disease",
        "ARDS": "acute respiratory distress syndrome",
        "URI": "upper respiratory tract infection",
        "RLL": "right lower lobe",
        "LLL": "left lower lobe",
        "MDI": "metered-dose inhaler",
        "ICS": "inhaled corticosteroid",
        "LABA": "long-acting beta agonist",
        "LAMA": "long-acting muscarinic antagonist",
        "nebs": "nebulizers",
        "O2": "oxygen",
        "CPAP": "continuous positive airway pressure",
        "BiPAP": "bilevel positive airway pressure",
        "PFTs": "pulmonary function tests",
        "ABG": "arterial blood gas",
        "FEV1": "forced expiratory volume in 1 second",
        "DLCO": "diffusing capacity of lung for carbon monoxide",
        "BAL": "bronchoalveolar lavage",
        "6MWT": "six-minute walk test",
    },
    "oncology": {
        "NSCLC": "non-small cell lung cancer",
        "SCLC": "small cell lung cancer",
        "CRC": "colorectal cancer",
        "HCC": "hepatocellular carcinoma",
        "RCC": "renal cell carcinoma",
        "DCIS": "ductal carcinoma in situ",
        "mets": "metastases",
        "LN": "lymph node",
        "FNA": "fine-needle aspiration",
        "ECOG": "Eastern Cooperative Oncology Group",
        "chemo": "chemotherapy",
        "XRT": "radiation therapy",
        "5-FU": "5-fluorouracil",
        "G-CSF": "granulocyte colony-stimulating factor",
        "TKI": "tyrosine kinase inhibitor",
        "ANC": "absolute neutrophil count",
        "PET": "positron emission tomography",
        "CEA": "carcinoembryonic antigen",
        "AFP": "alpha-fetoprotein",
        "PSA": "prostate-specific antigen",
        "CA-125": "cancer antigen 125",
        "LDH": "lactate dehydrogenase",
    },
    "endocrinology": {
        "T1DM": "type 1 diabetes mellitus",
        "DKA": "diabetic ketoacidosis",
        "HHS": "hyperosmolar hyperglycemic state",
        "SIADH": "syndrome of inappropriate antidiuretic hormone secretion",
        "PCOS": "polycystic ovarian syndrome",
        "HbA1c": "hemoglobin A1c",
        "FSG": "finger stick glucose",
        "BG": "blood glucose",
        "TSH": "thyroid stimulating hormone",
        "FT4": "free thyroxine",
        "TFTs": "thyroid function tests",
        "PTH": "parathyroid hormone",
        "DEXA": "dual-energy x-ray absorptiometry",
        "UACR": "urine albumin-to-creatinine ratio",
        "SGLT2": "sodium-glucose cotransporter 2",
        "GLP-1": "glucagon-like peptide-1",
        "DPP-4": "dipeptidyl peptidase-4",
        "RAI": "radioactive iodine",
    },
    "gastroenterology": {
        "GERD": "gastroesophageal reflux disease",
        "PUD": "peptic ulcer disease",
        "GIB": "gastrointestinal bleed",
        "UGIB": "upper gastrointestinal bleed",
        "IBD": "inflammatory bowel disease",
        "IBS": "irritable bowel syndrome",
        "UC": "ulcerative colitis",
        "NAFLD": "nonalcoholic fatty liver disease",
        "SBP": "spontaneous bacterial peritonitis",
        "HCV": "hepatitis C virus",
        "HBV": "hepatitis B virus",
        "BRBPR": "bright red blood per rectum",
        "RUQ": "right upper quadrant",
        "LLQ": "left lower quadrant",
        "RLQ": "right lower quadrant",
        "EGD": "esophagogastroduodenoscopy",
        "ERCP": "endoscopic retrograde cholangiopancreatography",
        "MRCP": "magnetic resonance cholangiopancreatography",
        "TIPS": "transjugular intrahepatic portosystemic shunt",
        "LFTs": "liver function tests",
        "AST": "aspartate aminotransferase",
        "ALT": "alanine aminotransferase",
        "PPI": "proton pump inhibitor",
        "NPO": "nothing by mouth",
    },
    "nephrology": {
        "AKI": "acute kidney injury",
        "CKD": "chronic kidney disease",
        "ESRD": "end-stage renal disease",
        "ARF": "acute renal failure",
        "HD": "hemodialysis",
        "PD": "peritoneal dialysis",
        "BPH": "benign prostatic hypertrophy",
        "UOP": "urinary output",
        "IVF": "intravenous fluid",
        "NS": "normal saline",
        "HCTZ": "hydrochlorothiazide",
        "EPO": "erythropoietin",
        "BUN": "blood urea nitrogen",
        "Cr": "creatinine",
        "eGFR": "estimated glomerular filtration rate",
        "UA": "urinalysis",
        "UPCR": "urine protein-to-creatinine ratio",
        "Na": "sodium",
        "K": "potassium",
        "HCO3": "bicarbonate",
    },
    "infectious disease": {
        "HIV": "human immunodeficiency virus",
        "AIDS": "acquired immunodeficiency syndrome",
        "HAART": "highly active antiretroviral therapy",
        "UTI": "urinary tract infection",
        "MRSA": "methicillin-resistant Staphylococcus aureus",
        "MSSA": "methicillin-sensitive Staphylococcus aureus",
        "VRE": "vancomycin-resistant enterococci",
        "CMV": "cytomegalovirus",
        "EBV": "Epstein-Barr virus",
        "HSV": "herpes simplex virus",
        "VZV": "varicella zoster virus",
        "TB": "tuberculosis",
        "PPD": "purified protein derivative",
        "INH": "isoniazid",
        "IVDU": "intravenous drug use",
        "TMP-SMX": "trimethoprim-sulfamethoxazole",
        "PCN": "penicillin",
        "vanc": "vancomycin",
        "abx": "antibiotics",
        "BCx": "blood culture",
        "UCx": "urine culture",
        "VL": "viral load",
        "RPR": "rapid plasma reagin",
    },
    "hematology": {
        "DVT": "deep vein thrombosis",
        "VTE": "venous thromboembolism",
        "ITP": "idiopathic thrombocytopenic purpura",
        "HIT": "heparin-induced thrombocytopenia",
        "DIC": "disseminated intravascular coagulation",
        "IDA": "iron deficiency anemia",
        "AML": "acute myelogenous leukemia",
        "CLL": "chronic lymphocytic leukemia",
        "CML": "chronic myeloid leukemia",
        "MGUS": "monoclonal gammopathy of undetermined significance",
        "NHL": "non-Hodgkin lymphoma",
        "LMWH": "low-molecular-weight heparin",
        "UFH": "unfractionated heparin",
        "DOAC": "direct oral anticoagulant",
        "PRBC": "packed red blood cells",
        "FFP": "fresh frozen plasma",
        "IVIG": "intravenous immune globulin",
        "Hgb": "hemoglobin",
        "Hct": "hematocrit",
        "plt": "platelets",
        "MCV": "mean corpuscular volume",
        "INR": "international normalized ratio",
        "PTT": "partial thromboplastin time",
        "retic": "reticulocyte count",
        "TIBC": "total iron binding capacity",
        "Fe": "iron",
        "B12": "vitamin B12",
        "BMBx": "bone marrow biopsy",
    },
    # Out-of-domain specialties: only test_ood.json uses these.
    "neurology": {
        "CVA": "cerebrovascular accident",
        "TIA": "transient ischemic attack",
        "SAH": "subarachnoid hemorrhage",
        "SDH": "subdural hematoma",
        "ICH": "intracerebral hemorrhage",
        "ALS": "amyotrophic lateral sclerosis",
        "RLS": "restless legs syndrome",
        "sz": "seizure",
        "HA": "headache",
        "LOC": "loss of consciousness",
        "AMS": "altered mental status",
        "LKW": "last known well",
        "NIHSS": "National Institutes of Health Stroke Scale",
        "CN": "cranial nerves",
        "tPA": "tissue plasminogen activator",
        "AED": "antiepileptic drug",
        "DBS": "deep brain stimulation",
        "EEG": "electroencephalogram",
        "EMG": "electromyogram",
        "NCS": "nerve conduction studies",
        "MRA": "magnetic resonance angiogram",
        "LP": "lumbar puncture",
        "CSF": "cerebrospinal fluid",
    },
    "rheumatology": {
        "RA": "rheumatoid arthritis",
        "SLE": "systemic lupus erythematosus",
        "OA": "osteoarthritis",
        "DJD": "degenerative joint disease",
        "PMR": "polymyalgia rheumatica",
        "GCA": "giant cell arteritis",
        "LBP": "low back pain",
        "PIP": "proximal interphalangeal joint",
        "DIP": "distal interphalangeal joint",
        "MTX": "methotrexate",
        "HCQ": "hydroxychloroquine",
        "NSAIDs": "nonsteroidal anti-inflammatory drugs",
        "DMARD": "disease-modifying antirheumatic drug",
        "TNF": "tumor necrosis factor",
        "ANA": "antinuclear antibody",
        "RF": "rheumatoid factor",
        "CCP": "cyclic citrullinated peptide",
        "HLA-B27": "human leukocyte antigen B27",
        "C3": "complement component 3",
        "C4": "complement component 4",
    },
    "psychiatry": {
        "MDD": "major depressive disorder",
        "GAD": "generalized anxiety disorder",
        "PTSD": "post-traumatic stress disorder",
        "BPAD": "bipolar affective disorder",
        "OCD": "obsessive-compulsive disorder",
        "ADHD": "attention deficit hyperactivity disorder",
        "SUD": "substance use disorder",
        "SI": "suicidal ideation",
        "HI": "homicidal ideation",
        "AVH": "auditory and visual hallucinations",
        "SSRI": "selective serotonin reuptake inhibitor",
        "SNRI": "serotonin-norepinephrine reuptake inhibitor",
        "TCA": "tricyclic antidepressant",
        "CBT": "cognitive behavioral therapy",
        "ECT": "electroconvulsive therapy",
        "PHQ-9": "Patient Health Questionnaire-9",
        "UDS": "urine drug screen",
        "MSE": "mental status exam",
    },
}


def _build(groups: dict[str, dict[str, str]]) -> dict[str, Abbreviation]:
    table: dict[str, Abbreviation] = {}
    for specialty, pairs in groups.items():
        for abbr, expansion in pairs.items():
            if abbr in table:  # one expansion per abbreviation, or the task stops being a function
                raise ValueError(f"abbreviation {abbr!r} listed twice ({table[abbr].specialty}, {specialty})")
            table[abbr] = Abbreviation(abbr, expansion, specialty)
    return table


ABBREVIATIONS: dict[str, Abbreviation] = _build(_GROUPS)

# Section labels a summary rewrites as words; never expanded in parentheses.
HEADERS: dict[str, str] = {
    "CC": "Chief complaint",
    "HPI": "History of present illness",
    "PMH": "Past medical history",
    "Rx": "Treatment",
    "Tx": "Treatment",
    "F/u": "Follow-up",
}

# Where we depart from the inventories' dominant sense (Stetson, then Vanderbilt clinic notes,
# then Vanderbilt discharge summaries), and why.
INVENTORY_EXCEPTIONS: dict[str, str] = {
    "SpO2": "the clinic-notes sense 'pulse oximeter oxygen saturation' names the device; the p in "
            "SpO2 stands for peripheral, and the quantity is the same",
    "QID": "the clinic-notes sense is the Latin 'quater in die'; the discharge summaries give its "
           "English meaning, 'four times daily'",
    "NSTEMI": "the clinic-notes sense 'non-st segment myocardial infarction' drops the 'elevation' "
              "that the E stands for; the discharge summaries give the full form we use",
    "CEA": "the clinic-notes sense 'carcinogenic embryonic antigen' is a misspelling; the discharge "
           "summaries give 'carcinoembryonic antigen'",
    "PSA": "Stetson's inpatient notes are dominated by 'polysubstance abuse'; both Vanderbilt "
           "inventories give 'prostate-specific antigen' (0.99, 1.00), the only sense our oncology "
           "records use",
    "CVA": "Stetson writes 'cerebral vascular accident'; the standard term, and the discharge "
           "summaries' dominant sense (0.95), is 'cerebrovascular accident'",
    "RA": "the inventories' dominant sense is 'room air' (we always write 'room air' in full); in "
          "rheumatology records RA is rheumatoid arthritis, the inventories' second sense",
    "RF": "Stetson's dominant sense is 'risk factors'; in rheumatology records RF is rheumatoid "
          "factor, a sense all three inventories list",
}

SPECIALTIES: tuple[str, ...] = tuple(s for s in _GROUPS if s != GENERAL)


def expanded(abbr: str) -> str:
    """The summary form of one abbreviation: 'shortness of breath (SOB)'."""
    return ABBREVIATIONS[abbr].expanded()


def _alternation(keys) -> str:
    # Longest first, so "HDL" wins over "HD" and "SpO2" over "O2"; ties alphabetical for stability.
    return "|".join(re.escape(k) for k in sorted(keys, key=lambda k: (-len(k), k)))


# A key counts only as a whole token: not inside a longer word or number ("HD" in "HDL", "K" in
# "OK"); "-" and "/" may touch it, as in "5-FU-based", "anti-CCP" and "ICS/LABA".
_TOKEN = re.compile(
    rf"(?<![A-Za-z0-9])(?:(?P<header>{_alternation(HEADERS)}):|(?P<abbr>{_alternation(ABBREVIATIONS)}))"
    r"(?![A-Za-z0-9])")


def find_abbreviations(text: str) -> list[str]:
    """The table's abbreviations in `text`, in order of first appearance, each once."""
    found = [m.group("abbr") for m in _TOKEN.finditer(text) if m.group("abbr")]
    return list(dict.fromkeys(found))


def expand_text(text: str) -> str:
    """`text` with each abbreviation written 'expansion (ABBR)' and each header spelled out."""
    def replace(m: re.Match) -> str:
        if m.group("header"):
            return HEADERS[m.group("header")] + ":"
        return ABBREVIATIONS[m.group("abbr")].expanded()
    return _TOKEN.sub(replace, text)
